"""tools/eval_choice.py on the tiny model: official prompts, letter continuation ids, batching, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import chinese_vicuna.evaluation.choice as choice
from chinese_vicuna.evaluation.choice import BENCHMARKS, ChoiceQuestion
from conftest import REPO, read_jsonl

SAMPLE = REPO / "sample" / "eval" / "ceval"
SUBJECTS = {"computer_network": "计算机网络", "high_school_history": "高中历史", "middle_school_mathematics": "初中数学"}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def ceval_reference_prompt(subject: str, shots: list[dict[str, str]], q: dict[str, str]) -> str:
    """The C-Eval prompt, spelled out from the issue's text (independent of the library)."""
    text = f"以下是中国关于{SUBJECTS[subject]}考试的单项选择题，请选出其中的正确答案。\n\n"
    for s in shots:
        text += f"{s['question']}\nA. {s['A']}\nB. {s['B']}\nC. {s['C']}\nD. {s['D']}\n答案：{s['answer']}\n\n"
    return text + f"{q['question']}\nA. {q['A']}\nB. {q['B']}\nC. {q['C']}\nD. {q['D']}\n答案："


def recompute(model_dir: Path, prompts: dict[tuple[str, str], str], prefix: str = "") -> dict[tuple[str, str], tuple[str, list[float]]]:
    """One unbatched, unpadded forward pass per prompt; letters (after `prefix`) by continuation ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    for key, prompt in prompts.items():
        base = tok(prompt).input_ids
        letter_ids = []
        for letter in "ABCD":
            ids = tok(prompt + prefix + letter).input_ids
            assert ids[: len(base)] == base
            letter_ids.append(ids[len(base)])
        with torch.no_grad():
            logits = model(torch.tensor([base])).logits[0, -1]
        four = logits[letter_ids]
        out[key] = ("ABCD"[int(four.argmax())], torch.softmax(four, -1).tolist())
    return out


def run(*argv: str) -> dict:
    from eval_choice import main

    return main(["--progress", "false", *argv])


def test_prompts_are_the_official_ones() -> None:
    q = ChoiceQuestion("computer_network", "0", "问题？", ("甲", "乙", "丙", "丁"), "B")
    shot = ChoiceQuestion("computer_network", "1", "例题？", ("一", "二", "三", "四"), "C")
    assert BENCHMARKS["ceval"].prompt(q, [shot]) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "例题？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：C\n\n"
        "问题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    )
    q2 = ChoiceQuestion("computer_science", "0", "问题？", ("甲", "乙", "丙", "丁"), "B")
    shot2 = ChoiceQuestion("computer_science", "1", "例题？", ("一", "二", "三", "四"), "C")
    assert BENCHMARKS["cmmlu"].prompt(q2, [shot2]) == (
        "以下是关于计算机科学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：例题？\nA. 一\nB. 二\nC. 三\nD. 四\n答案是：C\n\n"
        "题目：问题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是："
    )
    assert len(choice.CEVAL_SUBJECTS) == 52 and len(choice.CMMLU_SUBJECTS) == 67
    assert {s.categories[0] for s in choice.CEVAL_SUBJECTS.values()} == set(choice.CEVAL_CATEGORIES)
    assert sum("China specific" in s.categories for s in choice.CMMLU_SUBJECTS.values()) == 15


@pytest.mark.parametrize("ntrain", [0, 5])
def test_choices_equal_independent_recomputation(tiny_model_dir: Path, tmp_path: Path, ntrain: int) -> None:
    out = tmp_path / "out"
    results = run("--benchmark", "ceval", "--base_model", str(tiny_model_dir), "--data_dir", str(SAMPLE), "--split", "val",
                  "--ntrain", str(ntrain), "--output_dir", str(out), "--batch_size", "4")  # fmt: skip
    preds = read_jsonl(out / "predictions.jsonl")
    prompts = {}
    for subject in SUBJECTS:
        shots = rows(SAMPLE / "dev" / f"{subject}_dev.csv")[:ntrain]
        for q in rows(SAMPLE / "val" / f"{subject}_val.csv"):
            prompts[(subject, q["id"])] = ceval_reference_prompt(subject, shots, q)
    expected = recompute(tiny_model_dir, prompts)
    assert sorted((p["subject"], p["id"]) for p in preds) == sorted(expected)
    for p in preds:
        letter, probs = expected[(p["subject"], p["id"])]
        assert p["prediction"] == letter
        assert [p["probs"][x] for x in "ABCD"] == pytest.approx(probs, abs=1e-4)
        assert p["shots"] == ntrain
    # accuracies agree with predictions.jsonl
    for subject in SUBJECTS:
        mine = [p for p in preds if p["subject"] == subject]
        assert results["subjects"][subject] == pytest.approx(100 * sum(p["prediction"] == p["answer"] for p in mine) / len(mine))
    assert results["average"] == pytest.approx(sum(results["subjects"].values()) / 3)
    assert results["categories"]["STEM"] == pytest.approx(
        (results["subjects"]["computer_network"] + results["subjects"]["middle_school_mathematics"]) / 2
    )
    assert results["categories"]["Humanities"] == pytest.approx(results["subjects"]["high_school_history"])
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["subjects"] == results["subjects"]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert f"| computer_network | 计算机网络 | 6 | {results['subjects']['computer_network']:.2f} |" in summary
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_cmmlu_layout(tiny_model_dir: Path, tmp_path: Path) -> None:
    """CMMLU files (unnamed index column, Question/Answer), its prompt, and its China-specific category."""
    data = tmp_path / "cmmlu"
    names = {"computer_network": ("computer_science", "计算机科学"), "high_school_history": ("chinese_history", "中国历史")}
    for ceval_name, (name, _) in names.items():
        for src, split in (("dev", "dev"), ("val", "test")):
            (data / split).mkdir(parents=True, exist_ok=True)
            with (data / split / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i, r in enumerate(rows(SAMPLE / src / f"{ceval_name}_{src}.csv")):
                    w.writerow([i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]])
    out = tmp_path / "out"
    results = run("--benchmark", "cmmlu", "--base_model", str(tiny_model_dir), "--data_dir", str(data), "--split", "test",
                  "--ntrain", "2", "--output_dir", str(out))  # fmt: skip
    prompts = {}
    for ceval_name, (name, zh) in names.items():
        shots = rows(SAMPLE / "dev" / f"{ceval_name}_dev.csv")[:2]
        head = f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n"
        body = "".join(
            f"题目：{s['question']}\nA. {s['A']}\nB. {s['B']}\nC. {s['C']}\nD. {s['D']}\n答案是：{s['answer']}\n\n" for s in shots
        )
        for i, q in enumerate(rows(SAMPLE / "val" / f"{ceval_name}_val.csv")):
            prompts[(name, str(i))] = head + body + f"题目：{q['question']}\nA. {q['A']}\nB. {q['B']}\nC. {q['C']}\nD. {q['D']}\n答案是："
    expected = recompute(tiny_model_dir, prompts)
    preds = read_jsonl(out / "predictions.jsonl")
    assert {(p["subject"], p["id"]): p["prediction"] for p in preds} == {k: v[0] for k, v in expected.items()}
    assert set(results["categories"]) == {"STEM", "Humanities", "China specific"}
    assert results["categories"]["China specific"] == pytest.approx(results["subjects"]["chinese_history"])


def test_resume_scores_only_missing_questions(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    args = ["--benchmark", "ceval", "--base_model", str(tiny_model_dir), "--data_dir", str(SAMPLE), "--split", "val",
            "--ntrain", "0", "--output_dir", str(out), "--batch_size", "5"]  # fmt: skip
    first = run(*args)
    pred = out / "predictions.jsonl"
    lines = pred.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 18
    # an interrupted run: 3 predictions missing and half a line torn
    pred.write_text("".join(lines[:15]) + lines[15][:20], encoding="utf-8")
    scored = []
    real = choice.next_token_logits
    monkeypatch.setattr(choice, "next_token_logits", lambda model, batch, pad: scored.append(len(batch)) or real(model, batch, pad))
    second = run(*args)
    assert sum(scored) == 3
    after = pred.read_text(encoding="utf-8").splitlines(keepends=True)
    assert after[:15] == lines[:15] and len(after) == 18
    assert sorted(after[15:]) == sorted(lines[15:])
    assert second["subjects"] == first["subjects"]
    # nothing left: a third run scores nothing; another protocol into the same folder is refused
    scored.clear()
    run(*args)
    assert scored == []
    with pytest.raises(SystemExit) as exc:
        run(*args[:-4], "--ntrain", "5", "--output_dir", str(out))
    assert exc.value.code == 2


def test_ceval_test_split_writes_submission(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = run("--benchmark", "ceval", "--base_model", str(tiny_model_dir), "--data_dir", str(SAMPLE), "--split", "test",
                  "--ntrain", "1", "--output_dir", str(out), "--subjects", "computer_network,high_school_history")  # fmt: skip
    sub = json.loads((out / "submission.json").read_text(encoding="utf-8"))
    preds = read_jsonl(out / "predictions.jsonl")
    assert sub == {
        "computer_network": {p["id"]: p["prediction"] for p in preds if p["subject"] == "computer_network"},
        "high_school_history": {p["id"]: p["prediction"] for p in preds if p["subject"] == "high_school_history"},
    }
    assert set(sub["computer_network"]) == {"0", "1", "2"} and set(sub["computer_network"].values()) <= set("ABCD")
    assert results["average"] is None and results["unscored"] == 6


def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "ceval"
    (data / "val").mkdir(parents=True)
    (data / "val" / "my_domain_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    shifted = tmp_path / "shifted"
    (shifted / "val").mkdir(parents=True)
    (shifted / "val" / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,1,000,b,c,d,B\n", encoding="utf-8")
    cases = [
        (["--benchmark", "ceval", "--data_dir", str(data), "--split", "val"], "my_domain_val.csv"),
        (["--benchmark", "ceval", "--data_dir", str(shifted), "--split", "val", "--ntrain", "0"], "law_val.csv row 3: 8 cells"),
        (["--benchmark", "cmmlu", "--data_dir", str(data), "--split", "val"], "cmmlu evaluates on test"),
        (["--benchmark", "agieval", "--data_dir", str(data)], "--benchmark 'agieval'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            run("--base_model", "unused", "--output_dir", str(tmp_path / "out"), *argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_long_prompts_drop_their_longest_shots(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    bench = BENCHMARKS["ceval"]
    shots = choice.read_subject(bench, SAMPLE / "dev" / "computer_network_dev.csv", "computer_network")
    q = choice.read_subject(bench, SAMPLE / "val" / "computer_network_val.csv", "computer_network")[0]
    full = len(tok(bench.prompt(q, shots)).input_ids)
    lengths = [len(tok(bench.example(s), add_special_tokens=False).input_ids) for s in shots]
    keep = [s for s, n in zip(shots, lengths) if n != max(lengths)]
    budget = len(tok(bench.prompt(q, keep)).input_ids)
    assert 0 < len(keep) < 5 and budget < full
    [p] = choice.prepare(bench, tok, [q], {"computer_network": shots}, max_length=budget)
    assert (p.shots, p.prompt, len(p.ids)) == (len(keep), bench.prompt(q, keep), budget)
    [p] = choice.prepare(bench, tok, [q], {"computer_network": shots}, max_length=full)
    assert p.shots == 5


@pytest.fixture(scope="module")
def english_letters_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer has the pieces "▁A" … "▁D" (as LLaMA's has), which MMLU's " A" answers need."""
    from make_tiny_model import DEFAULT_CORPUS, make_tiny_model

    root = tmp_path_factory.mktemp("mmlu-model")
    (root / "answers.txt").write_text("".join(f"Answer: {x} and {x}, then {x}.\n" for x in "ABCD" * 200), encoding="utf-8")
    return make_tiny_model(root / "model", corpus=[DEFAULT_CORPUS, root / "answers.txt"])


def mmlu_example_text(cells: list[str], with_answer: bool) -> str:
    text = f"{cells[0]}\nA. {cells[1]}\nB. {cells[2]}\nC. {cells[3]}\nD. {cells[4]}\nAnswer:"
    return text + f" {cells[5]}\n\n" if with_answer else text


def test_mmlu_layout(english_letters_model: Path, tmp_path: Path) -> None:
    """MMLU: headerless files, its English prompt (with format_subject's double space), " A" letters, average over questions."""
    data = tmp_path / "mmlu"
    subjects = {
        "abstract_algebra": (["What is 2 + 2?,3,4,5,6,B", "Which is a group operation?,addition,colour,size,smell,A"],
                             ["Is 1 + 1 = 2?,no,maybe,yes,never,C", "What is 3 x 3?,6,9,12,15,B", "Zero is the identity of?,division,powers,roots,addition,D"]),
        "philosophy": (["Who wrote the Republic?,Plato,Newton,Euler,Gauss,A", "Ethics studies?,stars,rocks,right action,cells,C"],
                       ["Socrates was a?,painter,philosopher,king,sailor,B", "Logic studies?,valid reasoning,weather,music,food,A"]),
    }  # fmt: skip
    for name, (dev, test) in subjects.items():
        for split, lines in (("dev", dev), ("test", test)):
            (data / split).mkdir(parents=True, exist_ok=True)
            (data / split / f"{name}_{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    results = run("--benchmark", "mmlu", "--base_model", str(english_letters_model), "--data_dir", str(data), "--split", "test",
                  "--ntrain", "2", "--output_dir", str(out))  # fmt: skip
    prompts = {}
    for name, (dev, test) in subjects.items():
        head = f"The following are multiple choice questions (with answers) about  {name.replace('_', ' ')}.\n\n"
        shots = "".join(mmlu_example_text(line.split(","), True) for line in dev)
        for i, line in enumerate(test):
            prompts[(name, str(i))] = head + shots + mmlu_example_text(line.split(","), False)
    expected = recompute(english_letters_model, prompts, prefix=" ")
    preds = read_jsonl(out / "predictions.jsonl")
    assert {(p["subject"], p["id"]): p["prediction"] for p in preds} == {k: v[0] for k, v in expected.items()}
    assert results["average"] == pytest.approx(100 * sum(p["prediction"] == p["answer"] for p in preds) / 5)
    assert set(results["categories"]) == {"STEM", "humanities"}
