"""A report on a data file before training: duplicates, near duplicates, samples truncated at
--cutoff_len (counted exactly as training tokenizes them), samples with nothing to train,
token-length percentiles, language mix, the longest records; chat data too.

    python tools/data_doctor.py --data_path data.jsonl --base_model ./llama-7b-hf --cutoff_len 512 \\
        [--prompt_template alpaca] --output_dir doctor/

Writes doctor/report.json, doctor/report.md and doctor/length_histogram.png. See docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chinese_vicuna.args import BaseModelArguments, TemplateArguments, parse_args
from chinese_vicuna.checkpoints import check_writable
from chinese_vicuna.datatools.doctor import NEAR_DUPLICATE_WINDOW, data_kind, diagnose, write_report
from chinese_vicuna.datatools.preference_doctor import diagnose_preferences, is_preference_data, write_preference_report
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.outputlock import hold_output_folder
from chinese_vicuna.prompts import load_template


@dataclass
class DoctorArguments:
    data_path: str = field(metadata={"help": "Alpaca or chat data: .json/.jsonl/.parquet/.csv/.arrow, a folder, a hub dataset (docs/data.md)."})
    cutoff_len: int = field(metadata={"help": "The --cutoff_len you will train with."})
    output_dir: str = field(metadata={"help": "Where report.json, report.md and length_histogram.png go."})
    similarity_threshold: float = field(default=0.7, metadata={"help": "ROUGE-L at or above which two prompts are near duplicates."})
    near_duplicates: bool = field(
        default=True, metadata={"help": "Search for near duplicates (false skips the slowest part on large files)."}
    )
    near_duplicate_window: int = field(
        default=NEAR_DUPLICATE_WINDOW,
        metadata={"help": "Kept prompts each prompt is compared with, at least (bounds memory: about 10 KB each)."},
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # --base_model: the model (or tokenizer) folder training will use; --prompt_template: the template
    # training will use (default: alpaca for instruction data, chinese-vicuna-chat for chat)
    base, template_args, args = parse_args((BaseModelArguments, TemplateArguments, DoctorArguments), argv)
    configure_logging()
    if args.cutoff_len < 2:
        raise UserError(f"--cutoff_len {args.cutoff_len}: must be at least 2")
    if args.near_duplicate_window < 1:
        raise UserError(f"--near_duplicate_window {args.near_duplicate_window}: must be at least 1")
    check_writable(args.output_dir)
    hold_output_folder(args.output_dir)
    tokenizer = load_tokenizer(base.require_base_model("the model (or tokenizer) folder training will use"))
    template_name = template_args.prompt_template
    if is_preference_data(args.data_path):  # pairs or KTO records: their own checks (docs/preference.md)
        report = diagnose_preferences(args.data_path, tokenizer, load_template(template_name or "alpaca", tokenizer), args.cutoff_len)
        print(f"{report['records']} preference records → {write_preference_report(report, args.output_dir)}/report.md")
        return
    if template_name is None:
        template_name = "chinese-vicuna-chat" if data_kind(args.data_path) == "chat" else "alpaca"
    report, lengths = diagnose(
        args.data_path,
        tokenizer,
        load_template(template_name, tokenizer),
        args.cutoff_len,
        args.similarity_threshold if args.near_duplicates else None,
        args.near_duplicate_window,
    )
    out = write_report(report, lengths, args.output_dir)
    print(
        f"{report['records']} records: {report['duplicates']} duplicates, {report['near_duplicates']} near duplicates, "
        f"{report['truncated']} of {report['samples']} samples longer than {args.cutoff_len} tokens, "
        f"{report['no_trainable']} with nothing to train → {out}/report.md"
    )


if __name__ == "__main__":
    main()
