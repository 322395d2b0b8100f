"""What the training board (board.py) does besides drawing: the command a page's settings make,
runs of that command as child processes kept in a registry on disk, their progress read from
the files the scripts already write, and what the page shows about a base model and a data file.

The board has no training code of its own: a run is `python finetune.py --flag value ...` (or
finetune_chat.py, tools/pretrain.py, merge_lora.py), exactly the argv shown in the page. A run's
record (`RUNS_DIR/<id>/run.json`) and its console output (`RUNS_DIR/<id>/console.log`) live on
disk and the child runs in its own session, so a reloaded page, a closed browser or a restarted
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


STAGES = {
    "sft": Stage("sft", "finetune.py"),
    "chat_sft": Stage("chat_sft", "finetune_chat.py", template="chinese-vicuna-chat"),
    "pretrain": Stage("pretrain", "tools/pretrain.py", data_flag="dataset_dir", length_flag="block_size", template=None),
}

# The page's settings, in the order their flags appear on the command line (stage-specific names
# for data and length are mapped by `stage_flags`). A value None or "" is left out (the script's default).
SETTINGS = (
    "base_model", "prompt_template", "data", "output_dir", "length", "num_epochs", "max_steps", "learning_rate",
    "micro_batch_size", "batch_size", "val_set_size", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "precision", "warmup_steps", "logging_steps", "save_steps", "seed",
)  # fmt: skip


def stage_flags(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as the stage's flags (name → typed value), in command-line order; what a flags file holds."""
    spec = STAGES[stage]
    flags: dict[str, Any] = {}
    for key in SETTINGS:
        value = settings.get(key)
        if value is None or value == "" or (key == "max_steps" and int(value) <= 0):
            continue
        if key == "prompt_template" and spec.template is None:
            continue
        name = {"data": spec.data_flag, "length": spec.length_flag}.get(key, key)
        flags[name] = value
    return flags


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
    """(stage, page settings) of a flags file: pretraining by its --dataset_dir, chat SFT by its data."""
    if "dataset_dir" in flags:
        stage = "pretrain"
    else:
        stage = "sft"
        data = flags.get("data_path")
        if data:
            from chinese_vicuna.datatools.doctor import data_kind

            with contextlib.suppress(UserError):  # the page's data check names the problem
                stage = "chat_sft" if data_kind(data) == "chat" else "sft"
    spec = STAGES[stage]
    back = {spec.data_flag: "data", spec.length_flag: "length"}
    return stage, {back.get(name, name): value for name, value in flags.items()}


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

    def start(self, kind: str, argv: list[str], output_dir: str, run_id: str | None = None) -> dict[str, Any]:
        """Start `argv` as a child (a new run, or `run_id` again: a resume); refused while another run writes `output_dir`."""
        with self._lock:
            busy = self.running_into(output_dir)
            if busy is not None:
                raise UserError(
                    f"--output_dir {output_dir} is being written by run {busy['id']} (pid {busy['pid']}): "
                    "stop it first, or choose another --output_dir"
                )
            run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            folder = self.root / run_id
            folder.mkdir(parents=True, exist_ok=True)
            console = (folder / "console.log").open("ab")
            console.write(f"\n$ {shown_command(argv)}\n".encode())
            console.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
            console.close()
            run = {
                "id": run_id,
                "kind": kind,
                "argv": argv,
                "command": shown_command(argv),
                "output_dir": output_dir,
                "pid": proc.pid,
                "started": time.time(),
                "status": "running",
                "returncode": None,
            }
            self._save(run)
        threading.Thread(target=self._wait, args=(proc, run_id), daemon=True).start()
        return run

    def _wait(self, proc: subprocess.Popen, run_id: str) -> None:
        code = proc.wait()
        with self._lock:
            run = json.loads(self._file(run_id).read_text(encoding="utf-8"))
            if run["pid"] != proc.pid:
                return  # a newer attempt of this run
            run["returncode"] = code
            run["status"] = "finished" if code == 0 else "stopped" if code in (130, -signal.SIGINT) else "failed"
            self._save(run)

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
    """Step, total steps, ETA, latest loss and learning rate, and the loss curve of a run."""
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
    out: dict[str, Any] = {
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


def model_summary(base_model: str) -> dict[str, Any]:
    """Architecture, size, vocabulary and the template a base model carries (a local folder)."""
    folder = Path(base_model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"--base_model {base_model}: no config.json there (give a Hugging Face model folder)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import saved_template

    tokenizer = load_tokenizer(base_model)
    saved = saved_template([folder], tokenizer)
    if saved is not None:
        carries, reason = saved.name, "saved"
    elif getattr(tokenizer, "chat_template", None):
        carries, reason = "auto", "chat_template"
    else:
        carries, reason = None, "none"
    return {
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


def preview_html(data_path: str, tokenizer: Any, template: Any, stage: str, records: int = 3) -> str:
    """The first records as the model sees them: the rendered text, the part without loss greyed."""
    from chinese_vicuna.data.formats import check_messages, detect_format, to_messages
    from chinese_vicuna.data.records import data_files, read_records, validate_instruction

    blocks = []
    for record in read_records(data_files(data_path)[0])[:records]:
        if stage == "chat_sft":
            fmt = detect_format(record.data)
            if fmt is None:
                raise UserError(f"{record.where}: not a conversation in a known format")
            messages, _ = check_messages(to_messages(record, fmt), record.where)
            segments = template.chat_segments(messages, add_generation_prompt=False)
        else:
            item = validate_instruction(record)
            segments = template.instruction_segments(item["instruction"], item["input"], item["output"])
        body = "".join(f'<span class="{"trained" if s.trainable else "masked"}">{html.escape(s.text)}</span>' for s in segments)
        blocks.append(f'<div class="where">{html.escape(record.where)}</div><pre class="sample">{body}</pre>')
    return "".join(blocks)


def check_data(data_path: str, tokenizer: Any, template: Any, cutoff_len: int) -> dict[str, Any]:
    """The data doctor's report (no near-duplicate search: seconds); a UserError for a file training would refuse."""
    from chinese_vicuna.datatools.doctor import diagnose

    report, _ = diagnose(data_path, tokenizer, template, cutoff_len, threshold=None)
    if report["invalid_records"]:
        raise UserError(report["invalid_examples"][0])
    return report
