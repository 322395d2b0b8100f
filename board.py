"""The training board: a web page that configures a fine-tune, shows its command line, runs
that very command and watches it, then chats with the result and exports it.

    python board.py                                  # http://127.0.0.1:7860, in Chinese
    python board.py --ui_language en --runs_dir board-runs

The page has no training path of its own: Start runs `python finetune.py --flag value ...`
(finetune_chat.py for chat SFT, tools/pretrain.py for continued pretraining, finetune_dpo.py for
preference training, finetune_grpo.py for RL with verifiable rewards), byte for byte the command it shows; Evaluate runs tools/eval_choice.py (and
gen_model_answer.py + eval_judge.py) on the base and on the adapter, Export runs merge_lora.py and
tools/convert_to_gguf.py the same way. Runs are kept in --runs_dir and run in their own session,
so a reloaded page or a closed browser finds them still going (chinese_vicuna/board.py; docs/board.md).
"""

# No `from __future__ import annotations`: Gradio passes `gr.Request` by annotation (see chat.py).
import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chinese_vicuna.args import BaseModelArguments, ServerArguments, UIArguments, parse_args
from chinese_vicuna.board import (
    EXPORT_FORMATS,
    STAGES,
    Runs,
    chained_command,
    check_data,
    check_rl_data,
    choice_eval_steps,
    choice_results,
    command_argv,
    export_files,
    export_steps,
    judge_steps,
    local_model_folder,
    loss_plot,
    memory_estimate,
    memory_text,
    model_summary,
    preview_html,
    progress,
    read_flags_file,
    run_memory,
    settings_of_flags,
    shown_command,
    stage_flags,
    write_flags_file,
)
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.infer.i18n import Messages
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.prompts import available_templates, load_template

logger = logging.getLogger("board")

CSS = ".masked { color: #9aa0a6; } .trained { color: inherit; font-weight: 600; } pre.sample { white-space: pre-wrap; }"


@dataclass
class BoardArguments:
    runs_dir: str = field(
        default="board-runs", metadata={"help": "Where the board keeps its runs (a folder per run: argv, status, console log)."}
    )
    auth: str | None = field(default=None, metadata={"help": "user:password the page asks for (default: none; the page binds 127.0.0.1)."})


DEFAULTS: dict[str, Any] = {
    "prompt_template": "alpaca", "data": "sample/instruct/data_sample.jsonl", "output_dir": "lora-Vicuna", "length": 256,
    "num_epochs": 3, "max_steps": 0, "learning_rate": 3e-4, "micro_batch_size": 4, "batch_size": 128, "val_set_size": 0,
    "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_modules": "q_proj,v_proj", "precision": "auto",
    "warmup_steps": 100, "logging_steps": 10, "save_steps": 200, "seed": 42,
}  # fmt: skip
STAGE_DATA = {
    "sft": "sample/instruct/data_sample.jsonl", "chat_sft": "sample/chat/chat_sample.jsonl", "pretrain": "sample/pretrain",
    "dpo": "sample/preference/pairs_sample.jsonl", "grpo": "sample/rl/arithmetic.jsonl",
}  # fmt: skip
# the preference stage's own settings (finetune_dpo.py's flags; the page shows them for that stage)
PREFERENCE_DEFAULTS: dict[str, Any] = {"lora_weights": "", "pref_loss": "sigmoid", "pref_beta": 0.1, "pref_ftx": 0.0}
# the RL stage's own settings (finetune_grpo.py's flags and defaults)
RL_DEFAULTS: dict[str, Any] = {"reward_funcs": "accuracy", "num_generations": 8, "max_completion_length": 256, "grpo_loss": "grpo", "beta": 0.04}  # fmt: skip
# what a stage brings when the user picks it, besides its data: finetune_grpo.py's own defaults (RL takes
# a far smaller learning rate than SFT, and counts prompts in its batches); the other stages bring DEFAULTS'
STAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "grpo": {"length": 512, "num_epochs": 1, "learning_rate": 1e-5, "micro_batch_size": 2, "batch_size": 16, "warmup_steps": 0,
             "logging_steps": 1, "save_steps": 50},
}  # fmt: skip
# the number fields a change of stage sets (length is renamed per stage; val_set_size is held at 0 where
# the script takes no held-out set)
SWITCHED = tuple(dict.fromkeys(["length", "val_set_size", *(key for changes in STAGE_SETTINGS.values() for key in changes)]))
NUMBERS = ("length", "num_epochs", "max_steps", "learning_rate", "micro_batch_size", "batch_size", "val_set_size", "lora_r",
           "lora_alpha", "lora_dropout", "warmup_steps", "logging_steps", "save_steps", "seed")  # fmt: skip
INTEGERS = {"length", "max_steps", "micro_batch_size", "batch_size", "val_set_size", "lora_r", "lora_alpha", "warmup_steps",
            "logging_steps", "save_steps", "seed"}  # fmt: skip
FIELDS = ("base_model", "prompt_template", "data", "output_dir", *NUMBERS, "lora_target_modules", "precision", *PREFERENCE_DEFAULTS,
          *RL_DEFAULTS)  # fmt: skip


@functools.lru_cache(maxsize=4)
def tokenizer_of(base_model: str) -> Any:
    from chinese_vicuna.model.loading import load_tokenizer

    return load_tokenizer(base_model)


def typed(values: dict[str, Any]) -> dict[str, Any]:
    """The page's values with their flag types (gr.Number gives floats)."""
    out = dict(values)
    for key in (*NUMBERS, "pref_beta", "pref_ftx", "num_generations", "max_completion_length", "beta"):
        if out.get(key) is not None:
            out[key] = int(out[key]) if key in INTEGERS or key in ("num_generations", "max_completion_length") else float(out[key])
    return out


def build_page(runs: Runs, first_base: str, language: str = "zh") -> Any:
    from chinese_vicuna.infer.webui import gr, page_error
    from chinese_vicuna.train.grpo import GRPO_LOSSES
    from chinese_vicuna.train.preference import PREFERENCE_LOSSES

    t = Messages(language)
    engines: dict[tuple[str, str], Any] = {}

    def settings_of(stage: str, *values: Any) -> dict[str, Any]:
        return typed(dict(zip(FIELDS, values, strict=True)))

    def command_of(stage: str, *values: Any) -> str:
        return shown_command(command_argv(stage, stage_flags(stage, settings_of(stage, *values))))

    def estimate_of(stage: str, *values: Any) -> str:
        """The memory these settings take (chinese_vicuna/train/memory.py), as one line."""
        s = settings_of(stage, *values)
        try:
            estimate = memory_estimate(s["base_model"], stage, s)
        except UserError as exc:
            return t("board.memory_unknown", reason=str(exc))
        parts = dict(estimate.rows())
        return t(
            "board.memory", total=memory_text(estimate.total), weights=memory_text(parts["weights"]), adapter=memory_text(parts["adapter + gradients + AdamW"]),
            activations=memory_text(parts["activations"]), logits=memory_text(parts["logits (loss)"]), framework=memory_text(parts["framework"]),
            device="GPU" if _cuda() else "CPU",
        )  # fmt: skip

    def check(stage: str, *values: Any) -> tuple[str, str, str, str]:
        return (*inspect(stage, *values), "")

    def inspect(stage: str, *values: Any) -> tuple[str, str, str]:
        """(model summary, data preview, doctor's line): what the page shows before a start."""
        s = settings_of(stage, *values)
        try:
            info = model_summary(s["base_model"])
        except UserError as exc:
            return f"✗ {exc}", "", ""
        size = f"{info['parameters'] / 1e6:.2f}M" if info["parameters"] else "?"
        model_md = t(
            "board.model_info", architecture=info["architecture"], size=size, layers=info["layers"], hidden=info["hidden_size"],
            context=info["context"], vocab=info["vocab_size"], tokenizer=info["tokenizer_size"],
            template=info["template"] or "—", reason=t("board.template_reason." + info["template_reason"]),
        )  # fmt: skip
        if info["folder"] != s["base_model"]:
            model_md += t("board.from_cache", folder=info["folder"])
        if STAGES[stage].template is None:
            return model_md, "", t("board.no_doctor")
        try:
            tokenizer = tokenizer_of(info["folder"])
            template = load_template(s["prompt_template"] or STAGES[stage].template, tokenizer)
            if stage == "grpo":
                report = check_rl_data(s["data"], tokenizer, template, s["length"], s["reward_funcs"] or "accuracy")
            else:
                report = check_data(s["data"], tokenizer, template, s["length"], stage)
            preview = preview_html(s["data"], tokenizer, template, stage)
        except UserError as exc:
            return model_md, "", f"✗ {exc}"
        if stage == "grpo":
            doctor = t(
                "board.doctor_prompts", records=report["records"], prompts=report["prompts"], too_long=report["too_long"],
                cutoff=report["max_prompt_length"], longest=report["longest"], rewards=", ".join(report["rewards"]),
            )  # fmt: skip
            return model_md, preview, doctor
        if stage == "dpo":
            doctor = t(
                "board.doctor_pairs", records=report["records"], pairs=report["pairs"], kto=report["kto_samples"],
                identical=report["identical_answers"], truncated=report["truncated"], cutoff=report["cutoff_len"],
            )  # fmt: skip
            return model_md, preview, doctor
        whole = report["tokens"]["whole"]
        doctor = t(
            "board.doctor", records=report["valid_records"], truncated=report["truncated"], cutoff=report["cutoff_len"],
            no_trainable=report["no_trainable"], p95=whole.get("p95", 0), longest=whole.get("max", 0),
        )  # fmt: skip
        return model_md, preview, doctor

    def run_choices(selected: str | None = None) -> Any:
        all_runs = runs.all()
        # the status is in the live list below (a label here would be stale until the next choice)
        choices = [(f"{r['id']} · {r['kind']} · {r['output_dir']}", r["id"]) for r in all_runs]
        ids = [r["id"] for r in all_runs]
        return gr.update(choices=choices, value=selected if selected in ids else (ids[0] if ids else None))

    def start(stage: str, *values: Any) -> tuple[str, str, str, str, Any]:
        model_md, preview, doctor = inspect(stage, *values)
        if model_md.startswith("✗") or doctor.startswith("✗"):
            # nothing starts: the same one line the script would end with
            return model_md, preview, doctor, (doctor if doctor.startswith("✗") else model_md), gr.update()
        s = settings_of(stage, *values)
        argv = command_argv(stage, stage_flags(stage, s))
        try:
            run = runs.start(stage, argv, s["output_dir"])
        except UserError as exc:
            return model_md, preview, doctor, f"✗ {exc}", gr.update()
        return model_md, preview, doctor, t("board.started", run=run["id"]), run_choices(run["id"])

    def save_flags(path: str, stage: str, *values: Any) -> str:
        try:
            written = write_flags_file(path, stage_flags(stage, settings_of(stage, *values)))
        except (UserError, OSError) as exc:
            raise page_error(exc) from None
        script = STAGES[stage].script
        return t("board.flags_saved", path=written, command=f"python {script} {written}")

    def load_flags(path: str) -> list[Any]:
        try:
            stage, settings = settings_of_flags(read_flags_file(path))
        except UserError as exc:
            raise page_error(exc) from None
        fields = [field_update(stage, key, settings[key]) if key in settings else field_update(stage, key) for key in FIELDS]
        return [stage, *fields, *stage_rows(stage), stage, t("board.flags_loaded", path=path)]

    def field_update(stage: str, key: str, *value: Any) -> Any:
        """A field's new value (none: kept) as a stage shows it: the length setting under the stage's flag
        name, val_set_size held at 0 where the stage's script takes no held-out set."""
        spec = STAGES[stage]
        if key == "length":
            return gr.update(label=t(f"board.length.{spec.length_flag}"), **({"value": value[0]} if value else {}))
        if key == "val_set_size":
            return gr.update(value=0, interactive=False) if not spec.evaluates else gr.update(interactive=True, **({"value": value[0]} if value else {}))  # fmt: skip
        return value[0] if value else gr.update()

    def stage_rows(stage: str) -> tuple[Any, Any, Any]:
        """The rows of a stage's own fields: the starting adapter, preference training's, RL's."""
        own = STAGES[stage].own
        return gr.update(visible="lora_weights" in own), gr.update(visible="pref_loss" in own), gr.update(visible="reward_funcs" in own)

    def switch_stage(stage: str, previous: str) -> tuple[Any, ...]:
        """The picked stage's template, data and rows; its own defaults where it or the stage left has
        some (into or out of RL), else the numbers the user set stay."""
        spec = STAGES[stage]
        brings = {**{key: DEFAULTS[key] for key in SWITCHED}, **STAGE_SETTINGS.get(stage, {})}
        renewed = stage in STAGE_SETTINGS or previous in STAGE_SETTINGS
        return (
            gr.update(value=spec.template, interactive=spec.template is not None), STAGE_DATA[stage], *stage_rows(stage),
            *[field_update(stage, key, brings[key]) if renewed else field_update(stage, key) for key in SWITCHED], stage,
        )  # fmt: skip

    def watch(run_id: str | None) -> tuple[str, Any, str, str]:
        """(progress line, loss curve, command, console tail) of a run; polled by the page's timer."""
        if not run_id:
            return t("board.no_run"), None, "", ""
        try:
            run = runs.get(run_id)
        except UserError as exc:
            return f"✗ {exc}", gr.update(), "", ""
        console = runs.console(run_id)
        running = run["status"] == "running"
        if run["kind"] in STAGES:
            p = progress(run, console)
            line = t(
                "board.progress", status=t("board.status." + run["status"]), step=p["step"], total=p["total"] or "?",
                loss="—" if p.get("loss") is None else f"{p['loss']:.4f}",
                lr="—" if p.get("learning_rate") is None else f"{p['learning_rate']:.3g}",
                speed="—" if p.get("tokens_per_second") is None else f"{p['tokens_per_second']:.0f}",
                eta=(p.get("eta") or "—") if running else "—", output_dir=run["output_dir"],
            )  # fmt: skip
            curve = loss_plot(run, p["curve"], runs.root / run["id"])
        else:  # an evaluation or an export: its commands, one after the other
            line = t(
                "board.progress_steps", status=t("board.status." + run["status"]), kind=t("board.kind." + run["kind"]),
                step=run.get("step", 0) + 1, steps=len(run.get("steps", [run["argv"]])), output_dir=run["output_dir"],
            )  # fmt: skip
            curve = None
        if running:
            memory = run_memory(run["pid"])
            line += t("board.run_memory", rss=memory_text(memory["rss"]))
            if memory["gpu"] is not None:
                line += t("board.gpu_memory", gpu=memory_text(memory["gpu"]))
        if run["returncode"] is not None:
            line += t("board.exit", code=run["returncode"])
        return line, curve, run["command"], console

    def runs_list() -> str:
        """Every run with its status and output folder; polled by the page's timer."""
        rows = [
            f"| {r['id']} | {t('board.kind.' + r['kind']) if r['kind'] not in STAGES else t('board.stage.' + r['kind'])} | "
            f"{t('board.status.' + r['status'])} | `{r['output_dir']}` |"
            for r in runs.all()
        ]
        if not rows:
            return ""
        return "\n".join(
            [f"| {t('board.run')} | {t('board.kind')} | {t('board.status')} | {t('board.output_dir')} |", "|---|---|---|---|", *rows]
        )

    def stop(run_id: str | None) -> tuple[str, Any]:
        try:
            runs.stop(run_id or "")
        except UserError as exc:
            raise page_error(exc) from None
        return t("board.stopping", run=run_id), run_choices(run_id)

    def resume(run_id: str | None) -> tuple[str, Any]:
        try:
            run = runs.resume(run_id or "")
        except UserError as exc:
            raise page_error(exc) from None
        return t("board.resumed", run=run["id"]), run_choices(run["id"])

    def use_run(run_id: str | None) -> tuple[Any, ...]:
        """A training run's output folder is the adapter the chat, evaluation and export tabs use."""
        try:
            run = runs.get(run_id or "")
        except UserError:
            return gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
        if run["kind"] not in STAGES:
            return gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
        out = run["output_dir"].rstrip("/")
        return out, out, f"{out}-eval", out, f"{out}-merged"

    def respond(message: str, history: list[dict[str, str]], base: str, adapter: str) -> Iterator[tuple[list, list, str]]:
        from chinese_vicuna.infer.engine import INSTRUCTION, Engine

        if not (message or "").strip():
            raise page_error(t("chat.need_message"))
        key = (base, adapter)
        if key not in engines:
            engines.clear()  # one model in memory at a time
            try:
                folder = str(local_model_folder(base))
                engines[key] = Engine(folder, lora_weights=adapter or None, precision="fp32" if not _cuda() else "auto", kind=INSTRUCTION)
            except UserError as exc:
                raise page_error(exc) from None
        engine = engines[key]
        # an instruction template answers one instruction; a chat template the whole conversation
        turns = [*history, {"role": "user", "content": message}] if engine.template.is_chat else [{"role": "user", "content": message}]
        shown = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        text = ""
        for piece in engine.stream(turns, max_new_tokens=256):
            text += piece
            shown[-1] = {"role": "assistant", "content": text}
            yield shown, history, ""
        yield shown, shown, ""

    def start_steps(kind: str, steps: list[list[str]], out: str) -> tuple[str, Any]:
        try:
            run = runs.start(kind, steps[0], out, then=steps[1:])
        except UserError as exc:
            raise page_error(exc) from None
        return t("board.started", run=run["id"]), run_choices(run["id"])

    # evaluation: the multiple-choice subset and the judge, each on the base and then with the adapter
    def choice_steps(
        base: str, adapter: str, bench: str, data_dir: str, split: str, ntrain: float, subjects: str, out: str
    ) -> list[list[str]]:
        return choice_eval_steps(base, adapter, bench, data_dir, split, int(ntrain or 0), subjects or "", f"{out.rstrip('/')}/choice")

    def choice_command(*values: Any) -> str:
        return chained_command(choice_steps(*values))

    def run_choice(*values: Any) -> tuple[str, Any]:
        if not values[1]:
            raise page_error(t("board.need_adapter"))
        return start_steps("eval", choice_steps(*values), f"{values[-1].rstrip('/')}/choice")

    def choice_table(out: str) -> str:
        """Accuracy before/after per subject, and each question's choices, from what eval_choice wrote."""
        found = choice_results(f"{(out or '').rstrip('/')}/choice")
        base, adapter = found["base"], found["adapter"]
        if not base["predictions"] and not adapter["predictions"]:
            return ""

        def pct(results: dict | None, subject: str | None = None) -> str:
            if results is None:
                return "…"
            value = results["average"] if subject is None else results["subjects"].get(subject)
            return "—" if value is None else f"{value:.1f}%"

        subjects = sorted({r["subject"] for r in base["predictions"] + adapter["predictions"]})
        lines = [f"| {t('board.subject')} | {t('board.before')} | {t('board.after')} |", "|---|---|---|"]
        lines += [f"| {s} | {pct(base['results'], s)} | {pct(adapter['results'], s)} |" for s in subjects]
        lines += [f"| **{t('board.average')}** | **{pct(base['results'])}** | **{pct(adapter['results'])}** |", ""]
        by_base = {(r["subject"], str(r["id"])): r for r in base["predictions"]}
        by_adapter = {(r["subject"], str(r["id"])): r for r in adapter["predictions"]}
        lines += [f"| {t('board.question')} | {t('board.answer')} | {t('board.before')} | {t('board.after')} |", "|---|---|---|---|"]
        for key in sorted(set(by_base) | set(by_adapter)):
            answer = (by_base.get(key) or by_adapter[key]).get("answer") or "?"
            lines.append(
                f"| {key[0]} #{key[1]} | {answer} | {by_base.get(key, {}).get('prediction', '…')} | {by_adapter.get(key, {}).get('prediction', '…')} |"
            )
        return "\n".join(lines)

    def judge_of(base: str, adapter: str, questions: str, api_base: str, judge_model: str, out: str) -> list[list[str]]:
        return judge_steps(base, adapter, questions, api_base, judge_model, f"{out.rstrip('/')}/judge")

    def judge_command(*values: Any) -> str:
        return chained_command(judge_of(*values))

    def run_judge(*values: Any) -> tuple[str, Any]:
        if not values[1]:
            raise page_error(t("board.need_adapter"))
        if not values[3]:
            raise page_error(t("board.need_endpoint"))
        return start_steps("eval", judge_of(*values), f"{values[-1].rstrip('/')}/judge")

    def judge_summary(out: str) -> str:
        path = Path((out or "").rstrip("/")) / "judge" / "results.json"
        if not path.is_file():
            return ""
        r = json.loads(path.read_text(encoding="utf-8"))
        return t("board.judge_result", win_a=r.get("win_a", 0), win_b=r.get("win_b", 0), tie=r.get("tie", 0), failed=r.get("failed", 0))

    def eval_results(out: str) -> tuple[str, str]:
        return choice_table(out), judge_summary(out)

    # export: merge → HF / Meta .pth, GGUF at a quantization, GGUF + an Ollama Modelfile
    def export_command(base: str, adapter: str, merged: str, fmt: str, outtype: str) -> str:
        try:
            return chained_command(export_steps(base, adapter, merged, fmt, outtype))
        except UserError as exc:
            return f"✗ {exc}"

    def export(base: str, adapter: str, merged: str, fmt: str, outtype: str) -> tuple[str, Any]:
        if not adapter or not merged:
            raise page_error(t("board.need_adapter"))
        return start_steps("export", export_steps(base, adapter, merged, fmt, outtype), merged)

    def export_result(merged: str, fmt: str, outtype: str) -> str:
        target = export_files(merged or "", fmt, outtype) or merged
        if not target or not Path(target).exists():
            return ""
        folder = Path(target).parent if Path(target).is_file() else Path(target)
        files = [
            f for f in sorted(folder.iterdir()) if f.is_file() and (f == Path(target) or folder == Path(target) or f.name == "Modelfile")
        ]
        return t("board.exported", files=", ".join(f"`{f}` ({f.stat().st_size / 2**20:.1f} MiB)" for f in files))

    with gr.Blocks(title=t("board.title")) as demo:
        gr.Markdown(f"## {t('board.title')}\n{t('board.intro')}")
        with gr.Tabs():
            with gr.Tab(t("board.tab.configure"), id="configure"):
                with gr.Row():
                    base = gr.Textbox(first_base, label=t("board.base_model"), elem_id="base_model", scale=3)
                    stage = gr.Radio(
                        [(t(f"board.stage.{k}"), k) for k in STAGES], value="sft", label=t("board.stage"), elem_id="stage", scale=2
                    )
                model_info = gr.Markdown(elem_id="model-info")
                with gr.Row():
                    template = gr.Dropdown(
                        available_templates(), value=DEFAULTS["prompt_template"], label=t("board.template"), elem_id="template"
                    )
                    data = gr.Textbox(DEFAULTS["data"], label=t("board.data"), elem_id="data_path", scale=2)
                    output_dir = gr.Textbox(DEFAULTS["output_dir"], label=t("board.output_dir"), elem_id="output_dir", scale=2)
                with gr.Row(visible=False) as start_row:  # the starting adapter of preference training and RL
                    lora_weights = gr.Textbox(label=t("board.lora_weights"), elem_id="lora_weights", scale=2)
                with gr.Row(visible=False) as preference_row:  # finetune_dpo.py's own flags
                    pref_loss = gr.Dropdown(list(PREFERENCE_LOSSES), value="sigmoid", label=t("board.pref_loss"), elem_id="pref_loss")
                    pref_beta = gr.Number(PREFERENCE_DEFAULTS["pref_beta"], label=t("board.pref_beta"), elem_id="pref_beta")
                    pref_ftx = gr.Number(PREFERENCE_DEFAULTS["pref_ftx"], label=t("board.pref_ftx"), elem_id="pref_ftx")
                with gr.Row(visible=False) as rl_row:  # finetune_grpo.py's own flags
                    reward_funcs = gr.Textbox(RL_DEFAULTS["reward_funcs"], label=t("board.reward_funcs"), elem_id="reward_funcs", scale=2)
                    num_generations = gr.Number(
                        RL_DEFAULTS["num_generations"], label=t("board.num_generations"), elem_id="num_generations", precision=0
                    )
                    max_completion_length = gr.Number(
                        RL_DEFAULTS["max_completion_length"], label=t("board.max_completion_length"), elem_id="max_completion_length",
                        precision=0,
                    )  # fmt: skip
                    grpo_loss = gr.Dropdown(
                        list(GRPO_LOSSES), value=RL_DEFAULTS["grpo_loss"], label=t("board.grpo_loss"), elem_id="grpo_loss"
                    )
                    beta = gr.Number(RL_DEFAULTS["beta"], label=t("board.beta"), elem_id="beta")
                numbers: dict[str, Any] = {}
                with gr.Row():
                    for key in ("length", "num_epochs", "max_steps", "learning_rate", "micro_batch_size", "batch_size", "val_set_size"):
                        numbers[key] = gr.Number(
                            DEFAULTS[key], label=t(f"board.{key}" if key != "length" else "board.length.cutoff_len"), elem_id=key,
                            precision=0 if key in INTEGERS else None,
                        )  # fmt: skip
                with gr.Row():
                    for key in ("lora_r", "lora_alpha", "lora_dropout"):
                        numbers[key] = gr.Number(
                            DEFAULTS[key], label=t(f"board.{key}"), elem_id=key, precision=0 if key in INTEGERS else None
                        )
                    targets = gr.Textbox(
                        DEFAULTS["lora_target_modules"], label=t("board.lora_target_modules"), elem_id="lora_target_modules"
                    )
                    precision = gr.Dropdown(
                        ["auto", "fp32", "bf16", "fp16", "8bit", "4bit"], value="auto", label=t("board.precision"), elem_id="precision"
                    )
                with gr.Row():
                    for key in ("warmup_steps", "logging_steps", "save_steps", "seed"):
                        numbers[key] = gr.Number(DEFAULTS[key], label=t(f"board.{key}"), elem_id=key, precision=0)
                memory = gr.Markdown(elem_id="memory")
                command = gr.Textbox(label=t("board.command"), elem_id="command", interactive=False, buttons=["copy"], lines=2)
                with gr.Row():
                    check_btn = gr.Button(t("board.check"), elem_id="check-btn")
                    start_btn = gr.Button(t("board.start"), variant="primary", elem_id="start-btn")
                status = gr.Markdown(elem_id="status")
                doctor = gr.Markdown(elem_id="doctor")
                preview = gr.HTML(elem_id="preview")
                with gr.Row():
                    flags_path = gr.Textbox("board-flags.yaml", label=t("board.flags_file"), elem_id="flags_file", scale=3)
                    save_btn = gr.Button(t("board.save_flags"), elem_id="save-flags")
                    load_btn = gr.Button(t("board.load_flags"), elem_id="load-flags")
            with gr.Tab(t("board.tab.runs"), id="runs"):
                run = gr.Dropdown([], label=t("board.run"), elem_id="run")
                progress_md = gr.Markdown(elem_id="progress")
                with gr.Row():
                    stop_btn = gr.Button(t("stop"), elem_id="stop-btn")
                    resume_btn = gr.Button(t("board.resume"), elem_id="resume-btn")
                run_status = gr.Markdown(elem_id="run-status")
                plot = gr.Image(label=t("board.loss_curve"), elem_id="loss-plot", type="filepath", interactive=False, height=320)
                run_command = gr.Textbox(label=t("board.command"), elem_id="run-command", interactive=False, buttons=["copy"], lines=2)
                console = gr.Textbox(
                    label=t("board.console"), elem_id="console", lines=10, max_lines=10, interactive=False, autoscroll=True
                )
                all_runs = gr.Markdown(elem_id="runs-list")
            with gr.Tab(t("board.tab.chat"), id="chat"):
                adapter = gr.Textbox(label=t("board.adapter"), elem_id="chat-adapter")
                history = gr.State([])
                chatbot = gr.Chatbot(label=t("chat.conversation"), height=320, elem_id="chatbot")
                with gr.Row():
                    message = gr.Textbox(placeholder=t("chat.message_placeholder"), show_label=False, scale=5, elem_id="message")
                    send = gr.Button(t("chat.send"), variant="primary", scale=1, elem_id="send-btn")
            with gr.Tab(t("board.tab.evaluate"), id="evaluate"):
                with gr.Row():
                    eval_adapter = gr.Textbox(label=t("board.adapter"), elem_id="eval-adapter", scale=2)
                    eval_dir = gr.Textbox(label=t("board.eval_dir"), elem_id="eval-dir", scale=2)
                gr.Markdown(f"### {t('board.choice_eval')}")
                with gr.Row():
                    bench = gr.Dropdown(["ceval", "cmmlu", "mmlu"], value="ceval", label=t("board.benchmark"), elem_id="benchmark")
                    bench_dir = gr.Textbox("sample/eval/ceval", label=t("board.bench_dir"), elem_id="bench-dir", scale=2)
                    split = gr.Dropdown(["val", "test", "dev"], value="val", label=t("board.split"), elem_id="split")
                    ntrain = gr.Number(0, label=t("board.ntrain"), elem_id="ntrain", precision=0)
                    subjects = gr.Textbox("", label=t("board.subjects"), elem_id="subjects", scale=2)
                choice_cmd = gr.Textbox(label=t("board.command"), elem_id="choice-command", interactive=False, buttons=["copy"], lines=2)
                choice_btn = gr.Button(t("board.run_eval"), variant="primary", elem_id="choice-btn")
                choice_md = gr.Markdown(elem_id="choice-results")
                gr.Markdown(f"### {t('board.judge_eval')}")
                with gr.Row():
                    questions = gr.Textbox("sample/eval/mt_bench/question.jsonl", label=t("board.questions"), elem_id="questions", scale=2)
                    judge_base = gr.Textbox("", label=t("board.judge_api_base"), elem_id="judge-api-base", scale=2)
                    judge_model = gr.Textbox("gpt-4", label=t("board.judge_model"), elem_id="judge-model")
                judge_cmd = gr.Textbox(label=t("board.command"), elem_id="judge-command", interactive=False, buttons=["copy"], lines=3)
                judge_btn = gr.Button(t("board.run_judge"), elem_id="judge-btn")
                judge_md = gr.Markdown(elem_id="judge-results")
                eval_status = gr.Markdown(elem_id="eval-status")
            with gr.Tab(t("board.tab.export"), id="export"):
                with gr.Row():
                    export_adapter = gr.Textbox(label=t("board.adapter"), elem_id="export-adapter", scale=2)
                    export_dir = gr.Textbox(label=t("board.export_dir"), elem_id="export-dir", scale=2)
                with gr.Row():
                    export_format = gr.Radio(
                        [(t(f"board.format.{f}"), f) for f in EXPORT_FORMATS], value="hf", label=t("board.format"), elem_id="export-format"
                    )
                    outtype = gr.Dropdown(
                        ["f16", "q8_0", "q4_0", "q4_k_m", "f32"], value="q4_0", label=t("board.outtype"), elem_id="outtype"
                    )
                export_cmd = gr.Textbox(label=t("board.command"), elem_id="export-command", interactive=False, buttons=["copy"], lines=2)
                export_btn = gr.Button(t("board.export"), variant="primary", elem_id="export-btn")
                export_status = gr.Markdown(elem_id="export-status")
                export_files_md = gr.Markdown(elem_id="export-files")

        values = [
            base,
            template,
            data,
            output_dir,
            *[numbers[k] for k in NUMBERS],
            targets,
            precision,
            lora_weights,
            pref_loss,
            pref_beta,
            pref_ftx,
            reward_funcs,
            num_generations,
            max_completion_length,
            grpo_loss,
            beta,
        ]
        stage_row_list = [start_row, preference_row, rl_row]
        for component in [stage, *values]:
            component.change(command_of, [stage, *values], command, api_name=False, queue=False)
            component.change(estimate_of, [stage, *values], memory, api_name=False, queue=False)
        # the user's choice of stage (not a loaded flags file's, whose data and template stay) brings its defaults
        shown_stage = gr.State("sft")  # the stage whose settings the fields hold (a switch out of RL brings DEFAULTS back)
        stage.input(
            switch_stage,
            [stage, shown_stage],
            [template, data, *stage_row_list, *[numbers[k] for k in SWITCHED], shown_stage],
            api_name=False,
        )
        check_btn.click(check, [stage, *values], [model_info, preview, doctor, status], api_name="inspect")
        start_btn.click(start, [stage, *values], [model_info, preview, doctor, status, run], api_name="start")
        save_btn.click(save_flags, [flags_path, stage, *values], status, api_name="save_flags")
        load_btn.click(load_flags, flags_path, [stage, *values, *stage_row_list, shown_stage, status], api_name="load_flags")
        timer = gr.Timer(1.0)
        timer.tick(watch, run, [progress_md, plot, run_command, console], api_name=False, queue=False)
        timer.tick(runs_list, None, all_runs, api_name=False, queue=False)
        run.change(watch, run, [progress_md, plot, run_command, console], api_name="watch")
        run.change(use_run, run, [adapter, eval_adapter, eval_dir, export_adapter, export_dir], api_name=False)
        stop_btn.click(stop, run, [run_status, run], api_name="stop")
        resume_btn.click(resume, run, [run_status, run], api_name="resume")
        send.click(respond, [message, history, base, adapter], [chatbot, history, message], api_name="respond")
        message.submit(respond, [message, history, base, adapter], [chatbot, history, message], api_name=False)
        choice_inputs = [base, eval_adapter, bench, bench_dir, split, ntrain, subjects, eval_dir]
        for component in choice_inputs:
            component.change(choice_command, choice_inputs, choice_cmd, api_name=False, queue=False)
        choice_btn.click(run_choice, choice_inputs, [eval_status, run], api_name="evaluate_choice")
        judge_inputs = [base, eval_adapter, questions, judge_base, judge_model, eval_dir]
        for component in judge_inputs:
            component.change(judge_command, judge_inputs, judge_cmd, api_name=False, queue=False)
        judge_btn.click(run_judge, judge_inputs, [eval_status, run], api_name="evaluate_judge")
        timer.tick(eval_results, eval_dir, [choice_md, judge_md], api_name=False, queue=False)
        export_inputs = [base, export_adapter, export_dir, export_format, outtype]
        for component in export_inputs:
            component.change(export_command, export_inputs, export_cmd, api_name=False, queue=False)
        export_btn.click(export, export_inputs, [export_status, run], api_name="export")
        timer.tick(export_result, [export_dir, export_format, outtype], export_files_md, api_name=False, queue=False)
        # a reload finds the runs (the newest selected) and the command of the settings shown
        demo.load(run_choices, None, run, api_name=False)
        demo.load(command_of, [stage, *values], command, api_name=False)
        demo.load(estimate_of, [stage, *values], memory, api_name=False)
    return demo


@functools.lru_cache(maxsize=1)
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # --base_model: the model the page starts with (the page can pick another)
    base, server, ui, args = parse_args((BaseModelArguments, ServerArguments, UIArguments, BoardArguments), argv)
    configure_logging()
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth must be user:password")
        auth = (user, password)
    from chinese_vicuna.infer.webui import launch

    runs = Runs(args.runs_dir)
    logger.info("runs are kept in %s", Path(args.runs_dir).resolve())
    launch(
        build_page(runs, base.base_model or "", ui.ui_language), server.server_name, server.server_port, server.share, auth=auth, css=CSS
    )


if __name__ == "__main__":
    main()
