"""Multiple-choice benchmarks by their official protocols: C-Eval, CMMLU (and MMLU).

- Data in the benchmarks' own layouts: C-Eval `{dev,val,test}/{subject}_{split}.csv` with
  `id,question,A,B,C,D,answer,explanation` (test has no answer), CMMLU `{dev,test}/{subject}.csv`
  with an unnamed index column then `Question,A,B,C,D,Answer`; MMLU `{dev,val,test}/{subject}_{split}.csv`
  without a header (`question,A,B,C,D,answer`, the row number is the id).
- Prompts exactly as the benchmarks' reference code builds them (answer-only, k shots from dev).
- The choice is the argmax of the next-token logits over the four letters, each letter's id
  being its continuation id after the prompt (`tokenizer(prompt + "A")` minus `tokenizer(prompt)`),
  straight from the model's logits: no sampling processor (temperature, repetition penalty)
  ever touches them.
- Accuracy per subject, per category and on average, in percent: the mean of subject accuracies
  for C-Eval and CMMLU, the mean over questions for MMLU (each as the benchmark reports it).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Subject:
    name: str
    display: str  # the subject's name as the prompt says it (Chinese for C-Eval and CMMLU)
    categories: tuple[str, ...]


def _table(rows: dict[str, tuple[str, ...]]) -> dict[str, Subject]:
    return {name: Subject(name, row[0], tuple(row[1:])) for name, row in rows.items()}


# C-Eval: 52 subjects, the Chinese name that goes into the prompt, and the category
# (the public subject_mapping.json; clinical_medicine belongs to Other as in the paper).
CEVAL_SUBJECTS = _table(
    {
        "computer_network": ("计算机网络", "STEM"),
        "operating_system": ("操作系统", "STEM"),
        "computer_architecture": ("计算机组成", "STEM"),
        "college_programming": ("大学编程", "STEM"),
        "college_physics": ("大学物理", "STEM"),
        "college_chemistry": ("大学化学", "STEM"),
        "advanced_mathematics": ("高等数学", "STEM"),
        "probability_and_statistics": ("概率统计", "STEM"),
        "discrete_mathematics": ("离散数学", "STEM"),
        "electrical_engineer": ("注册电气工程师", "STEM"),
        "metrology_engineer": ("注册计量师", "STEM"),
        "high_school_mathematics": ("高中数学", "STEM"),
        "high_school_physics": ("高中物理", "STEM"),
        "high_school_chemistry": ("高中化学", "STEM"),
        "high_school_biology": ("高中生物", "STEM"),
        "middle_school_mathematics": ("初中数学", "STEM"),
        "middle_school_biology": ("初中生物", "STEM"),
        "middle_school_physics": ("初中物理", "STEM"),
        "middle_school_chemistry": ("初中化学", "STEM"),
        "veterinary_medicine": ("兽医学", "STEM"),
        "college_economics": ("大学经济学", "Social Science"),
        "business_administration": ("工商管理", "Social Science"),
        "marxism": ("马克思主义基本原理", "Social Science"),
        "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
        "education_science": ("教育学", "Social Science"),
        "teacher_qualification": ("教师资格", "Social Science"),
        "high_school_politics": ("高中政治", "Social Science"),
        "high_school_geography": ("高中地理", "Social Science"),
        "middle_school_politics": ("初中政治", "Social Science"),
        "middle_school_geography": ("初中地理", "Social Science"),
        "modern_chinese_history": ("近代史纲要", "Humanities"),
        "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
        "logic": ("逻辑学", "Humanities"),
        "law": ("法学", "Humanities"),
        "chinese_language_and_literature": ("中国语言文学", "Humanities"),
        "art_studies": ("艺术学", "Humanities"),
        "professional_tour_guide": ("导游资格", "Humanities"),
        "legal_professional": ("法律职业资格", "Humanities"),
        "high_school_chinese": ("高中语文", "Humanities"),
        "high_school_history": ("高中历史", "Humanities"),
        "middle_school_history": ("初中历史", "Humanities"),
        "civil_servant": ("公务员", "Other"),
        "sports_science": ("体育学", "Other"),
        "plant_protection": ("植物保护", "Other"),
        "basic_medicine": ("基础医学", "Other"),
        "clinical_medicine": ("临床医学", "Other"),
        "urban_and_rural_planner": ("注册城乡规划师", "Other"),
        "accountant": ("注册会计师", "Other"),
        "fire_engineer": ("注册消防工程师", "Other"),
        "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
        "tax_accountant": ("税务师", "Other"),
        "physician": ("医师资格", "Other"),
    }
)
CEVAL_CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")
# C-Eval Hard: the eight subjects the benchmark singles out (advanced mathematics and sciences).
CEVAL_HARD = (
    "advanced_mathematics",
    "discrete_mathematics",
    "probability_and_statistics",
    "college_chemistry",
    "college_physics",
    "high_school_mathematics",
    "high_school_chemistry",
    "high_school_physics",
)

# CMMLU: 67 subjects, their Chinese names, the main category, and "China specific" where the
# benchmark marks the subject so (answers that hold in China only).
_CS = "China specific"
CMMLU_SUBJECTS = _table(
    {
        "agronomy": ("农学", "Other"),
        "anatomy": ("解剖学", "STEM"),
        "ancient_chinese": ("古汉语", "Social Science", _CS),
        "arts": ("艺术学", "Humanities"),
        "astronomy": ("天文学", "STEM"),
        "business_ethics": ("商业伦理", "Social Science"),
        "chinese_civil_service_exam": ("中国公务员考试", "Social Science", _CS),
        "chinese_driving_rule": ("中国驾驶规则", "Other", _CS),
        "chinese_food_culture": ("中国饮食文化", "Social Science", _CS),
        "chinese_foreign_policy": ("中国外交政策", "Social Science", _CS),
        "chinese_history": ("中国历史", "Humanities", _CS),
        "chinese_literature": ("中国文学", "Humanities", _CS),
        "chinese_teacher_qualification": ("中国教师资格", "Social Science", _CS),
        "clinical_knowledge": ("临床知识", "Other"),
        "college_actuarial_science": ("大学精算学", "STEM"),
        "college_education": ("大学教育学", "Social Science"),
        "college_engineering_hydrology": ("大学工程水文学", "STEM"),
        "college_law": ("大学法律", "Humanities"),
        "college_mathematics": ("大学数学", "STEM"),
        "college_medical_statistics": ("大学医学统计", "STEM"),
        "college_medicine": ("大学医学", "Other"),
        "computer_science": ("计算机科学", "STEM"),
        "computer_security": ("计算机安全", "Other"),
        "conceptual_physics": ("概念物理学", "STEM"),
        "construction_project_management": ("建设工程管理", "Other", _CS),
        "economics": ("经济学", "Social Science"),
        "education": ("教育学", "Social Science"),
        "electrical_engineering": ("电气工程", "STEM"),
        "elementary_chinese": ("小学语文", "Social Science", _CS),
        "elementary_commonsense": ("小学常识", "Other", _CS),
        "elementary_information_and_technology": ("小学信息技术", "Other"),
        "elementary_mathematics": ("初等数学", "STEM"),
        "ethnology": ("民族学", "Social Science", _CS),
        "food_science": ("食品科学", "Other"),
        "genetics": ("遗传学", "STEM"),
        "global_facts": ("全球事实", "Humanities"),
        "high_school_biology": ("高中生物", "STEM"),
        "high_school_chemistry": ("高中化学", "STEM"),
        "high_school_geography": ("高中地理", "Social Science"),
        "high_school_mathematics": ("高中数学", "STEM"),
        "high_school_physics": ("高中物理学", "STEM"),
        "high_school_politics": ("高中政治", "Social Science", _CS),
        "human_sexuality": ("人类性行为", "Other"),
        "international_law": ("国际法学", "Humanities"),
        "journalism": ("新闻学", "Social Science"),
        "jurisprudence": ("法理学", "Humanities"),
        "legal_and_moral_basis": ("法律与道德基础", "Other"),
        "logical": ("逻辑学", "Humanities"),
        "machine_learning": ("机器学习", "STEM"),
        "management": ("管理学", "Social Science"),
        "marketing": ("市场营销", "Social Science"),
        "marxist_theory": ("马克思主义理论", "Humanities"),
        "modern_chinese": ("现代汉语", "Social Science", _CS),
        "nutrition": ("营养学", "Other"),
        "philosophy": ("哲学", "Humanities"),
        "professional_accounting": ("专业会计", "Social Science"),
        "professional_law": ("专业法学", "Humanities"),
        "professional_medicine": ("专业医学", "Other"),
        "professional_psychology": ("专业心理学", "Social Science"),
        "public_relations": ("公共关系", "Social Science"),
        "security_study": ("安全研究", "Social Science"),
        "sociology": ("社会学", "Social Science"),
        "sports_science": ("体育学", "Other"),
        "traditional_chinese_medicine": ("中医中药", "Other", _CS),
        "virology": ("病毒学", "STEM"),
        "world_history": ("世界历史", "Humanities"),
        "world_religions": ("世界宗教", "Humanities"),
    }
)
CMMLU_CATEGORIES = ("STEM", "Humanities", "Social Science", "Other", _CS)

# MMLU: 57 subjects and their categories (hendrycks/test categories.py); the prompt names a
# subject by its file name with "_" → " ".
_MMLU_CATEGORY = {
    "STEM": "abstract_algebra astronomy college_biology college_chemistry college_computer_science college_mathematics "
    "college_physics computer_security conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
    "high_school_chemistry high_school_computer_science high_school_mathematics high_school_physics high_school_statistics "
    "machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history international_law "
    "jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory professional_law world_religions",
    "social sciences": "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_microeconomics high_school_psychology human_sexuality professional_psychology public_relations "
    "security_studies sociology us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
    "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
MMLU_SUBJECTS = {
    name: Subject(name, name.replace("_", " "), (cat,))
    for name, cat in sorted((name, cat) for cat, names in _MMLU_CATEGORY.items() for name in names.split())
}
MMLU_CATEGORIES = tuple(_MMLU_CATEGORY)


@dataclass(frozen=True)
class ChoiceQuestion:
    """One four-option question; `answer` is "" where the split hides it (C-Eval test)."""

    subject: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def _options(q: ChoiceQuestion) -> str:
    return "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.options))


def ceval_example(q: ChoiceQuestion, with_answer: bool = True) -> str:
    """`{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：` (+ `{answer}\\n\\n` for a shot)."""
    text = f"{q.question}{_options(q)}\n答案："
    return f"{text}{q.answer}\n\n" if with_answer else text


def cmmlu_example(q: ChoiceQuestion, with_answer: bool = True) -> str:
    """`题目：{question}\\nA. …\\nD. {D}\\n答案是：` (+ `{answer}\\n\\n` for a shot)."""
    text = f"题目：{q.question}{_options(q)}\n答案是："
    return f"{text}{q.answer}\n\n" if with_answer else text


def mmlu_example(q: ChoiceQuestion, with_answer: bool = True) -> str:
    """`{question}\\nA. …\\nD. {D}\\nAnswer:` (+ ` {answer}\\n\\n` for a shot: the letter follows a space)."""
    text = f"{q.question}{_options(q)}\nAnswer:"
    return f"{text} {q.answer}\n\n" if with_answer else text


@dataclass(frozen=True)
class Benchmark:
    name: str
    splits: tuple[str, ...]
    subjects: dict[str, Subject]
    categories: tuple[str, ...]
    letter_prefix: str = ""  # what precedes the letter in an answer (MMLU: a space)
    average_over: str = "subjects"  # how the benchmark averages: subjects (macro) or questions

    def path(self, data_dir: str | Path, split: str, subject: str) -> Path:
        if self.name == "cmmlu":
            return Path(data_dir) / split / f"{subject}.csv"
        return Path(data_dir) / split / f"{subject}_{split}.csv"

    def header(self, subject: str) -> str:
        name = self.subjects[subject].display
        if self.name == "ceval":
            return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
        if self.name == "cmmlu":
            return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
        # MMLU's own format_subject puts a space before the name: "about  abstract algebra."
        return f"The following are multiple choice questions (with answers) about  {name}.\n\n"

    def example(self, q: ChoiceQuestion, with_answer: bool = True) -> str:
        return {"ceval": ceval_example, "cmmlu": cmmlu_example, "mmlu": mmlu_example}[self.name](q, with_answer)

    def prompt(self, question: ChoiceQuestion, shots: Sequence[ChoiceQuestion]) -> str:
        """The whole prompt: header, the shots with their answers, the question up to the answer cue."""
        return self.header(question.subject) + "".join(self.example(s) for s in shots) + self.example(question, False)

    def subject_categories(self, subject: str) -> tuple[str, ...]:
        cats = self.subjects[subject].categories
        return (*cats, "Hard") if self.name == "ceval" and subject in CEVAL_HARD else cats


BENCHMARKS = {
    "ceval": Benchmark("ceval", ("dev", "val", "test"), CEVAL_SUBJECTS, (*CEVAL_CATEGORIES, "Hard")),
    "cmmlu": Benchmark("cmmlu", ("dev", "test"), CMMLU_SUBJECTS, CMMLU_CATEGORIES),
    "mmlu": Benchmark("mmlu", ("dev", "val", "test"), MMLU_SUBJECTS, MMLU_CATEGORIES, letter_prefix=" ", average_over="questions"),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UserError(f"--benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def read_subject(bench: Benchmark, path: Path, subject: str) -> list[ChoiceQuestion]:
    """One subject's CSV file in the benchmark's layout (UTF-8, with or without a BOM)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise UserError(f"{path}: empty file; expected a header line")
    if bench.name == "mmlu":  # no header line; the row number is the id
        rows = [["id", "question", *LETTERS, "answer"]] + [[str(i), *row] for i, row in enumerate(rows)]
    header = [h.strip() for h in rows[0]]
    if bench.name in ("ceval", "mmlu"):
        need, id_col, question_col, answer_col = ["id", "question", *LETTERS], "id", "question", "answer"
    else:
        need, id_col, question_col, answer_col = ["Question", *LETTERS, "Answer"], "", "Question", "Answer"
        header[0] = ""  # CMMLU's first column is the unnamed index
    missing = [c for c in need if c not in header]
    if missing:
        raise UserError(f"{path}: no column(s) {missing}; {bench.name} files have columns {need} (got {rows[0]})")
    col = {name: i for i, name in enumerate(header)}
    questions = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path} row {n}: {len(row)} cells but the header has {len(header)} (a comma outside quotes?)")
        answer = row[col[answer_col]].strip() if answer_col in col else ""
        if answer and answer not in LETTERS:
            raise UserError(f"{path} row {n}: answer {answer!r} is not one of A, B, C, D")
        options = tuple(row[col[letter]] for letter in LETTERS)
        questions.append(ChoiceQuestion(subject, row[col[id_col]].strip(), row[col[question_col]], options, answer))  # type: ignore[arg-type]
    if not questions:
        raise UserError(f"{path}: no questions")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: repeated question ids; each row needs its own id")
    return questions


def find_subjects(bench: Benchmark, data_dir: str | Path, split: str, only: Sequence[str] | None = None) -> list[str]:
    """The subjects that have a file for `split` (all of `only` must, when given), in table order."""
    if split not in bench.splits or split == "dev":
        choices = [s for s in bench.splits if s != "dev"]
        raise UserError(f"--split {split!r}: {bench.name} evaluates on {' or '.join(choices)} (dev holds the few-shot examples)")
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; --data_dir must hold the {bench.name} layout ({'/'.join(bench.splits)}/)")
    if only:
        unknown = [s for s in only if s not in bench.subjects]
        if unknown:
            raise UserError(f"--subjects: {unknown} are not {bench.name} subjects (e.g. {', '.join(list(bench.subjects)[:3])})")
        absent = [s for s in only if not bench.path(data_dir, split, s).is_file()]
        if absent:
            raise UserError(f"--subjects: no file for {absent} in {folder}")
        return [s for s in bench.subjects if s in only]
    found = [s for s in bench.subjects if bench.path(data_dir, split, s).is_file()]
    known = {bench.path(data_dir, split, s).name for s in bench.subjects}
    strays = sorted(p.name for p in folder.glob("*.csv") if p.name not in known)
    if strays:
        raise UserError(
            f"{folder}: {strays} are not {bench.name} subjects; their prompt names and categories are unknown (remove or rename them)"
        )
    if not found:
        raise UserError(
            f"{folder}: no {bench.name} subject files (expected e.g. {bench.path(data_dir, split, next(iter(bench.subjects))).name})"
        )
    return found


def load_questions(
    bench: Benchmark, data_dir: str | Path, split: str, subjects: Sequence[str], ntrain: int
) -> tuple[list[ChoiceQuestion], dict[str, list[ChoiceQuestion]]]:
    """The questions to evaluate, and each subject's first `ntrain` dev examples (the shots)."""
    if ntrain < 0:
        raise UserError(f"--ntrain {ntrain}: must be 0 or more")
    questions: list[ChoiceQuestion] = []
    shots: dict[str, list[ChoiceQuestion]] = {}
    for subject in subjects:
        questions += read_subject(bench, bench.path(data_dir, split, subject), subject)
        shots[subject] = []
        if ntrain:
            dev_path = bench.path(data_dir, "dev", subject)
            if not dev_path.is_file():
                raise UserError(f"{dev_path}: missing; --ntrain {ntrain} takes the shots from dev (or use --ntrain 0)")
            dev = read_subject(bench, dev_path, subject)
            if len(dev) < ntrain:
                raise UserError(f"{dev_path}: {len(dev)} examples, fewer than --ntrain {ntrain}")
            if any(not q.answer for q in dev[:ntrain]):
                raise UserError(f"{dev_path}: a few-shot example has no answer")
            shots[subject] = dev[:ntrain]
    return questions, shots


# --------------------------------------------------------------------------------------------
# Prompt ids and letter ids
# --------------------------------------------------------------------------------------------
@dataclass
class PreparedQuestion:
    question: ChoiceQuestion
    prompt: str
    ids: list[int]
    letter_ids: list[int]
    shots: int


def continuation_ids(tokenizer: Any, prompt: str, prefix: str = "") -> tuple[list[int], list[int]]:
    """The prompt's ids and each letter's id as its continuation: `tokenizer(prompt + L)` minus `tokenizer(prompt)`
    (L = `prefix` + the letter; MMLU's answers are " A" … " D")."""
    encoded = tokenizer([prompt, *(prompt + prefix + letter for letter in LETTERS)])["input_ids"]
    base = list(encoded[0])
    letter_ids = []
    for letter, ids in zip(LETTERS, encoded[1:]):
        if len(ids) <= len(base) or list(ids[: len(base)]) != base:
            raise UserError(
                f"the tokenizer merges the letter {letter!r} with the end of the prompt (…{prompt[-8:]!r}), so the "
                "letter has no continuation id; this tokenizer cannot be scored by next-token letters"
            )
        letter_ids.append(int(ids[len(base)]))
    if len(set(letter_ids)) != len(LETTERS):
        raise UserError(f"the letters A-D share continuation ids {letter_ids} with this tokenizer")
    return base, letter_ids


def prepare(
    bench: Benchmark,
    tokenizer: Any,
    questions: Iterable[ChoiceQuestion],
    shots: dict[str, list[ChoiceQuestion]],
    max_length: int = 2048,
    wrap: Callable[[str], str] | None = None,
) -> list[PreparedQuestion]:
    """Prompts and ids; where a prompt exceeds `max_length` tokens the longest shots are dropped
    (CMMLU's rule) until it fits, and the count kept is recorded."""
    prepared = []
    for q in questions:
        kept = list(shots.get(q.subject, []))
        while True:
            prompt = bench.prompt(q, kept)
            if wrap is not None:
                prompt = wrap(prompt)
            ids, letter_ids = continuation_ids(tokenizer, prompt, bench.letter_prefix)
            if len(ids) <= max_length or not kept:
                break
            lengths = [len(tokenizer(bench.example(s), add_special_tokens=False)["input_ids"]) for s in kept]
            kept = [s for s, n in zip(kept, lengths) if n != max(lengths)]
        if len(ids) > max_length:
            logger.warning(
                "%s %s: the prompt alone has %d tokens (> --max_length %d); evaluated as is", q.subject, q.id, len(ids), max_length
            )
        prepared.append(PreparedQuestion(q, prompt, ids, letter_ids, len(kept)))
    return prepared


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def next_token_logits(model: Any, batch: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits of the token after each sequence, in one forward pass (float32, on the CPU).

    Rows are left-padded with explicit position ids, so each row's logits are those of the
    sequence alone; only the last position goes through the output layer.
    """
    from chinese_vicuna.infer.generation import model_device

    device = model_device(model)
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), logits_to_keep=1)
    return out.logits[:, -1, :].float().cpu()


def choose(logits: torch.Tensor, letter_ids: Sequence[int]) -> tuple[str, list[float]]:
    """The letter with the highest next-token logit, and the softmax over the four letters."""
    letter_logits = logits[list(letter_ids)].float()
    probs = torch.softmax(letter_logits, dim=-1).tolist()
    return LETTERS[int(torch.argmax(letter_logits))], probs


def prediction_record(p: PreparedQuestion, prediction: str, probs: Sequence[float]) -> dict[str, Any]:
    """A predictions.jsonl line."""
    q = p.question
    return {
        "subject": q.subject,
        "id": q.id,
        "answer": q.answer,
        "prediction": prediction,
        "probs": {letter: round(float(x), 6) for letter, x in zip(LETTERS, probs)},
        "shots": p.shots,
    }


def score(
    model: Any,
    tokenizer: Any,
    prepared: Sequence[PreparedQuestion],
    batch_size: int = 8,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Prediction records for `prepared` (longest prompts first, so memory trouble shows at once)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i].ids))
    records: dict[int, dict[str, Any]] = {}
    with tqdm(total=len(prepared), desc="questions", disable=not progress, unit="q") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logits = next_token_logits(model, [prepared[i].ids for i in chunk], pad_id)
            batch_records = []
            for row, i in enumerate(chunk):
                letter, probs = choose(logits[row], prepared[i].letter_ids)
                records[i] = prediction_record(prepared[i], letter, probs)
                batch_records.append(records[i])
            if on_batch is not None:
                on_batch(batch_records)
            bar.update(len(chunk))
    return [records[i] for i in range(len(prepared))]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def aggregate(bench: Benchmark, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (percent) per subject, per category (mean of its subjects) and on average (mean of
    subjects), from prediction records; questions without an answer are counted, not scored."""
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    unanswered = 0
    for r in records:
        if not r.get("answer"):
            unanswered += 1
            continue
        total[r["subject"]] = total.get(r["subject"], 0) + 1
        correct[r["subject"]] = correct.get(r["subject"], 0) + int(r["prediction"] == r["answer"])
    order = [s for s in bench.subjects if s in total]
    subjects = {s: 100.0 * correct[s] / total[s] for s in order}
    categories = {}
    for cat in bench.categories:
        members = [subjects[s] for s in order if cat in bench.subject_categories(s)]
        if members:
            categories[cat] = sum(members) / len(members)
    n = sum(total.values())
    macro = sum(subjects.values()) / len(subjects) if subjects else None
    micro = 100.0 * sum(correct.values()) / n if n else None
    return {
        "benchmark": bench.name,
        "subjects": subjects,
        "categories": categories,
        "average": micro if bench.average_over == "questions" else macro,
        "average_over_subjects": macro,
        "average_over_questions": micro,
        "questions": {s: total[s] for s in order},
        "unscored": unanswered,
    }


def submission(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """C-Eval's submission file: `{subject: {id: letter}}`."""
    out: dict[str, dict[str, str]] = {}
    for r in records:
        out.setdefault(r["subject"], {})[str(r["id"])] = r["prediction"]
    return out


def summary_markdown(bench: Benchmark, results: dict[str, Any], title: str) -> str:
    """results.json as Markdown tables: categories and average, then subjects."""
    fmt = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
    lines = [f"# {title}", ""]
    if results["average"] is None:
        lines += [f"No answers in this split ({results['unscored']} questions predicted): see the submission file.", ""]
        return "\n".join(lines)
    lines += ["| category | accuracy (%) |", "|---|---:|"]
    lines += [f"| {cat} | {fmt(acc)} |" for cat, acc in results["categories"].items()]
    lines += [f"| **average** (mean over {bench.average_over}) | **{fmt(results['average'])}** |", ""]
    lines += ["| subject | name in the prompt | questions | accuracy (%) |", "|---|---|---:|---:|"]
    for s, acc in results["subjects"].items():
        lines.append(f"| {s} | {bench.subjects[s].display} | {results['questions'][s]} | {fmt(acc)} |")
    return "\n".join(lines) + "\n"


def plot_results(bench: Benchmark, results: dict[str, Any], out_png: str | Path, title: str) -> bool:
    """A bar chart of subject accuracies, coloured by main category, with the chance line."""
    if not results["subjects"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chinese_vicuna.files import save_figure

    names = list(results["subjects"])
    colours = {cat: f"C{i}" for i, cat in enumerate(bench.categories)}
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(names)))
    ax.barh(range(len(names)), [results["subjects"][s] for s in names], color=[colours[bench.subjects[s].categories[0]] for s in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(25.0, color="grey", linestyle="--", linewidth=1, label="chance (25%)")
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(f"{title}: average {results['average']:.2f}%")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in bench.categories if c in results["categories"] and c in colours]
    labels = [c for c in bench.categories if c in results["categories"] and c in colours]
    ax.legend([*handles, ax.lines[0]], [*labels, "chance (25%)"], fontsize=7, loc="lower right")
    save_figure(fig, out_png)
    return True


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """predictions.jsonl as written so far; a torn last line (a killed run) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping an incomplete last line (an interrupted run)", path)
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]
