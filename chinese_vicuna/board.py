"""What the training board (board.py) does besides drawing: the command a page's settings make,
runs of that command as child processes kept in a registry on disk, their progress read from
the files the scripts already write, and what the page shows about a base model and a data file.

The board has no training code of its own: a run is `python finetune.py --flag value ...` (or
finetune_chat.py, tools/pretrain.py, finetune_dpo.py, finetune_grpo.py, merge_lora.py), exactly
the argv shown in the page. A run's record (`RUNS_DIR/<id>/run.json`) and its console output
(`RUNS_DIR/<id>/console.log`) live on disk and the child runs in its own session, so a reloaded page, a closed browser or a restarted
board finds the run where it is. Stop is Ctrl-C (SIGINT): the scripts stop at the step's end and
keep their last complete checkpoint; Resume runs the same argv with `--resume_from_checkpoint true`.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    """A training stage the board runs: its script and what its data and length flags are called."""

    name: str
    script: str
    data_flag: str = "data_path"
    length_flag: str = "cutoff_len"
    template: str | None = "alpaca"  # None: the stage has no prompt template (plain text)
    own: tuple[str, ...] = ()  # settings only this stage's script takes (the page shows them for it alone)
    sequences_per_sample: int = 1  # a preference pair is two sequences (the memory estimate counts both)
    # GRPO: the setting that says how many sequences a sample is (its group of completions per prompt),
    # and the one that adds to the length setting (a sequence is the prompt plus its completion)
    sequences_setting: str | None = None
    completion_setting: str | None = None
    evaluates: bool = True  # False: the script takes no held-out set (--val_set_size stays its 0)


STAGES = {
    "sft": Stage("sft", "finetune.py"),
    "chat_sft": Stage("chat_sft", "finetune_chat.py", template="chinese-vicuna-chat"),
    "pretrain": Stage("pretrain", "tools/pretrain.py", data_flag="dataset_dir", length_flag="block_size", template=None),
    "dpo": Stage("dpo", "finetune_dpo.py", own=("lora_weights", "pref_loss", "pref_beta", "pref_ftx"), sequences_per_sample=2),
    "grpo": Stage(
        "grpo", "finetune_grpo.py", length_flag="max_prompt_length",
        own=("lora_weights", "reward_funcs", "num_generations", "max_completion_length", "grpo_loss", "beta"),
        sequences_setting="num_generations", completion_setting="max_completion_length", evaluates=False,
    ),
}  # fmt: skip
STAGE_ONLY = {key for spec in STAGES.values() for key in spec.own}

# The page's settings, in the order their flags appear on the command line (stage-specific names
# for data and length are mapped by `stage_flags`). A value None or "" is left out (the script's default).
SETTINGS = (
    "base_model", "lora_weights", "prompt_template", "data", "output_dir", "length", "num_epochs", "max_steps",
    "learning_rate", "micro_batch_size", "batch_size", "val_set_size", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "precision", "pref_loss", "pref_beta", "pref_ftx", "reward_funcs", "num_generations",
    "max_completion_length", "grpo_loss", "beta", "warmup_steps", "logging_steps",
    "save_steps", "seed",
)  # fmt: skip
# Flags every run of the board carries besides the page's settings: the trainer then logs the tokens
# it has seen and its tokens/s into trainer_log.jsonl, which the Runs tab shows (HF Trainer's own count
# of input ids, padding included: true means "all"; its "non_padding" has no command-line spelling,
# HfArgumentParser reads the field as a boolean).
RUN_FLAGS = {"include_num_input_tokens_seen": True}


def stage_flags(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as the stage's flags (name → typed value), in command-line order; what a flags file holds."""
    spec = STAGES[stage]
    flags: dict[str, Any] = {}
    for key in SETTINGS:
        value = settings.get(key)
        if value is None or value == "" or (key == "max_steps" and int(value) <= 0):
            continue
        if (key == "prompt_template" and spec.template is None) or (key in STAGE_ONLY and key not in spec.own):
            continue
        if key == "val_set_size" and not spec.evaluates:
            continue  # the page holds it at 0 for this stage; the script's default is that 0
        name = {"data": spec.data_flag, "length": spec.length_flag}.get(key, key)
        flags[name] = value
    return {**flags, **RUN_FLAGS}


def flag_text(value: Any) -> str:
    """A flag value as the command line spells it (booleans as true/false, floats without noise)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def command_argv(stage: str, flags: dict[str, Any], python: str = sys.executable) -> list[str]:
    """The argv a run starts: this Python, the stage's script, `--flag value` for each flag."""
    argv = [python, script_path(STAGES[stage].script)]
    for name, value in flags.items():
        argv += [f"--{name}", flag_text(value)]
    return argv


def script_path(script: str) -> str:
    """A repository script as the command names it: relative to the working folder when it is
    inside it (the usual case: the repository root), else absolute. Runs start in the board's
    working folder, so relative data and output paths mean the same to the page and to the run."""
    path = os.path.relpath(REPO / script)
    return str(REPO / script) if path.startswith("..") else path


def resume_argv(argv: list[str]) -> list[str]:
    """The same command continuing from its newest complete checkpoint."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return [*out, "--resume_from_checkpoint", "true"]


def shown_command(argv: list[str]) -> str:
    """The command as the page shows it: shell-quoted, so pasting it runs the same argv."""
    return shlex.join(argv)


def chained_command(steps: list[list[str]]) -> str:
    """Commands run one after the other, each only if the one before succeeded, as a shell line."""
    return " && ".join(shown_command(argv) for argv in steps)


# --------------------------------------------------------------------------------------------
# Flags files: what `python finetune.py flags.yaml` reads (HfArgumentParser's single-file form)
# --------------------------------------------------------------------------------------------
def write_flags_file(path: str | os.PathLike, flags: dict[str, Any]) -> Path:
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(flags, allow_unicode=True, sort_keys=False)
    elif path.suffix == ".json":
        text = json.dumps(flags, ensure_ascii=False, indent=2) + "\n"
    else:
        raise UserError(f"{path}: a flags file ends in .yaml, .yml or .json")
    atomic_write_text(path, text)
    return path


def read_flags_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: flags file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            flags = yaml.safe_load(text)
        else:
            flags = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path}: not a valid flags file ({str(exc).splitlines()[0]})") from None
    if not isinstance(flags, dict):
        raise UserError(f"{path}: a flags file is a mapping of flag names to values")
    return flags


def settings_of_flags(flags: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(stage, page settings) of a flags file: pretraining by its --dataset_dir, RL by its --reward_funcs,
    preference training by its --pref_* flags, chat SFT by its data."""
    if "dataset_dir" in flags:
        stage = "pretrain"
    elif "reward_funcs" in flags:
        stage = "grpo"
    elif any(name.startswith("pref_") for name in flags):
        stage = "dpo"
    else:
        stage = "sft"
        data = flags.get("data_path")
        if data:
            from chinese_vicuna.datatools.doctor import data_kind

            with contextlib.suppress(UserError):  # the page's data check names the problem
                stage = "chat_sft" if data_kind(data) == "chat" else "sft"
    spec = STAGES[stage]
    back = {spec.data_flag: "data", spec.length_flag: "length"}
    return stage, {back.get(name, name): value for name, value in flags.items() if name not in RUN_FLAGS}


# --------------------------------------------------------------------------------------------
# Runs: a registry on disk; children in their own session so they outlive the page and the board
# --------------------------------------------------------------------------------------------
def _alive(pid: int, argv: list[str]) -> bool:
    """The process is running and is still this run (not a reused pid)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and raw.split(b"\0")[:-1] == [a.encode() for a in argv]


class Runs:
    """The board's runs: `RUNS_DIR/<id>/run.json` (argv, pid, output folder, status) and console.log."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _file(self, run_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-z-]+", run_id or ""):
            raise UserError(f"run {run_id!r}: no such run")
        return self.root / run_id / "run.json"

    def get(self, run_id: str) -> dict[str, Any]:
        path = self._file(run_id)
        if not path.is_file():
            raise UserError(f"run {run_id!r}: no such run in {self.root}")
        run = json.loads(path.read_text(encoding="utf-8"))
        if run["status"] == "running" and not _alive(run["pid"], run["argv"]):
            run["status"] = "ended"  # the child ended while no board was its parent: its exit status is unknown
        return run

    def _save(self, run: dict[str, Any]) -> None:
        atomic_write_text(self._file(run["id"]), json.dumps(run, ensure_ascii=False, indent=1))

    def all(self) -> list[dict[str, Any]]:
        runs = []
        for path in self.root.glob("*/run.json"):
            try:
                runs.append(self.get(path.parent.name))
            except (UserError, ValueError, KeyError):
                continue
        return sorted(runs, key=lambda r: r["started"], reverse=True)

    def running_into(self, output_dir: str) -> dict[str, Any] | None:
        target = os.path.realpath(output_dir)
        return next((r for r in self.all() if r["status"] == "running" and os.path.realpath(r["output_dir"]) == target), None)

    def start(
        self, kind: str, argv: list[str], output_dir: str, run_id: str | None = None, then: list[list[str]] | None = None
    ) -> dict[str, Any]:
        """Start `argv` as a child (a new run, or `run_id` again: a resume); refused while another run writes
        `output_dir`. `then`: commands run after it, each when the one before exits 0 (the shell's `&&`):
        an export's merge before its conversion, an evaluation of the base before the adapter's."""
        steps = [argv, *(then or [])]
        with self._lock:
            busy = self.running_into(output_dir)
            if busy is not None:
                raise UserError(
                    f"--output_dir {output_dir} is being written by run {busy['id']} (pid {busy['pid']}): "
                    "stop it first, or choose another --output_dir"
                )
            run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            (self.root / run_id).mkdir(parents=True, exist_ok=True)
            run = {
                "id": run_id,
                "kind": kind,
                "steps": steps,
                "command": chained_command(steps),
                "output_dir": output_dir,
                "started": time.time(),
                "status": "running",
                "returncode": None,
            }
            proc = self._launch(run, 0)
        threading.Thread(target=self._wait, args=(proc, run_id), daemon=True).start()
        return run

    def _launch(self, run: dict[str, Any], step: int) -> subprocess.Popen:
        """Start the run's `step`-th command, its output appended to the run's console; the record saved."""
        argv = run["steps"][step]
        with (self.root / run["id"] / "console.log").open("ab") as console:
            console.write(f"\n$ {shown_command(argv)}\n".encode())
            console.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        run.update(argv=argv, step=step, pid=proc.pid)
        self._save(run)
        return proc

    def _wait(self, proc: subprocess.Popen, run_id: str) -> None:
        code = proc.wait()
        with self._lock:
            run = json.loads(self._file(run_id).read_text(encoding="utf-8"))
            if run["pid"] != proc.pid:
                return  # a newer attempt of this run
            step = run.get("step", 0)
            if code == 0 and step + 1 < len(run.get("steps", [])):
                proc = self._launch(run, step + 1)  # the next command of the chain, as `&&` would
            else:
                run["returncode"] = code
                run["status"] = "finished" if code == 0 else "stopped" if code in (130, -signal.SIGINT) else "failed"
                self._save(run)
                return
        self._wait(proc, run_id)

    def stop(self, run_id: str) -> dict[str, Any]:
        """Ctrl-C to the run: the script stops at the end of the step; its last checkpoint stays complete."""
        run = self.get(run_id)
        if run["status"] != "running":
            raise UserError(f"run {run_id} is not running ({run['status']})")
        os.kill(run["pid"], signal.SIGINT)
        return run

    def resume(self, run_id: str) -> dict[str, Any]:
        run = self.get(run_id)
        if run["status"] == "running":
            raise UserError(f"run {run_id} is still running")
        if run["kind"] not in STAGES:
            raise UserError(f"run {run_id} is a {run['kind']} run: run it again instead")
        return self.start(run["kind"], resume_argv(run["argv"]), run["output_dir"], run_id)

    def console(self, run_id: str, lines: int = 20) -> str:
        """The last lines of the run's console output (progress bars' carriage returns as line ends)."""
        path = self.root / run_id / "console.log"
        if not path.is_file():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join([line for line in re.split(r"[\r\n]+", text) if line.strip()][-lines:])


# --------------------------------------------------------------------------------------------
# Progress: trainer_log.jsonl (every logged step) and the progress bar in the console
# --------------------------------------------------------------------------------------------
PROGRESS_BAR = re.compile(r"(\d+)/(\d+) \[([0-9:]+)<([0-9:?]+)")


def progress(run: dict[str, Any], console: str) -> dict[str, Any]:
    """Step, total steps, ETA, latest loss and learning rate, tokens/s, and the loss curve of a run."""
    log = Path(run["output_dir"]) / "trainer_log.jsonl"
    entries = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line being written
    curve = [{"step": e["step"], "loss": e["loss"], "kind": "train"} for e in entries if "loss" in e]
    curve += [{"step": e["step"], "loss": e["eval_loss"], "kind": "eval"} for e in entries if "eval_loss" in e]
    last = next((e for e in reversed(entries) if "loss" in e), {})
    speed = next((e for e in reversed(entries) if "train_tokens_per_second" in e), {})
    out: dict[str, Any] = {
        "tokens_per_second": speed.get("train_tokens_per_second"),  # --include_num_input_tokens_seen: mean since this session began
        "tokens_seen": speed.get("num_input_tokens_seen"),
        "step": max((e.get("step", 0) for e in entries), default=0),
        "loss": last.get("loss"),
        "learning_rate": last.get("learning_rate"),
        "curve": curve,
        "total": None,
        "eta": None,
    }
    bars = PROGRESS_BAR.findall(console)
    if bars:
        done, total, _, eta = bars[-1]
        out["step"] = max(out["step"], int(done))
        out["total"], out["eta"] = int(total), eta
    return out


def loss_plot(run: dict[str, Any], curve: list[dict[str, Any]], folder: str | os.PathLike) -> Path | None:
    """The run's loss curve as training draws it (`plot_loss`, as training_loss.png), redrawn when the log grew."""
    from chinese_vicuna.train.trainer import plot_loss

    log, png = Path(run["output_dir"]) / "trainer_log.jsonl", Path(folder) / "loss.png"
    if not curve or not log.is_file():
        return None
    if not png.is_file() or png.stat().st_mtime < log.stat().st_mtime:
        history = [{"step": p["step"], "loss" if p["kind"] == "train" else "eval_loss": p["loss"]} for p in curve]
        plot_loss(history, png)
    return png


# --------------------------------------------------------------------------------------------
# What the page shows about a base model and a data file
# --------------------------------------------------------------------------------------------
def _parameter_count(folder: Path) -> int | None:
    """Parameters of a safetensors model, from the files' headers (no weight is read)."""
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total if files else None


def local_model_folder(base_model: str) -> Path:
    """The folder of a base model: the path itself, or a hub id's snapshot in the local Hugging Face
    cache. Nothing is downloaded (these machines have no network): an uncached hub id is one line."""
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"--base_model {base_model}: no config.json there (give a Hugging Face model folder)")
        return folder
    from chinese_vicuna.args import HUB_ID

    if not HUB_ID.match(base_model):
        raise UserError(f"--base_model {base_model}: not a local folder nor a hub id like 'owner/name'")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(base_model, local_files_only=True))
    except LocalEntryNotFoundError:
        raise UserError(
            f"--base_model {base_model}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); the board reads hub "
            f"models from the cache only: download it once where there is network (huggingface-cli download {base_model}) "
            "or give a model folder"
        ) from None
    if not (snapshot / "config.json").is_file():
        raise UserError(f"--base_model {base_model}: the cached snapshot {snapshot} has no config.json (download the whole model)")
    return snapshot


def model_summary(base_model: str) -> dict[str, Any]:
    """Architecture, size, vocabulary and the template a base model carries (a local folder, or a
    hub id read from the local cache)."""
    folder = local_model_folder(base_model)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import saved_template

    tokenizer = load_tokenizer(str(folder))
    saved = saved_template([folder], tokenizer)
    if saved is not None:
        carries, reason = saved.name, "saved"
    elif getattr(tokenizer, "chat_template", None):
        carries, reason = "auto", "chat_template"
    else:
        carries, reason = None, "none"
    return {
        "folder": str(folder),  # the hub cache's snapshot for a hub id
        "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "?")]),
        "parameters": _parameter_count(folder),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "context": config.get("max_position_embeddings"),
        "vocab_size": config.get("vocab_size"),
        "tokenizer_size": len(tokenizer),
        "template": carries,
        "template_reason": reason,  # saved (prompt_template.json beside the weights), chat_template (the tokenizer's), none
    }


def memory_estimate(base_model: str, stage: str, settings: dict[str, Any]) -> Any:
    """The training memory of these settings (chinese_vicuna/train/memory.py, as tools/estimate_memory.py
    prints it), on this machine's device and the precision the script would decide; an upper bound
    in that every position counts as trained. A config the estimator cannot read is a UserError."""
    import torch

    from chinese_vicuna.devices import decide_precision
    from chinese_vicuna.train.memory import estimate_training_memory

    config = json.loads((local_model_folder(base_model) / "config.json").read_text(encoding="utf-8"))
    cuda = torch.cuda.is_available()
    precision = decide_precision(settings.get("precision") or "auto", training=True)
    spec = STAGES[stage]
    # GRPO trains on each prompt's group of completions: num_generations sequences of prompt + completion
    per_sample = int(settings.get(spec.sequences_setting) or 1) if spec.sequences_setting else spec.sequences_per_sample
    length = int(settings.get("length") or 256) + (int(settings.get(spec.completion_setting) or 0) if spec.completion_setting else 0)
    try:
        return estimate_training_memory(
            config, precision.weights, int(settings.get("lora_r") or 8), settings.get("lora_target_modules") or "q_proj,v_proj",
            length, int(settings.get("micro_batch_size") or 4) * per_sample,
            gradient_checkpointing=False, compute_bytes=2 if (precision.bf16 or precision.fp16) else 4,
            device="cuda" if cuda else "cpu", lora_dropout=float(settings.get("lora_dropout") or 0),
        )  # fmt: skip
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"--base_model {base_model}: config.json lacks what the memory estimate needs ({exc})") from None


# --------------------------------------------------------------------------------------------
# A running child's memory: RSS of its process tree (/proc), GPU memory where CUDA (nvidia-smi)
# --------------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun's workers, DataLoader workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_memory(pids: list[int]) -> int | None:
    """Bytes of GPU memory these processes hold (nvidia-smi's per-process figure); None without nvidia-smi."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    wanted, total = set(pids), 0
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and int(pid) in wanted and mib.strip().isdigit():
            total += int(mib) * 2**20
    return total


def memory_text(size: float | None) -> str:
    """Bytes as the page says them: GiB from 1 GiB up, MiB below."""
    if size is None:
        return "—"
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def run_memory(pid: int) -> dict[str, int | None]:
    """RSS (all of the child's processes) and GPU memory of a running run, in bytes."""
    tree = process_tree(pid)
    return {"rss": sum(_rss(p) for p in tree), "gpu": gpu_memory(tree)}


def _segments_html(segments: Any) -> str:
    return "".join(f'<span class="{"trained" if s.trainable else "masked"}">{html.escape(s.text)}</span>' for s in segments)


def preview_html(data_path: str, tokenizer: Any, template: Any, stage: str, records: int = 3) -> str:
    """The first records as the model sees them: the rendered text, the part without loss greyed;
    a preference pair as its chosen and its rejected sequence (data/preference.py's rendering)."""
    from chinese_vicuna.data.formats import check_messages, detect_format, to_messages
    from chinese_vicuna.data.preference import answer_segments, to_example
    from chinese_vicuna.data.records import data_files, read_records, validate_instruction

    if stage == "grpo":
        return _prompts_html(data_path, tokenizer, template, records)
    blocks = []
    for record in read_records(data_files(data_path)[0])[:records]:
        where = html.escape(record.where)
        if stage == "dpo":
            example = to_example(record)
            labels = ("chosen", "rejected") if len(example.answers) == 2 else ("desirable" if example.desirable else "undesirable",)
            for label, answer in zip(labels, example.answers, strict=True):
                body = _segments_html(answer_segments(template, example, answer))
                blocks.append(f'<div class="where">{where} · {label}</div><pre class="sample {label}">{body}</pre>')
            continue
        if stage == "chat_sft":
            fmt = detect_format(record.data)
            if fmt is None:
                raise UserError(f"{record.where}: not a conversation in a known format")
            messages, _ = check_messages(to_messages(record, fmt), record.where)
            segments = template.chat_segments(messages, add_generation_prompt=False)
        else:
            item = validate_instruction(record)
            segments = template.instruction_segments(item["instruction"], item["input"], item["output"])
        blocks.append(f'<div class="where">{where}</div><pre class="sample">{_segments_html(segments)}</pre>')
    return "".join(blocks)


def _rl_prompts(data_path: str, tokenizer: Any, template: Any, max_prompt_length: int) -> Any:
    """The RL prompts as finetune_grpo.py builds them (data/rl.py, ids from the inference owner)."""
    from chinese_vicuna.data.rl import load_prompt_dataset
    from chinese_vicuna.infer.engine import Engine

    return load_prompt_dataset(data_path, Engine.for_model(None, tokenizer, template), max_prompt_length)


def _prompts_html(data_path: str, tokenizer: Any, template: Any, records: int) -> str:
    """RL prompts: the prompt the policy is asked (decoded from the ids training samples from; no loss
    on it, so greyed) and the columns the reward functions read (the answer they check)."""
    blocks = []
    for sample in list(_rl_prompts(data_path, tokenizer, template, 2**31))[:records]:
        ids = sample["prompt_ids"]
        text = tokenizer.decode(ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids)
        columns = " · ".join(
            f"{html.escape(str(k))} = {html.escape(json.dumps(v, ensure_ascii=False))}" for k, v in sample["columns"].items()
        )
        blocks.append(
            f'<div class="where">{html.escape(sample["where"])}</div><pre class="sample prompt"><span class="masked">{html.escape(text)}</span></pre>'
            f'<div class="columns">{columns}</div>'
        )
    return "".join(blocks)


def check_rl_data(data_path: str, tokenizer: Any, template: Any, max_prompt_length: int, reward_funcs: str) -> dict[str, Any]:
    """What finetune_grpo.py checks before its model loads: every record a prompt, the reward functions
    loadable and their columns in every record; how many prompts are dropped as too long."""
    from chinese_vicuna.data.records import data_files, iter_records
    from chinese_vicuna.train.rewards import DEFAULT_FORMAT_PATTERN, check_columns, load_reward_functions

    rewards = load_reward_functions(reward_funcs, DEFAULT_FORMAT_PATTERN, 0, 1)  # the length settings only shape the `length` reward
    prompts = _rl_prompts(data_path, tokenizer, template, max_prompt_length)
    for sample in prompts:
        check_columns(rewards, list(sample["columns"]), sample["where"])
    files = [f for part in data_path.split(",") if part.strip() for f in data_files(part.strip())]
    records = sum(1 for path in files for _ in iter_records(path))
    return {
        "records": records, "prompts": len(prompts), "too_long": records - len(prompts), "max_prompt_length": max_prompt_length,
        "longest": max(prompts.lengths), "rewards": [r.name for r in rewards],
    }  # fmt: skip


def check_data(data_path: str, tokenizer: Any, template: Any, cutoff_len: int, stage: str = "sft") -> dict[str, Any]:
    """The data doctor's report (no near-duplicate search: seconds), the preference doctor's for
    preference pairs; a UserError for a file training would refuse."""
    if stage == "dpo":
        from chinese_vicuna.datatools.preference_doctor import diagnose_preferences

        report = diagnose_preferences(data_path, tokenizer, template, cutoff_len)
    else:
        from chinese_vicuna.datatools.doctor import diagnose

        report, _ = diagnose(data_path, tokenizer, template, cutoff_len, threshold=None)
    if report["invalid_records"]:
        raise UserError(report["invalid_examples"][0])
    return report


# --------------------------------------------------------------------------------------------
# Evaluation and export: the project's tools, as the commands a user would type (README, docs/)
# --------------------------------------------------------------------------------------------
def choice_eval_steps(
    base_model: str, adapter: str, benchmark: str, data_dir: str, split: str, ntrain: int, subjects: str, out: str,
    python: str = sys.executable,
) -> list[list[str]]:  # fmt: skip
    """tools/eval_choice.py on the base, then on the base with the adapter: before and after training."""
    common = ["--benchmark", benchmark, "--data_dir", data_dir, "--split", split, "--ntrain", str(int(ntrain))]
    if subjects.strip():
        common += ["--subjects", subjects.strip()]
    tool = script_path("tools/eval_choice.py")
    return [
        [python, tool, "--base_model", base_model, *common, "--output_dir", f"{out}/base"],
        [python, tool, "--base_model", base_model, "--lora_weights", adapter, *common, "--output_dir", f"{out}/adapter"],
    ]


def choice_results(out: str) -> dict[str, dict[str, Any]]:
    """What eval_choice wrote for the base and the adapter so far: results.json and the predictions."""
    found = {}
    for side in ("base", "adapter"):
        folder = Path(out) / side
        predictions = []
        if (folder / "predictions.jsonl").is_file():
            for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    predictions.append(json.loads(line))
        results = json.loads((folder / "results.json").read_text(encoding="utf-8")) if (folder / "results.json").is_file() else None
        found[side] = {"results": results, "predictions": predictions}
    return found


def judge_steps(
    base_model: str, adapter: str, questions: str, api_base: str, judge_model: str, out: str, python: str = sys.executable
) -> list[list[str]]:
    """Answers of the base and of the adapter (tools/gen_model_answer.py), then the judge at an
    OpenAI-compatible endpoint compares them pairwise (tools/eval_judge.py; its key from OPENAI_API_KEY
    in the board's environment, never on the command line)."""
    answers = f"{out}/answers"  # the judge's own output (judgments, results) goes to `out` itself
    gen = script_path("tools/gen_model_answer.py")
    return [
        [python, gen, "--base_model", base_model, "--questions", questions, "--model_id", "base", "--answer_file", f"{answers}/base.jsonl"],
        [python, gen, "--base_model", base_model, "--lora_weights", adapter, "--questions", questions, "--model_id", "adapter",
         "--answer_file", f"{answers}/adapter.jsonl"],
        [python, script_path("tools/eval_judge.py"), "--mode", "pairwise", "--questions", questions,
         "--answers", f"{answers}/adapter.jsonl", "--answers_b", f"{answers}/base.jsonl",
         "--judge_api_base", api_base, "--judge_model", judge_model, "--output_dir", out],
    ]  # fmt: skip


EXPORT_FORMATS = ("hf", "pth", "gguf", "ollama")


def export_files(merged: str, fmt: str, outtype: str) -> str | None:
    """The .gguf file a GGUF or Ollama export writes (an Ollama export: in its own folder, beside its Modelfile)."""
    merged = merged.rstrip("/")
    if fmt == "gguf":
        return f"{merged}-{outtype}.gguf"
    if fmt == "ollama":
        return f"{merged}-ollama/{Path(merged).name}-{outtype}.gguf"
    return None


def export_steps(
    base_model: str, adapter: str, merged: str, fmt: str, outtype: str = "q4_0", python: str = sys.executable
) -> list[list[str]]:
    """merge_lora.py (HF safetensors, or Meta .pth), then for GGUF tools/convert_to_gguf.py on the merged
    folder (an Ollama Modelfile beside the file with --ollama_modelfile true); a merged HF folder that
    is already there is converted as it is."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    merge = [python, script_path("merge_lora.py"), "--base_model", base_model, "--lora_weights", adapter, "--output_dir", merged]
    if fmt == "pth":
        return [[*merge, "--output_type", "pth"]]
    if fmt == "hf":
        return [merge]
    merged_there = (Path(merged) / "config.json").is_file() and any(Path(merged).glob("*.safetensors"))
    convert = [python, script_path("tools/convert_to_gguf.py"), "--model_dir", merged, "--outfile", export_files(merged, fmt, outtype),
               "--outtype", outtype]  # fmt: skip
    if fmt == "ollama":
        convert += ["--ollama_modelfile", "true"]
    return [convert] if merged_there else [merge, convert]
