"""--torch_compile (chinese_vicuna/train/compile.py): regional compilation gives eager's losses, a
stock adapter and a working resume; one set of graphs serves every layer; the compile cache persists."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from chinese_vicuna.args import TrainArguments, parse_args
from conftest import SAMPLE_INSTRUCT, read_jsonl, run_script

STEPS = 4


def finetune(base: Path, data: Path, out: Path, compiled: bool, *extra: str, env: dict[str, str] | None = None) -> str:
    proc = run_script(
        "finetune.py", "--base_model", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--micro_batch_size", "4", "--batch_size", "4", "--max_steps", str(STEPS), "--save_steps", "2",
        "--logging_steps", "1", "--val_set_size", "0", "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--disable_tqdm", "true", "--torch_compile", str(compiled).lower(), *extra, env=env,
        timeout=1800,  # a cold compile: about a minute of 2 idle cores, many more on a busy machine
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def step_losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e}


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same 4 steps eager and compiled (a fresh compile cache), then the compiled run resumed from
    its checkpoint-2 in a new process (the cache now warm)."""
    root = tmp_path_factory.mktemp("compile")
    data = root / "data.jsonl"
    data.write_text("\n".join(SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    env = {"CHINESE_VICUNA_CACHE": str(root / "cache")}
    finetune(tiny_model_dir, data, root / "eager", False, env=env)
    cold_log = finetune(tiny_model_dir, data, root / "compiled", True, env=env)
    (root / "resumed").mkdir()
    shutil.copytree(root / "compiled" / "checkpoint-2", root / "resumed" / "checkpoint-2")
    warm_log = finetune(tiny_model_dir, data, root / "resumed", True, "--resume_from_checkpoint", "true", env=env)
    return {"root": root, "cold_log": cold_log, "warm_log": warm_log, "cache": root / "cache" / "compile"}


@pytest.mark.slow
def test_compiled_losses_equal_eager(runs: dict) -> None:
    root = runs["root"]
    eager, compiled = step_losses(root / "eager"), step_losses(root / "compiled")
    assert sorted(eager) == list(range(1, STEPS + 1)) == sorted(compiled)
    # fp32 throughout: fused kernels change the order of sums (rounding ~1e-7 per op), and 4 steps at
    # lr 3e-3 carry it into the weights; 1e-5 relative is the bound for fp32.
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5)
    assert "torch.compile of 2 decoder layers" in runs["cold_log"]


@pytest.mark.slow
def test_compiled_adapter_loads_in_stock_peft(runs: dict, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root = runs["root"]
    for out in (root / "compiled", root / "compiled" / "checkpoint-2", root / "resumed"):
        weights = load_file(out / "adapter_model.safetensors")
        assert weights and not [k for k in weights if "_orig_mod" in k], out
    eager, compiled = load_file(root / "eager" / "adapter_model.safetensors"), load_file(root / "compiled" / "adapter_model.safetensors")
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in compiled.items())  # it trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), root / "compiled")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(compiled)
    for key, value in compiled.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "").endswith(key.removeprefix("base_model.model."))]
        assert len(match) == 1 and torch.equal(match[0], value), key


@pytest.mark.slow
def test_resume_with_compile_on(runs: dict) -> None:
    root = runs["root"]
    straight, resumed = step_losses(root / "compiled"), step_losses(root / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5)


@pytest.mark.slow
def test_compile_cache_filled_and_hit(runs: dict) -> None:
    assert runs["cache"].is_dir() and any(p.is_file() for p in runs["cache"].rglob("*"))
    cold = compile_line(runs["cold_log"])
    warm = compile_line(runs["warm_log"])
    assert cold["fx_misses"] > 0
    # the second process compiles the same graphs: every kernel comes from the cache
    assert warm["fx_hits"] > 0 and warm["fx_misses"] == 0, warm


def compile_line(log: str) -> dict[str, int]:
    import re

    match = re.search(r"torch.compile: (\d+) graphs .*FX-graph cache (\d+) hits, (\d+) misses; AOT-autograd cache (\d+) hits, (\d+) misses", log)
    assert match, log[-2000:]
    graphs, fx_hits, fx_misses, aot_hits, aot_misses = map(int, match.groups())
    return {"graphs": graphs, "fx_hits": fx_hits, "fx_misses": fx_misses, "aot_hits": aot_hits, "aot_misses": aot_misses}


def compiled_graphs(base: Path) -> tuple[int, int]:
    """Graphs dynamo compiles for a LoRA model's decoder layers over two packed rows of different
    lengths: after the first row, and after both (aot_eager: dynamo's graphs without inductor's kernels)."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.adapters import add_lora
    from chinese_vicuna.train.compile import compile_decoder_layers, compiled_frames
    from chinese_vicuna.train.fast_lora import use_fast_lora_dropout
    from chinese_vicuna.train.packing import packed_loss, use_packed_attention

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa"), 8, 16, 0.05, "q_proj,v_proj")
    use_fast_lora_dropout(model, autocast=False)
    use_packed_attention(model)
    assert compile_decoder_layers(model, backend="aot_eager") == model.config.num_hidden_layers
    model.train()
    before = compiled_frames()  # dynamo's counters add up over the process
    counts = []
    for lengths in ((7, 12, 5), (9, 20)):
        ids = torch.randint(3, 500, (1, sum(lengths)))
        targets = torch.cat([torch.cat([torch.randint(3, 500, (n - 1,)), torch.tensor([-100])]) for n in lengths])[None]
        inputs = {"input_ids": ids, "position_ids": torch.cat([torch.arange(n) for n in lengths])[None], "shift_labels": targets}
        loss, _, _ = packed_loss(model, inputs)
        loss.backward()
        counts.append(compiled_frames() - before)
    return counts[0], counts[1]


@pytest.mark.slow
def test_compiled_graphs_independent_of_depth(tmp_path: Path) -> None:
    from make_tiny_model import make_tiny_model

    two = compiled_graphs(make_tiny_model(tmp_path / "two", num_layers=2))
    four = compiled_graphs(make_tiny_model(tmp_path / "four", num_layers=4))
    assert two[0] > 0
    assert two == four  # layer 0's graphs serve every layer
    assert two[1] == two[0]  # another row length and sample count: no new graph (dynamic lengths, eager per-sample attention)


def test_flag_values() -> None:
    def parsed(*argv: str) -> TrainArguments:
        return parse_args((TrainArguments,), [*argv, "--output_dir", "unused"])[0]

    assert parsed().torch_compile is (torch.cuda.is_available())  # auto: on with CUDA only
    assert parsed("--torch_compile").torch_compile is True
    assert parsed("--torch_compile", "true").torch_compile is True
    assert parsed("--torch_compile", "false").torch_compile is False
    mode = parsed("--torch_compile_mode", "max-autotune")  # TrainingArguments' rule: a mode turns it on
    assert mode.torch_compile is True and mode.compile_mode == "max-autotune"
    # never the whole model through accelerate: Trainer gets no backend
    assert mode.torch_compile_backend is None and mode.torch_compile_mode is None
