"""Training speed and memory: the alpaca-lora recipe vs this project's defaults, side by side.

Both configurations run `finetune.py` (a fresh process each, so peak memory is per run) on the
same base, data, LoRA config, precision, learning rate and sample order:

- recipe: alpaca-lora / Chinese-Vicuna — each random micro-batch padded to its longest
  sample (`--packing false`), HF's loss over full logits;
- ours:   finetune.py's defaults — padding-free packing, logits only where a token is trained,
  chunked cross-entropy.

Reported per run: non-padding tokens/s over one epoch, peak memory (RSS on the CPU, max
allocated on a GPU), loss after the same tokens, and MFU (4·N FLOPs per token for LoRA
— forward 2N, backward to activations 2N, no weight gradients for the frozen base — plus
attention) against the matmul peak measured on the same device in the run's precision: bf16 where
the CPU (AVX512-BF16 / AMX) or GPU runs it natively, fp32 otherwise (`--precision` overrides).

    python tools/benchmark.py prepare WORK            # ~50M LLaMA (vocab 32000) + data, built locally
    python tools/benchmark.py run WORK --repeats 2    # → WORK/benchmark.json, WORK/benchmark.png
    python tools/benchmark.py sweep WORK              # the same at cutoff_len 256/512/1024/2048
    python tools/benchmark.py tokenize WORK           # batched vs one-at-a-time tokenization
    python tools/benchmark.py logits WORK             # peak memory of the loss: 128k vocabulary, 4×2048 tokens
    python tools/benchmark.py quick WORK              # seconds: tiny model, used by the tests
    python tools/benchmark.py dpo WORK                # finetune_dpo.py vs SFT on the same data and TRL's DPOTrainer
    python tools/benchmark.py rollout WORK            # GRPO rollouts, 8 prompts × 8 samples: ours vs HF generate
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chinese_vicuna.args import parse_args
from chinese_vicuna.devices import this_machine_train_precision
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.files import atomic_write_bytes, save_figure
from chinese_vicuna.logs import configure_logging

REPO = Path(__file__).resolve().parent.parent

logger = logging.getLogger("benchmark")

# "{precision}" is the run's precision (bf16 where the machine runs it natively, else fp32);
# "{max_tokens}" is micro_batch_size × cutoff_len, the token budget of the "tokens" configurations;
# "{micro_batch}" is micro_batch_size.
# HF's loss over the model's full logits (alpaca-lora's), not train/losses.py's lm_head chunks.
UNCHUNKED = ["--loss_chunk_size", "0"]
CONFIGS: dict[str, list[str]] = {
    # alpaca-lora's finetune.py: pad each micro-batch to its longest sample, HF's loss over full
    # logits, PEFT's own dropout; 16-bit weights under bf16 (its GPU recipe loads 8-bit weights under
    # fp16 autocast; the CPU has no fast 8-bit kernels, so bf16 weights, as ours), fp32 weights in fp32.
    "recipe": [
        "--packing",
        "false",
        "--group_by_length",
        "false",
        "--fast_lora_dropout",
        "false",
        "--precision",
        "{precision}",
        *UNCHUNKED,
    ],
    # this project's defaults.
    "ours": [],
    # packed rows filled up to a token budget instead of a fixed number of samples: fewer, fuller
    # optimizer steps (accumulation as the batch arithmetic gives it) ...
    "tokens": ["--packing_max_tokens", "{max_tokens}"],
    # ... or one row per optimizer step (about as many tokens per step as the sample-count batch).
    "tokens-step": ["--packing_max_tokens", "{max_tokens}", "--batch_size", "{micro_batch}"],
    # the recipe with fp32 weights under bf16 autocast (for reference: same speed, more memory).
    "recipe-fp32-weights": [
        "--packing",
        "false",
        "--group_by_length",
        "false",
        "--fast_lora_dropout",
        "false",
        "--precision",
        "fp32",
        *UNCHUNKED,
    ],
    # ours with the model's own logits at the trained positions (the loss before train/losses.py's lm_head chunks)
    "logits": UNCHUNKED,
    # this project's fallback without packing: length-grouped padded batches.
    "grouped": ["--packing", "false", "--group_by_length", "true"],
    # ours uncompiled (--torch_compile auto compiles on CUDA) ...
    "eager": ["--torch_compile", "false"],
    # ... and compiled (train/compile.py), the compile cache kept from earlier runs (warm) ...
    "compiled": ["--torch_compile", "true"],
    # ... or emptied before the run (cold: every kernel compiled).
    "compiled-cold": ["--torch_compile", "true"],
}
# Configurations whose run starts with an empty compile cache (WORK/cache/compile).
COLD_CACHE = ("compiled-cold",)
MODEL_SHAPES: dict[str, dict[str, int]] = {
    # ~54M parameters; vocabulary 32000 like LLaMA's, so lm_head + loss weigh as in practice.
    "50m": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8, "vocab_size": 32000},
    # GPU shapes (scripts/gpu_check.sh): TinyLlama-1.1B's widths (without its grouped KV heads), LLaMA-7B.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 3000},
}


# --------------------------------------------------------------------------------------------
# Model and data, built locally
# --------------------------------------------------------------------------------------------
def build_model(out: Path, shape: str = "50m", seed: int = 0) -> Path:
    """A random LLaMA of `shape` with the tokenizer of tools/make_tiny_model.py."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dims = dict(MODEL_SHAPES[shape])
    tok_dir = out.parent / f"{out.name}-tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        cmd = [
            sys.executable,
            str(REPO / "tools" / "make_tiny_model.py"),
            "--output_dir",
            str(tok_dir),
            "--vocab_size",
            str(dims["vocab_size"]),
        ]
        cmd += ["--corpus", str(synthetic_corpus(out.parent / "corpus.txt")), str(REPO / "sample" / "tokenizer" / "corpus.txt")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise UserError(f"tools/make_tiny_model.py failed: {proc.stderr.strip().splitlines()[-1:]}")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    # sentencepiece may stop a little short of the asked size; the embedding matches the tokenizer.
    dims["vocab_size"] = len(tokenizer)
    torch.manual_seed(seed)
    config = LlamaConfig(
        **dims,
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if torch.cuda.is_available():
        # Built in bf16 on the GPU: a 7B shape in fp32 on the CPU takes 27 GB and minutes to initialise.
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
    else:
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # sentencepiece-based tools (and fast tokenization) read tokenizer.model.
    atomic_write_bytes(out / "tokenizer.model", (tok_dir / "tokenizer.model").read_bytes())
    logger.info("wrote %s: %.1fM parameters", out, sum(p.numel() for p in model.parameters()) / 1e6)
    return out


def synthetic_corpus(path: Path, lines: int = 60000, seed: int = 0) -> Path:
    """Text with enough distinct words (Zipf-distributed pseudo-words, Latin and CJK) for a
    32000-piece sentencepiece vocabulary; the sample corpus alone is too small for that."""
    import random

    if path.is_file():
        return path
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwxyz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "an", "en", "ing")]
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(40000)]
    words += ["".join(rng.choices(cjk, k=rng.randint(1, 3))) for _ in range(30000)]
    rng.shuffle(words)
    # Cumulative weights computed once: choices() with plain weights would redo 70k sums per line.
    cum = list(itertools.accumulate(1.0 / (i + 10) for i in range(len(words))))
    out = [" ".join(rng.choices(words, cum_weights=cum, k=rng.randint(5, 25))) for _ in range(lines)]
    atomic_write_bytes(path, ("\n".join(out) + "\n").encode())
    return path


def make_benchmark_data(
    out: Path, tokenizer_dir: Path, n: int, seed: int = 0, median: float = 140.0, p95: float = 430.0, cutoff_len: int = 512
) -> dict[str, float]:
    """Alpaca records whose alpaca-template token lengths follow an instruction-like
    log-normal (median ~150, p95 ~500, a tail past the cutoff; the targets are set a little low because
    decoded text re-tokenizes slightly longer). Returns length statistics."""
    import random

    from transformers import AutoTokenizer

    from chinese_vicuna.data.encode import tokenize_instructions
    from chinese_vicuna.prompts import load_template

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # Instruction-like text: the sample corpus (Chinese Q&A) interleaved with synthetic words,
    # so targets spread over the whole vocabulary.
    corpus = (REPO / "sample" / "tokenizer" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    synth = synthetic_corpus(out.parent / "corpus.txt").read_text(encoding="utf-8").splitlines()[: 4 * len(corpus)]
    mixed = [line for pair in zip(corpus * 4, synth, strict=False) for line in pair]
    stream = tokenizer("\n".join(mixed), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    sigma = math.log(p95 / median) / 1.645
    template = load_template("alpaca", tokenizer)
    header = len(tokenizer(template.instruction_segments("x", "", "x")[0].text, add_special_tokens=False)["input_ids"])

    def text(k: int) -> str:
        start = rng.randrange(0, len(stream) - k - 1)
        return tokenizer.decode(stream[start : start + k]).strip() or "好"

    records = []
    for _ in range(n):
        total = min(int(rng.lognormvariate(math.log(median), sigma)), cutoff_len + 200)
        body = max(total - header - 2, 8)
        k_in = max(int(body * rng.uniform(0.25, 0.6)), 3)
        k_out = max(body - k_in, 3)
        has_input = rng.random() < 0.4
        k_instr = k_in // 2 if has_input else k_in
        records.append({"instruction": text(k_instr), "input": text(k_in - k_instr) if has_input else "", "output": text(k_out)})
    atomic_write_bytes(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    samples = tokenize_instructions(records, tokenizer, template, 10**6)
    lengths = sorted(len(s["input_ids"]) for s in samples)
    return {
        "samples": len(lengths),
        "median_tokens": float(statistics.median(lengths)),
        "p95_tokens": float(lengths[int(0.95 * (len(lengths) - 1))]),
        "max_tokens": float(lengths[-1]),
        "over_cutoff": float(sum(x > cutoff_len for x in lengths)),
    }


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def matmul_peak_flops(dtype: str = "fp32", size: int = 2048, seconds: float = 2.0) -> float:
    """Best FLOP/s of a square matmul on this device (the MFU denominator)."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        size = 8192
    a = torch.randn(size, size, dtype=dt, device=device)
    b = torch.randn(size, size, dtype=dt, device=device)
    best = 0.0
    a @ b  # warm-up
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def model_flops_per_token(model_dir: Path, lengths: list[int]) -> float:
    """4·N (matmul weights, lm_head included, embeddings excluded) + causal attention.

    Attention per layer and token: forward 2·n·d (QKᵀ and AV over on average n/2 keys),
    backward twice that; n is the token-weighted sample length (sum n² / sum n).
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    d, f, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    n_matmul = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * vocab
    n_eff = sum(n * n for n in lengths) / max(sum(lengths), 1)
    return 4 * n_matmul + 6 * layers * d * n_eff


def run_finetune(cmd: list[str], env: dict[str, str]) -> tuple[int, list[float], str]:
    """Run a command; returns (exit code, [peak MiB, train CPU s, train wall s, train loss, dataset tokens, trained tokens], stderr tail)."""
    proc = subprocess.Popen(cmd, cwd=env.get("BENCH_CWD", REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate()
    # ru_maxrss of the children waited so far is a max over all of them: read this child's
    # own peak from the VmHWM line it writes at exit instead (see BENCH_RSS_FILE).
    rss_file = Path(env["BENCH_RSS_FILE"])
    values = [float(x) for x in rss_file.read_text().split()] if rss_file.is_file() else [0.0, 0.0, 0.0, -1.0, -1.0, -1.0]
    return proc.returncode, values, stderr[-3000:]


RSS_HOOK = """
import atexit, importlib.abc, importlib.util, os, sys, time
_START = time.perf_counter()
_times = {}
class _TrainTimer(importlib.abc.MetaPathFinder):
    # Wraps Trainer.train to record its wall and CPU seconds (CPU time is less hurt by a busy machine).
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            train = module.Trainer.train
            def timed(self_, *args, **kwargs):
                try:  # non-padding and trained tokens of a peer's tokenized training set
                    ds = self_.train_dataset
                    cols = ds.column_names
                    # LLaMA-Factory pads packed rows to cutoff_len: attention_mask 0 there (segment ids elsewhere)
                    key = "attention_mask" if "attention_mask" in cols else "input_ids"
                    _times["tokens"] = float(sum(sum(1 for a in x if a) if key == "attention_mask" else len(x) for x in ds[key]))
                    if "labels" in cols:
                        _times["trained"] = float(sum(sum(1 for v in x if v != -100) for x in ds["labels"]))
                    elif "completion_mask" in cols:
                        _times["trained"] = float(sum(sum(x) for x in ds["completion_mask"]))
                except Exception:
                    pass
                c0, w0 = time.process_time(), time.perf_counter()
                _times["startup"] = w0 - _START
                step = self_.training_step
                def first_step(*a, **k):  # seconds from the process' start to the end of the first micro-step
                    out = step(*a, **k)
                    _times.setdefault("first_step", time.perf_counter() - _START)
                    return out
                self_.training_step = first_step
                try:
                    out = train(self_, *args, **kwargs)
                    _times["loss"] = float(out.training_loss)
                    return out
                finally:
                    _times["cpu"], _times["wall"] = time.process_time() - c0, time.perf_counter() - w0
            module.Trainer.train = timed
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _TrainTimer())
def _bench_peak():
    path = os.environ.get("BENCH_RSS_FILE")
    if not path:
        return
    peak = 0.0
    try:
        import torch
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
    except Exception:
        pass
    if not peak:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    values = [peak, _times.get("cpu", 0), _times.get("wall", 0), _times.get("loss", -1), _times.get("tokens", -1), _times.get("trained", -1)]
    open(path, "w").write(" ".join(map(str, values)))
    compiled = {"startup_s": _times.get("startup", -1), "first_step_s": _times.get("first_step", -1)}
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is not None:  # seconds dynamo, AOT autograd and inductor spent compiling; the caches' hits and misses
        compiled["compile_s"] = sum(v for k, v in dynamo.calculate_time_spent().items() if k == "entire_frame_compile")
        compiled.update({k: int(v) for group in ("inductor", "aot_autograd") for k, v in dynamo.counters[group].items() if "cache" in k})
        compiled["graphs"] = int(dynamo.counters["stats"]["unique_graphs"])
    open(path + ".compile.json", "w").write(__import__("json").dumps(compiled))
atexit.register(_bench_peak)
"""


def measured_env(work: Path, rss_file: Path, drop: tuple[str, ...], repo: Path | None, **extra: str) -> dict[str, str]:
    """The environment of a measured child process: RSS_HOOK as its sitecustomize (its peak RSS
    written to `rss_file`), PYTHONPATH the hook (then `repo`), `drop` left out, `extra` added."""
    hook_dir = work / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(RSS_HOOK)
    path = f"{hook_dir}{os.pathsep}{repo}" if repo is not None else str(hook_dir)
    kept = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *drop)}
    return {**kept, "PYTHONPATH": path, "BENCH_RSS_FILE": str(rss_file), "TOKENIZERS_PARALLELISM": "false", **extra}


def resolve_bench_precision(precision: str) -> str:
    """`native` → bf16 where this machine runs it natively, else fp32; bf16/fp32 as given."""
    if precision == "native":
        return this_machine_train_precision()
    if precision not in ("bf16", "fp32"):
        raise UserError(f"--train_precision {precision!r}: use native, bf16 or fp32")
    return precision


def config_flags(name: str, precision: str, micro_batch: int, cutoff_len: int) -> list[str]:
    """finetune.py flags of configuration `name` at this precision, micro-batch and cutoff."""
    values = {"precision": precision, "max_tokens": micro_batch * cutoff_len, "micro_batch": micro_batch}
    return [flag.format(**values) for flag in CONFIGS[name]]


def one_run(
    name: str, work: Path, model_dir: Path, data: Path, common: list[str], index: int, flags: list[str], script: str = "finetune.py"
) -> dict[str, Any]:
    out = work / "runs" / f"{name}-{index}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    if name in COLD_CACHE:
        import shutil

        shutil.rmtree(work / "cache" / "compile", ignore_errors=True)
    # TORCHINDUCTOR_CACHE_DIR dropped: the compile cache is WORK/cache/compile
    env = measured_env(work, out / "peak_mib.txt", ("TORCHINDUCTOR_CACHE_DIR",), REPO, CHINESE_VICUNA_CACHE=str(work / "cache"))
    cmd = [sys.executable, str(REPO / script), "--base_model", str(model_dir), "--data_path", str(data)]
    cmd += ["--output_dir", str(out), *common, *flags]
    t0 = time.perf_counter()
    rc, (peak, cpu, *_), stderr = run_finetune(cmd, env)
    wall = time.perf_counter() - t0
    if rc:
        raise UserError(f"benchmark run {name} failed (exit {rc}): {stderr.strip().splitlines()[-1:] if stderr else ''}")
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
    losses = [(e["step"], e["loss"]) for e in log if "loss" in e]
    end = next(e for e in log if "train_runtime" in e)
    compiled_file = out / "peak_mib.txt.compile.json"
    compiled = json.loads(compiled_file.read_text()) if compiled_file.is_file() else {}
    return {
        **compiled,  # startup_s, first_step_s; compile_s and the compile caches' hits and misses where it compiled
        "load_average": os.getloadavg(),
        "config": name,
        "index": index,
        "train_runtime_s": end["train_runtime"],
        "wall_s": wall,
        "train_loss": end["train_loss"],
        "final_loss": losses[-1][1] if losses else end["train_loss"],
        "losses": losses,
        "peak_mib": peak,
        "train_cpu_s": cpu,
    }


def data_token_counts(model_dir: Path, data: Path, cutoff_len: int, micro_batch: int, seed: int) -> dict[str, Any]:
    """Non-padding tokens of one epoch, and the padding the recipe adds (sampled estimate)."""
    import torch

    from chinese_vicuna.data.datasets import load_instruction_dataset
    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import load_template

    tokenizer = load_tokenizer(str(model_dir))
    samples = load_instruction_dataset(data, tokenizer, load_template("alpaca", tokenizer), cutoff_len, use_cache=False)
    lengths = [len(s["input_ids"]) for s in samples]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    padded = 0
    for i in range(0, len(order), micro_batch):
        chunk = [lengths[j] for j in order[i : i + micro_batch]]
        padded += max(chunk) * len(chunk)
    trainable = sum(sum(1 for x in s["labels"] if x != -100) for s in samples)
    return {"samples": len(lengths), "tokens": sum(lengths), "trainable_tokens": trainable, "padded_tokens": padded, "lengths": lengths}


def run_benchmark(
    work: Path,
    model_dir: Path,
    data: Path,
    cutoff_len: int = 512,
    repeats: int = 1,
    micro_batch: int = 4,
    batch: int = 16,
    configs: tuple[str, ...] = ("recipe", "ours"),
    max_steps: int = -1,
    extra: list[str] | None = None,
    logging_steps: int = 5,
    precision: str = "native",
) -> dict[str, Any]:
    """Interleaved runs (recipe, ours, recipe, ours, ...) so machine noise hits both alike."""
    seed = 42
    precision = resolve_bench_precision(precision)
    common = [
        "--cutoff_len", str(cutoff_len), "--micro_batch_size", str(micro_batch), "--batch_size", str(batch),
        "--num_epochs", "1", "--learning_rate", "3e-4", "--warmup_steps", "5", "--val_set_size", "0",
        "--save_strategy", "no", "--logging_steps", str(logging_steps), "--bf16", str(precision == "bf16").lower(), "--disable_tqdm", "true",
        "--seed", str(seed), "--max_steps", str(max_steps), *(extra or []),
    ]  # fmt: skip
    counts = data_token_counts(model_dir, data, cutoff_len, micro_batch, seed)
    lengths = counts.pop("lengths")
    if max_steps > 0:
        frac = min(1.0, max_steps * batch / counts["samples"])
        counts = {k: (int(v * frac) if k != "samples" else v) for k, v in counts.items()}
    peak = matmul_peak_flops(precision)
    flops_per_token = model_flops_per_token(model_dir, lengths)
    runs = []
    for i in range(repeats):
        for name in configs:
            r = one_run(name, work, model_dir, data, common, i, config_flags(name, precision, micro_batch, cutoff_len))
            r["tokens_per_s"] = counts["tokens"] / r["train_runtime_s"]
            r["tokens_per_cpu_s"] = counts["tokens"] / max(r["train_cpu_s"], 1e-9)
            r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
            logger.info(
                "%s #%d: %.0f tokens/s, %.0f tokens/CPU-s, peak %.0f MiB, final loss %.6f, start-up to first step %.1f s, compile %.1f s, load %s",
                name, i, r["tokens_per_s"], r["tokens_per_cpu_s"], r["peak_mib"], r["final_loss"] or 0, r.get("first_step_s", -1),
                r.get("compile_s", 0), r["load_average"],
            )  # fmt: skip
            runs.append(r)
    peak = max(peak, matmul_peak_flops(precision))
    summary: dict[str, Any] = {}
    for name in configs:
        rs = [r for r in runs if r["config"] == name]
        summary[name] = {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
            "peak_mib_max": max(r["peak_mib"] for r in rs),
            "tokens_per_cpu_s_median": statistics.median(r["tokens_per_cpu_s"] for r in rs),
            "final_loss_median": statistics.median(r["final_loss"] for r in rs),
            "train_loss_median": statistics.median(r["train_loss"] for r in rs),
        }
        summary[name]["mfu_median"] = summary[name]["tokens_per_s_median"] * flops_per_token / peak
        for key in ("first_step_s", "compile_s"):  # start-up to the first step; compiling (inside the train time)
            if all(key in r for r in rs):
                summary[name][f"{key}_median"] = statistics.median(r[key] for r in rs)
        recipe_runs = [r for r in runs if r["config"] == "recipe"]
        if name != "recipe" and len(recipe_runs) == len(rs):
            # within each interleaved round; a compiled run's train time includes its compiling
            summary[name]["vs_recipe_per_round"] = [o["tokens_per_s"] / r["tokens_per_s"] for r, o in zip(recipe_runs, rs, strict=True)]
            summary[name]["vs_recipe_per_cpu_s_per_round"] = [
                o["tokens_per_cpu_s"] / r["tokens_per_cpu_s"] for r, o in zip(recipe_runs, rs, strict=True)
            ]
    if "recipe" in summary and "ours" in summary:
        # Ratios within each interleaved pair, so a busy minute affects both sides of a pair.
        pairs = [
            (r, o) for r, o in zip([x for x in runs if x["config"] == "recipe"], [x for x in runs if x["config"] == "ours"], strict=True)
        ]
        summary["speedup_per_pair"] = [o["tokens_per_s"] / r["tokens_per_s"] for r, o in pairs]
        summary["speedup_median"] = statistics.median(summary["speedup_per_pair"])
        summary["cpu_speedup_per_pair"] = [o["tokens_per_cpu_s"] / r["tokens_per_cpu_s"] for r, o in pairs]
        summary["final_loss_rel_diff"] = summary["ours"]["final_loss_median"] / summary["recipe"]["final_loss_median"] - 1
        summary["peak_memory_ratio"] = summary["ours"]["peak_mib_max"] / summary["recipe"]["peak_mib_max"]
    import torch

    result = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "model": str(model_dir),
        "data": str(data),
        "cutoff_len": cutoff_len,
        "micro_batch_size": micro_batch,
        "batch_size": batch,
        "max_steps": max_steps,
        "data_tokens": counts,
        "recipe_padding_fraction_est": 1 - counts["tokens"] / max(counts["padded_tokens"], 1),
        "flops_per_token": flops_per_token,
        "precision": precision,
        "matmul_peak_flops": peak,
        "runs": runs,
        "summary": summary,
    }
    return result


def plot(result: dict[str, Any], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, x in result["summary"].items() if isinstance(x, dict)]
    palette = ["#999", "#2a7", "#27a", "#a72", "#a27"]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    axes[0].bar(names, [result["summary"][n]["tokens_per_s_median"] for n in names], color=[colors[n] for n in names])
    axes[0].set_title("non-padding tokens/s")
    axes[1].bar(names, [result["summary"][n]["peak_mib_max"] for n in names], color=[colors[n] for n in names])
    axes[1].set_title("peak memory (MiB)")
    for r in result["runs"]:
        if r["losses"]:
            axes[2].plot(*zip(*r["losses"], strict=True), color=colors[r["config"]], alpha=0.7)
    axes[2].set_title("train loss vs step (same samples)")
    axes[2].set_xlabel("optimizer step")
    fig.suptitle(f"{result['device']}, cutoff {result['cutoff_len']}, micro-batch {result['micro_batch_size']}, {result['precision']}")
    save_figure(fig, out_png)


def run_sweep(
    work: Path, model_dir: Path, cutoffs: list[int], samples: int, max_steps: int, extra: list[str] | None = None, precision: str = "native"
) -> dict[str, Any]:
    """Recipe vs ours at each cutoff_len, on data whose length distribution scales with it
    (median ~0.3x, p95 ~cutoff, tail past it): how tokens/s and memory grow with length."""
    points = []
    for cutoff in cutoffs:
        data = work / f"data-{samples}-c{cutoff}.jsonl"
        stats = make_benchmark_data(data, model_dir, samples, median=140.0 * cutoff / 512, p95=430.0 * cutoff / 512, cutoff_len=cutoff)
        logger.info("cutoff %d: %s", cutoff, stats)
        result = run_benchmark(work, model_dir, data, cutoff, max_steps=max_steps, extra=extra, precision=precision)
        points.append(
            {
                "cutoff_len": cutoff,
                "data": stats,
                **{k: result[k] for k in ("data_tokens", "recipe_padding_fraction_est", "summary", "runs")},
            }
        )
        points[-1]["matmul_peak_flops"] = result["matmul_peak_flops"]
    return {
        "device": result["device"],
        "precision": result["precision"],
        "model": str(model_dir),
        "samples": samples,
        "max_steps": max_steps,
        "points": points,
    }


def plot_sweep(result: dict[str, Any], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cutoffs = [p["cutoff_len"] for p in result["points"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for name, color in (("recipe", "#999"), ("ours", "#2a7")):
        axes[0].plot(cutoffs, [p["summary"][name]["tokens_per_s_median"] for p in result["points"]], "o-", color=color, label=name)
        axes[1].plot(cutoffs, [p["summary"][name]["peak_mib_max"] for p in result["points"]], "o-", color=color, label=name)
    for ax, title in zip(axes, ("non-padding tokens/s", "peak memory (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cutoffs, [str(c) for c in cutoffs])
        ax.set_xlabel("cutoff_len (data lengths scale with it)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{result['device']}, micro-batch 4, {result['precision']}")
    save_figure(fig, out_png)


# --------------------------------------------------------------------------------------------
# Peers: TRL's SFTTrainer and LLaMA-Factory on the same model, data, LoRA, precision and batch
# --------------------------------------------------------------------------------------------
# What each configuration's loss covers (docs/benchmarks.md):
PEER_LOSS = {
    "ours": "answer tokens + EOS (prompt masked), per-token mean over the accumulated batch",
    "trl": "completion tokens + EOS (completion_only_loss), per-token mean over the accumulated batch",
    "lf-neat": "response tokens + EOS (train_on_prompt false), per-token mean; rows packed to cutoff_len",
    "lf-padded": "response tokens + EOS (train_on_prompt false), per-token mean; padded micro-batches",
}
PEER_VENVS = {"trl": "trl", "lf-neat": "llamafactory", "lf-padded": "llamafactory"}
# Each peer's venv: torch first (the CPU wheel on this machine's disk; a bare torch pulls a CUDA build).
PEER_INSTALL = {"trl": ["trl", "peft"], "llamafactory": ["llamafactory"]}

TRL_DRIVER = """
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

spec = json.load(open(sys.argv[1]))
records = [json.loads(line) for line in open(spec["data"], encoding="utf-8") if line.strip()]
tokenizer = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
trainer = SFTTrainer(
    model=model, args=SFTConfig(**spec["sft_config"]), train_dataset=Dataset.from_list(records),
    processing_class=tokenizer, peft_config=LoraConfig(**spec["lora"]),
)
trainer.train()
"""


def peer_lora(r: int = 8) -> dict[str, Any]:
    """The LoRA every system trains: finetune.py's defaults (r 8, alpha 16, dropout 0.05, q/v)."""
    return {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def trl_sft_config(out: Path, precision: str, micro_batch: int, grad_accum: int, max_steps: int = -1, cuda: bool = False) -> dict[str, Any]:
    """SFTConfig keyword arguments: padding-free rows, loss on the completion only, our schedule."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "num_train_epochs": 1,
        "max_steps": max_steps,
        "learning_rate": 3e-4,
        "warmup_steps": 5,
        "lr_scheduler_type": "linear",
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "bf16": precision == "bf16",
        "use_cpu": not cuda,
        # The dataset comes tokenized and cut at cutoff_len (TRL does not truncate padding-free rows).
        "max_length": None,
        "padding_free": True,
        "completion_only_loss": True,
        "gradient_checkpointing": False,  # TRL's default is on; finetune.py's is off
        "dataset_num_proc": 1,
        "disable_tqdm": True,
    }


def llamafactory_config(
    model_dir: Path, dataset_dir: Path, out: Path, precision: str, micro_batch: int, grad_accum: int, cutoff_len: int, neat_packing: bool
) -> dict[str, Any]:
    """LLaMA-Factory's `llamafactory-cli train` YAML: LoRA SFT on the alpaca-format `bench` set."""
    return {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target": "q_proj,v_proj",
        "dataset": "bench",
        "dataset_dir": str(dataset_dir),
        "template": "alpaca",
        "cutoff_len": cutoff_len,
        "packing": neat_packing,
        "neat_packing": neat_packing,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "save_strategy": "no",
        "logging_steps": 5,
        "plot_loss": False,
        "disable_gradient_checkpointing": True,  # on by default in LLaMA-Factory; off in finetune.py
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "learning_rate": 3.0e-4,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "linear",
        "warmup_steps": 5,
        "bf16": precision == "bf16",
        "seed": 42,
        "report_to": "none",
        "disable_tqdm": True,
    }


def peer_command(name: str, work: Path, spec_path: Path) -> list[str]:
    """The command line of a peer run, in its own venv."""
    venv = work / "venvs" / PEER_VENVS[name]
    if name == "trl":
        return [str(venv / "bin" / "python"), str(spec_path.parent / "trl_driver.py"), str(spec_path)]
    return [str(venv / "bin" / "llamafactory-cli"), "train", str(spec_path)]


def make_peer_venvs(work: Path, venvs: list[str]) -> dict[str, str]:
    """WORK/venvs/{trl,llamafactory}: torch==2.13.0 first, then the peer (kept once it imports).
    Returns the last line of pip's error by venv, for the venvs that could not be made."""
    errors = {}
    for venv in venvs:
        packages = PEER_INSTALL[venv]
        python = work / "venvs" / venv / "bin" / "python"
        check = [str(python), "-c", f"import {venv}"]
        if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
            continue
        if not python.is_file():
            subprocess.run([str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", str(python.parent.parent)], check=True)
        for step in (["torch==2.13.0"], packages):
            proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *step], capture_output=True, text=True)
            if proc.returncode:
                lines = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
                errors[venv] = " ".join(lines) or f"pip exit {proc.returncode}"
                break
    return errors


def peer_versions(work: Path, venv: str) -> dict[str, str]:
    code = "import json, importlib.metadata as m\nout = {}\nfor p in ('torch', 'transformers', 'peft', 'trl', 'llamafactory', 'datasets', 'accelerate'):\n    try:\n        out[p] = m.version(p)\n    except Exception:\n        pass\nprint(json.dumps(out))"
    proc = subprocess.run([str(work / "venvs" / venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def peer_run(
    name: str,
    work: Path,
    model_dir: Path,
    data: Path,
    precision: str,
    micro_batch: int,
    grad_accum: int,
    cutoff_len: int,
    index: int,
    max_steps: int,
) -> dict[str, Any]:
    """One peer run in a fresh process of its venv, timed by the same Trainer.train hook as ours."""
    import shutil

    import yaml

    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import load_template

    run_dir = work / "peers" / f"{name}-{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").split("\n") if line.strip()]
    if name == "trl":
        # finetune.py's own tokens (prompt + answer + EOS, cut at cutoff_len), with the answer as
        # TRL's completion_mask: both train on exactly the same tokens.
        from chinese_vicuna.data.encode import tokenize_instructions

        tokenizer = load_tokenizer(str(model_dir))
        samples = tokenize_instructions(records, tokenizer, load_template("alpaca", tokenizer), cutoff_len)
        rows = [
            {"input_ids": list(map(int, x["input_ids"])), "completion_mask": [int(v != -100) for v in x["labels"]]}
            for x in samples
            if any(v != -100 for v in x["labels"])
        ]
        (run_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (run_dir / "trl_driver.py").write_text(TRL_DRIVER)
        spec = {
            "model": str(model_dir),
            "data": str(run_dir / "data.jsonl"),
            "dtype": "bfloat16" if precision == "bf16" else "float32",
            "lora": peer_lora(),
            "sft_config": trl_sft_config(
                run_dir / "out", precision, micro_batch, grad_accum, max_steps, cuda=bool(machine_info().get("gpu"))
            ),
        }
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
    else:
        (run_dir / "bench.jsonl").write_text(data.read_text(encoding="utf-8"), encoding="utf-8")
        (run_dir / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.jsonl"}}))
        config = llamafactory_config(model_dir, run_dir, run_dir / "out", precision, micro_batch, grad_accum, cutoff_len, name == "lf-neat")
        if max_steps > 0:
            config["max_steps"] = max_steps
        spec_path = run_dir / "config.yaml"
        spec_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = measured_env(
        work, run_dir / "peak_mib.txt", ("VIRTUAL_ENV",), None,
        BENCH_CWD=str(run_dir),
        CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        DISABLE_VERSION_CHECK="1",  # LLaMA-Factory refuses unlisted transformers versions otherwise
    )  # fmt: skip
    rc, (peak, cpu, wall, loss, tokens, trained), stderr = run_finetune(peer_command(name, work, spec_path), env)
    (run_dir / "stderr.txt").write_text(stderr)
    if rc:
        raise UserError(
            f"peer {name} failed (exit {rc}): {stderr.strip().splitlines()[-1:] if stderr else ''}; log: {run_dir / 'stderr.txt'}"
        )
    return {
        "config": name,
        "index": index,
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "peak_mib": peak,
        "train_loss": loss,
        "tokens": tokens,
        "trained_tokens": trained,
    }


def run_peers(
    work: Path,
    model_dir: Path,
    data: Path,
    configs: list[str],
    repeats: int,
    cutoff_len: int,
    micro_batch: int,
    batch: int,
    precision: str,
    max_steps: int = -1,
) -> dict[str, Any]:
    """Ours and the peers, interleaved rounds; tokens/s and tokens per CPU-second over the same data."""
    precision = resolve_bench_precision(precision)
    install_errors = make_peer_venvs(work, sorted({PEER_VENVS[c] for c in configs if c != "ours"}))
    available = [c for c in configs if c == "ours" or PEER_VENVS[c] not in install_errors]
    counts = data_token_counts(model_dir, data, cutoff_len, micro_batch, 42)
    grad_accum = batch // micro_batch
    common = [
        "--cutoff_len", str(cutoff_len), "--micro_batch_size", str(micro_batch), "--batch_size", str(batch),
        "--num_epochs", "1", "--learning_rate", "3e-4", "--warmup_steps", "5", "--val_set_size", "0",
        "--save_strategy", "no", "--logging_steps", "5", "--bf16", str(precision == "bf16").lower(), "--disable_tqdm", "true",
        "--seed", "42", "--max_steps", str(max_steps),
    ]  # fmt: skip
    runs = []
    for i in range(repeats):
        for name in available:
            if name == "ours":
                r = one_run("ours", work, model_dir, data, common, i, [])
                r = {"config": "ours", "index": i, "train_wall_s": r["train_runtime_s"], "train_cpu_s": r["train_cpu_s"],
                     "peak_mib": r["peak_mib"], "train_loss": r["train_loss"], "tokens": float(counts["tokens"]),
                     "trained_tokens": float(counts["trainable_tokens"])}  # fmt: skip
            else:
                r = peer_run(name, work, model_dir, data, precision, micro_batch, grad_accum, cutoff_len, i, max_steps)
            r["tokens_per_s"] = r["tokens"] / max(r["train_wall_s"], 1e-9)
            r["tokens_per_cpu_s"] = r["tokens"] / max(r["train_cpu_s"], 1e-9)
            logger.info(
                "%s #%d: %.0f tokens/s, %.0f tokens/CPU-s, peak %.0f MiB, loss %.4f",
                name,
                i,
                r["tokens_per_s"],
                r["tokens_per_cpu_s"],
                r["peak_mib"],
                r["train_loss"],
            )
            runs.append(r)
    summary: dict[str, Any] = {}
    for name in available:
        rs = [r for r in runs if r["config"] == name]
        summary[name] = {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
            "tokens_per_cpu_s_median": statistics.median(r["tokens_per_cpu_s"] for r in rs),
            "peak_mib_max": max(r["peak_mib"] for r in rs),
            "final_loss_median": statistics.median(r["train_loss"] for r in rs),
            "tokens": rs[0]["tokens"],
            "trained_tokens": rs[0]["trained_tokens"],
            "loss_covers": PEER_LOSS[name],
        }
    return {
        "machine": machine_info(),
        "precision": precision,
        "model": str(model_dir),
        "data": str(data),
        "cutoff_len": cutoff_len,
        "micro_batch_size": micro_batch,
        "batch_size": batch,
        "lora": peer_lora(),
        "versions": {v: peer_versions(work, v) for v in sorted({PEER_VENVS[c] for c in available if c != "ours"})},
        "install_errors": install_errors,
        "runs": runs,
        "summary": summary,
    }


def plot_peers(result: dict[str, Any], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for ax, key, title in zip(
        axes,
        ("tokens_per_s_median", "tokens_per_cpu_s_median", "peak_mib_max"),
        ("non-padding tokens/s", "tokens per train CPU-second", "peak memory (MiB)"),
        strict=True,
    ):
        ax.bar(names, [result["summary"][n][key] for n in names], color=["#2a7" if n == "ours" else "#999" for n in names])
        ax.set_title(title)
    fig.suptitle(
        f"peers, {result['precision']}, cutoff {result['cutoff_len']}, micro-batch {result['micro_batch_size']} x {result['batch_size'] // result['micro_batch_size']}"
    )
    save_figure(fig, out_png)


# --------------------------------------------------------------------------------------------
# Tokenization speed
# --------------------------------------------------------------------------------------------
def recipe_tokenize(tokenizer: Any, template: Any, record: dict[str, str], cutoff_len: int) -> dict[str, list[int]]:
    """alpaca-lora's `generate_and_tokenize_prompt`, run per sample by `datasets.map`: the full
    prompt + answer, then the prompt alone again to find how many labels to mask."""
    prompt = template.instruction_prompt(record["instruction"], record["input"])
    full = tokenizer(prompt + record["output"], truncation=True, max_length=cutoff_len)
    input_ids = list(full["input_ids"])
    if len(input_ids) < cutoff_len and input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
    n_prompt = len(tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"])
    return {"input_ids": input_ids, "labels": [-100] * n_prompt + input_ids[n_prompt:]}


def tokenize_speed(model_dir: Path, data: Path, n: int = 50000, repeats: int = 3) -> dict[str, Any]:
    """Seconds to tokenize n records: batched (`tokenize_instructions`, what finetune.py runs)
    vs the same segments encoded one sample per tokenizer call, and vs the recipe's per-sample
    function. Each timing is the best of `repeats`; the per-sample ones time a slice and scale."""
    from chinese_vicuna.data.encode import encode_segments, tokenize_instructions
    from chinese_vicuna.data.records import read_records, validate_instruction
    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import load_template

    tokenizer = load_tokenizer(str(model_dir))
    template = load_template("alpaca", tokenizer)
    base = [validate_instruction(r) for r in read_records(data)]
    m = min(n, 5000)

    def distinct_records(start: int, count: int) -> list[dict[str, str]]:
        # Every segment distinct (numbered instruction AND answer), and fresh texts for every
        # timing: the HF tokenizer caches whole segments (its pre-tokenizer does not split),
        # so repeated texts would flatter the per-sample baselines.
        return [
            {
                **base[i % len(base)],
                "instruction": f"{base[i % len(base)]['instruction']} 第{i}题",
                "output": f"{base[i % len(base)]['output']} 答{i}",
            }
            for i in range(start, start + count)
        ]

    def best(make: Any, run: Any) -> float:
        times = []
        for k in range(repeats):
            records = make(k)
            t0 = time.perf_counter()
            run(records)
            times.append(time.perf_counter() - t0)
        return min(times)

    first_batch: list[dict[str, list[int]]] = []

    def batched(records: list[dict[str, str]]) -> None:
        samples = tokenize_instructions(records, tokenizer, template, 512)
        first_batch[:] = samples[:10]

    def one_at_a_time(records: list[dict[str, str]]) -> None:
        for r in records:
            encode_segments(tokenizer, template.instruction_segments(r["instruction"], r["input"], r["output"]), add_eos=True)

    t_batched = best(lambda k: distinct_records(k * n, n), batched)
    offset = repeats * n
    t_single = best(lambda k: distinct_records(offset + k * m, m), one_at_a_time) * n / m
    offset += repeats * m
    t_recipe = (
        best(lambda k: distinct_records(offset + k * m, m), lambda rs: [recipe_tokenize(tokenizer, template, r, 512) for r in rs]) * n / m
    )
    records = distinct_records((repeats - 1) * n, 10)
    single = [
        encode_segments(tokenizer, template.instruction_segments(r["instruction"], r["input"], r["output"]), add_eos=True) for r in records
    ]
    assert [s["input_ids"] for s in first_batch] == [ids[:512] for ids, _ in single]
    return {
        "samples": n,
        "batched_s": t_batched,
        "one_at_a_time_s": t_single,
        "speedup": t_single / t_batched,
        "recipe_per_sample_s": t_recipe,
        "speedup_vs_recipe": t_recipe / t_batched,
        "timing": f"best of {repeats}, fresh distinct records each time; per-sample times measured on {m} records, scaled to {n}",
    }


# --------------------------------------------------------------------------------------------
# GRPO rollouts: the group sampler (infer/rollouts.py) vs HF generate as TRL calls it
# --------------------------------------------------------------------------------------------
def rollout_model(model_dir: Path, lora_r: int, lora_weights: str | None = None, seed: int = 0) -> tuple[Any, Any, list[list[int]]]:
    """The model as GRPO holds it: a PeftModel with the adapter `lora_weights` (an SFT adapter: its
    answers end), else a LoRA of rank `lora_r` whose B weights are random, so that the adapter
    changes the answers (none for 0); its tokenizer; and the alpaca prompt ids of
    sample/instruct/data_sample.jsonl (through the inference owner)."""
    import torch

    from chinese_vicuna.data.records import read_records, validate_instruction
    from chinese_vicuna.infer.engine import Engine
    from chinese_vicuna.model.adapters import add_lora
    from chinese_vicuna.model.build import load_for_inference

    model, tokenizer = load_for_inference(str(model_dir), lora_weights)
    if lora_r and not lora_weights:
        torch.manual_seed(seed)
        model = add_lora(model, lora_r, 2 * lora_r, 0.0, "all-linear")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
    engine = Engine.around(model, tokenizer, "alpaca", [model_dir], "instruction")
    records = [validate_instruction(r) for r in read_records(REPO / "sample" / "instruct" / "data_sample.jsonl")]
    return model, tokenizer, [engine.instruction_ids(r["instruction"], r["input"]) for r in records]


def hf_generate_groups(
    model: Any, prompts: list[list[int]], group: int, max_new_tokens: int, temperature: float, eos: int, pad: int
) -> list[list[int]]:
    """TRL's GRPOTrainer without vLLM: each prompt repeated `group` times, left-padded, one
    `model.generate` call; each completion cut after its first EOS."""
    import torch

    rows = [p for p in prompts for _ in range(group)]
    width = max(len(p) for p in rows)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling
        )
    return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, width:].tolist()]


def rollout_speed(
    model_dir: Path,
    prompts_count: int,
    group: int,
    max_new_tokens: int,
    repeats: int,
    temperature: float,
    lora_r: int,
    lora_weights: str | None = None,
) -> dict[str, Any]:
    """Generated tokens per second (each completion up to and including its EOS) of the built-in
    group sampler and of HF generate on the same prompts, interleaved `repeats` times; and whether
    both give the same greedy completions."""
    import torch

    from chinese_vicuna.infer.rollouts import sample_groups

    model, tokenizer, prompts = rollout_model(model_dir, lora_r, lora_weights)
    prompts = prompts[:prompts_count]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.eval()
    greedy_ours = sample_groups(model, prompts, 1, max_new_tokens, temperature=0, eos_token_id=eos, pad_token_id=pad).completion_ids
    greedy_equal = greedy_ours == hf_generate_groups(model, prompts, 1, max_new_tokens, 0, eos, pad)
    runs = []
    for index in range(repeats):
        for config in ("hf_generate", "builtin"):  # interleaved: a busy machine hurts both alike
            start, cpu_start = time.perf_counter(), time.process_time()
            if config == "builtin":
                generator = torch.Generator().manual_seed(index)
                kwargs = {"temperature": temperature, "eos_token_id": eos, "pad_token_id": pad, "generator": generator}
                completions = sample_groups(model, prompts, group, max_new_tokens, **kwargs).completion_ids
            else:
                completions = hf_generate_groups(model, prompts, group, max_new_tokens, temperature, eos, pad)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            tokens = sum(len(c) for c in completions)
            ended = sum(1 for c in completions if c[-1] == eos)
            runs.append(
                {
                    "config": config,
                    "repeat": index,
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                    "cpu_seconds": cpu_seconds,
                    "tokens_per_cpu_s": tokens / cpu_seconds,
                    "ended_by_eos": ended,
                }
            )
            logger.info(
                "%s: %d tokens in %.1f s, %.1f CPU-s (%.0f tokens/s, %.0f tokens/CPU-s), %d of %d ended by EOS",
                config,
                tokens,
                seconds,
                cpu_seconds,
                tokens / seconds,
                tokens / cpu_seconds,
                ended,
                len(completions),
            )
    # on a shared machine wall time counts the other jobs too; CPU time (one thread) much less so
    summary: dict[str, Any] = {
        c: {k + "_median": statistics.median(r[k] for r in runs if r["config"] == c) for k in ("tokens_per_s", "tokens_per_cpu_s")}
        for c in ("hf_generate", "builtin")
    }
    pairs = list(zip(runs[::2], runs[1::2]))
    summary["speedup_median"] = statistics.median(b["tokens_per_s"] / h["tokens_per_s"] for h, b in pairs)
    summary["cpu_speedup_median"] = statistics.median(b["tokens_per_cpu_s"] / h["tokens_per_cpu_s"] for h, b in pairs)
    return {
        "model": str(model_dir),
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "num_generations": group,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "lora_r": None if lora_weights else lora_r,
        "lora_weights": lora_weights,
        "torch_threads": torch.get_num_threads(),
        "greedy_equal": greedy_equal,
        "machine": machine_info(),
        "summary": summary,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# scripts/gpu_check.sh's report
# --------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """The device and library versions a figure belongs to."""
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "precision": this_machine_train_precision()}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "flash_attn"):
        info[name] = importlib.metadata.version(name) if importlib.util.find_spec(name) else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), load_average=os.getloadavg())
    return info


def gpu_report(work: Path) -> tuple[dict[str, Any], str]:
    """WORK's env.json, steps.tsv, gpu_memory.json and speed-*/peers-*.json as one JSON and a markdown table."""

    def load(path: Path) -> Any:
        return json.loads(path.read_text()) if path.is_file() else None

    steps = []
    if (work / "steps.tsv").is_file():
        for line in (work / "steps.tsv").read_text().splitlines():
            name, status, seconds = line.split("\t")
            steps.append({"step": name, "status": status, "seconds": int(seconds)})
    speed = {p.stem: load(p) for p in sorted(work.glob("speed-*.json"))}
    peers = {p.stem: load(p) for p in sorted(work.glob("peers-*.json"))}
    result = {"env": load(work / "env.json"), "steps": steps, "memory": load(work / "gpu_memory.json"), "speed": speed, "peers": peers}
    env = result["env"] or {}
    lines = [f"# GPU check: {env.get('gpu', '?')} ({env.get('memory_gib', '?')} GiB), torch {env.get('torch', '?')}", ""]
    lines += ["| step | status | seconds |", "|---|---|---|", *(f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps), ""]
    if result["memory"]:
        lines += ["| 7B-shaped LoRA, micro-batch 4 | peak allocated GiB | peak reserved GiB |", "|---|---|---|"]
        lines += [f"| {k} | {v['allocated_gib']} | {v['reserved_gib']} |" for k, v in result["memory"].items() if isinstance(v, dict)]
        lines.append("")
    rows = [(name, config, summary) for name, r in {**speed, **peers}.items() if r for config, summary in r["summary"].items()]
    rows = [(name, config, x) for name, config, x in rows if isinstance(x, dict)]
    if rows:
        lines += ["| run | configuration | tokens/s | peak MiB | MFU | final loss |", "|---|---|---|---|---|---|"]
        for name, config, x in rows:
            mfu = f"{x['mfu_median']:.1%}" if "mfu_median" in x else ""
            lines.append(
                f"| {name} | {config} | {x['tokens_per_s_median']:.0f} | {x['peak_mib_max']:.0f} | {mfu} | {x['final_loss_median']:.4f} |"
            )
    return result, "\n".join(lines) + "\n"


@dataclass
class PeersArguments:
    samples: int = field(default=400, metadata={"help": "Samples (one epoch)."})
    repeats: int = field(default=3, metadata={"help": "Interleaved rounds."})
    configs: str = field(default="ours,lf-neat,lf-padded,trl", metadata={"help": f"Of {', '.join(PEER_LOSS)}."})
    cutoff_len: int = field(default=512)
    micro_batch_size: int = field(default=4)
    batch_size: int = field(default=16)
    max_steps: int = field(default=-1)
    train_precision: str = field(default="native", metadata={"help": "native, bf16 or fp32."})
    shape: str = field(default="50m")
    model: str | None = field(default=None)
    out: str | None = field(default=None, metadata={"help": "JSON path (default WORK/peers.json)."})


@dataclass
class ReportArguments:
    pass


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def prepare(work: Path, samples: int, shape: str = "50m", model: Path | None = None) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model or work / f"llama-{shape}"
    if model is not None and not (model / "config.json").is_file():
        raise UserError(f"--model {model}: no config.json; give a Hugging Face LLaMA folder")
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, shape)
    data = work / f"data-{samples}.jsonl"
    stats = make_benchmark_data(data, model_dir, samples)
    logger.info("wrote %s: %s", data, stats)
    return model_dir, data


@dataclass
class PrepareArguments:
    samples: int = field(default=400, metadata={"help": "Instruction-like samples to generate."})
    shape: str = field(default="50m", metadata={"help": f"Model shape: {', '.join(sorted(MODEL_SHAPES))}."})


@dataclass
class RunArguments:
    samples: int = field(default=400, metadata={"help": "Samples (one epoch)."})
    cutoff_len: int = field(default=512)
    repeats: int = field(default=1, metadata={"help": "Interleaved recipe/ours rounds."})
    micro_batch_size: int = field(default=4)
    batch_size: int = field(default=16)
    max_steps: int = field(default=-1, metadata={"help": "Stop early (cutoff sweeps); -1 = one epoch."})
    configs: str = field(default="recipe,ours", metadata={"help": "Which configurations, comma-separated."})
    train_precision: str = field(
        default="native", metadata={"help": "native (bf16 where the CPU/GPU runs it natively, else fp32), bf16 or fp32."}
    )
    model: str | None = field(default=None, metadata={"help": "Use this model folder instead of building one."})
    out: str | None = field(default=None, metadata={"help": "JSON path (default WORK/benchmark[-quick].json)."})
    shape: str = field(default="50m", metadata={"help": f"Model shape built when --model is not given: {', '.join(MODEL_SHAPES)}."})


@dataclass
class QuickArguments(RunArguments):
    samples: int = field(default=24)
    batch_size: int = field(default=8)
    shape: str = field(default="tiny")


@dataclass
class SweepArguments:
    cutoffs: str = field(default="256,512,1024,2048")
    samples: int = field(default=128)
    max_steps: int = field(default=4, metadata={"help": "Optimizer steps per run (batch 16)."})
    train_precision: str = field(
        default="native", metadata={"help": "native (bf16 where the CPU/GPU runs it natively, else fp32), bf16 or fp32."}
    )
    model: str | None = field(default=None, metadata={"help": "Use this model folder instead of building one."})
    out: str | None = field(default=None, metadata={"help": "JSON path (default WORK/sweep.json)."})


@dataclass
class TokenizeArguments:
    samples: int = field(default=50000)
    model: str | None = field(default=None, metadata={"help": "Tokenizer/model folder (default: WORK/llama-50m, built if missing)."})


@dataclass
class RolloutArguments:
    prompts: int = field(default=8, metadata={"help": "Prompts (sample/instruct/data_sample.jsonl, alpaca template)."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt."})
    max_new_tokens: int = field(default=64)
    temperature: float = field(default=1.0)
    lora_r: int = field(default=8, metadata={"help": "Rank of the random LoRA on all linear layers the model carries (0: none)."})
    lora_weights: str | None = field(default=None, metadata={"help": "A trained adapter to carry instead (answers that end in EOS)."})
    repeats: int = field(default=2, metadata={"help": "Interleaved HF/built-in rounds."})
    model: str | None = field(default=None, metadata={"help": "Model folder (default: WORK/llama-50m, built if missing)."})
    out: str | None = field(default=None, metadata={"help": "JSON path (default WORK/rollout.json)."})


@dataclass
class LogitsArguments:
    vocab: int = field(default=128256, metadata={"help": "Vocabulary of the tiny model (Llama-3's: 128256)."})
    micro_batch_size: int = field(default=4)
    cutoff_len: int = field(default=2048)
    chunks: str = field(default="0,1024", metadata={"help": "--loss_chunk_size values to measure (0: the model's own logits)."})
    repeats: int = field(default=3)


# One packed training step (forward + backward, LoRA r=8 on all linear layers, every position
# trained as in pretraining) of a tiny fp32 LLaMA with a large vocabulary; prints its peak RSS.
LOGITS_STEP = """
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from chinese_vicuna.model.adapters import add_lora
from chinese_vicuna.train.packing import packed_loss
vocab, rows, length, chunk = (int(x) for x in sys.argv[1:5])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=length)
model = add_lora(LlamaForCausalLM(config), 8, 16, 0.0, "all-linear")
ids = torch.randint(3, vocab, (1, rows * length))
targets = torch.cat([torch.cat([ids[0, i * length + 1:(i + 1) * length], torch.tensor([-100])]) for i in range(rows)])[None]
inputs = {"input_ids": ids, "position_ids": torch.arange(length).repeat(rows)[None], "shift_labels": targets}
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
before = hwm()
start = time.perf_counter()
loss, _, _ = packed_loss(model, inputs, chunk=chunk)
loss.backward()
print(json.dumps({"chunk": chunk, "loss": loss.item(), "peak_mib": hwm(), "before_step_mib": before, "step_s": time.perf_counter() - start}))
"""


def logits_memory(vocab: int, rows: int, length: int, chunks: list[int], repeats: int) -> dict[str, Any]:
    """Peak memory of one training step per --loss_chunk_size, each in a fresh process (LOGITS_STEP)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    runs = []
    for _ in range(repeats):
        for chunk in chunks:  # interleaved: a busy machine hurts every configuration alike
            proc = subprocess.run(
                [sys.executable, "-c", LOGITS_STEP, str(vocab), str(rows), str(length), str(chunk)], env=env, capture_output=True, text=True
            )
            if proc.returncode:
                raise UserError(f"logits step with --loss_chunk_size {chunk} failed: {proc.stderr.strip().splitlines()[-1]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {
        str(c): {k: statistics.median(r[k] for r in runs if r["chunk"] == c) for k in ("peak_mib", "before_step_mib", "step_s", "loss")}
        for c in chunks
    }
    fp32_logits_mib = rows * length * vocab * 4 / 2**20
    return {
        "vocab": vocab,
        "tokens": rows * length,
        "fp32_logits_mib": fp32_logits_mib,
        "machine": machine_info(),
        "summary": summary,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# Preference training: finetune_dpo.py against SFT on the same data and TRL's DPOTrainer
# --------------------------------------------------------------------------------------------
# What each `dpo` configuration runs (one fresh process each; peak RSS and Trainer.train CPU time).
DPO_CONFIGS = {
    "sft": "finetune.py on the chosen answers, micro-batch M",
    "sft-pairs": "finetune.py on chosen and rejected as samples, micro-batch 2M (DPO's sequences a step)",
    "dpo": "finetune_dpo.py from the base (reference: the adapter disabled), micro-batch M pairs",
    "dpo-sft": "finetune_dpo.py --lora_weights (the sft run's adapter; reference: it, loaded again frozen)",
    "dpo-split": "finetune_dpo.py --pref_split_sequences true from the base (chosen, then rejected through the model)",
    "dpo-sft-split": "finetune_dpo.py --pref_split_sequences true --lora_weights (the sft run's adapter)",
    "trl": "TRL DPOTrainer on the same token ids, LoRA via peft_config (reference: the adapter disabled)",
}
DPO_LR, DPO_BETA = 1e-4, 0.1

TRL_DPO_DRIVER = """
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

spec = json.load(open(sys.argv[1]))
rows = [json.loads(line) for line in open(spec["data"], encoding="utf-8") if line.strip()]
# The pairs come as finetune_dpo.py's token ids (prompt_ids with BOS, answers with EOS, cut at
# cutoff_len), the columns TRL's own tokenization produces: both trainers train on the same tokens.
DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset
tokenizer = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
trainer = DPOTrainer(
    model=model, args=DPOConfig(**spec["dpo_config"]), train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer, peft_config=LoraConfig(**spec["lora"]),
)
trainer.train()
"""


def dpo_flags(precision: str, cutoff_len: int, max_steps: int) -> list[str]:
    """The flags every project run of the `dpo` case shares (finetune.py's LoRA defaults: r 8, q/v)."""
    return [
        "--cutoff_len", str(cutoff_len), "--num_epochs", "1", "--learning_rate", str(DPO_LR), "--warmup_steps", "0",
        "--val_set_size", "0", "--save_strategy", "no", "--logging_steps", "1", "--bf16", str(precision == "bf16").lower(),
        "--disable_tqdm", "true", "--seed", "42", "--max_steps", str(max_steps),
    ]  # fmt: skip


def trl_dpo_config(out: Path, precision: str, micro_batch: int, max_steps: int = -1, cuda: bool = False) -> dict[str, Any]:
    """DPOConfig keyword arguments: `dpo_flags`' schedule and batch, the sigmoid loss at the same
    beta; gradient checkpointing off as in finetune_dpo.py (TRL's default is on)."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "max_steps": max_steps,
        "learning_rate": DPO_LR,
        "warmup_steps": 0,
        "lr_scheduler_type": "linear",
        "beta": DPO_BETA,
        "loss_type": ["sigmoid"],
        "max_length": None,  # cut at cutoff_len already (prompt first)
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "bf16": precision == "bf16",
        "use_cpu": not cuda,
        "gradient_checkpointing": False,
        "dataset_num_proc": 1,
        "disable_tqdm": True,
    }


def make_dpo_data(data: Path, work: Path) -> dict[str, Path]:
    """From the benchmark's instruction records: pairs (chosen: a record's answer; rejected: the next
    record's), the chosen answers as SFT data, and chosen and rejected as SFT samples side by side."""
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").split("\n") if line.strip()]
    pairs = [
        {"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": records[(i + 1) % len(records)]["output"]}
        for i, r in enumerate(records)
    ]
    as_samples = [{"instruction": p["instruction"], "input": p["input"], "output": p[k]} for p in pairs for k in ("chosen", "rejected")]
    files = {"pairs": work / "dpo-pairs.jsonl", "sft": work / "dpo-sft-chosen.jsonl", "sft-pairs": work / "dpo-sft-pairs.jsonl"}
    for name, rows in (("pairs", pairs), ("sft", records), ("sft-pairs", as_samples)):
        atomic_write_bytes(files[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return files


def trl_dpo_run(work: Path, model_dir: Path, pairs: Any, precision: str, micro_batch: int, index: int, max_steps: int) -> dict[str, Any]:
    """TRL's DPOTrainer on `pairs` (our tokenized SequenceGroups) in a fresh process of this interpreter."""
    import shutil

    from chinese_vicuna.data.preference import prompt_length

    run_dir = work / "runs" / f"trl-{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    rows = []
    for pair in pairs:
        chosen, rejected = (x.tolist() for x in pair["input_ids"])
        n = prompt_length(pair["labels"][0])
        rows.append({"prompt_ids": chosen[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    (run_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (run_dir / "trl_dpo_driver.py").write_text(TRL_DPO_DRIVER)
    spec = {
        "model": str(model_dir),
        "data": str(run_dir / "pairs.jsonl"),
        "dtype": "bfloat16" if precision == "bf16" else "float32",
        "lora": peer_lora(),
        "dpo_config": trl_dpo_config(run_dir / "out", precision, micro_batch, max_steps, cuda=bool(machine_info().get("gpu"))),
    }
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    env = measured_env(work, run_dir / "peak_mib.txt", (), None, BENCH_CWD=str(run_dir))
    rc, (peak, cpu, wall, loss, *_), stderr = run_finetune(
        [sys.executable, str(run_dir / "trl_dpo_driver.py"), str(run_dir / "spec.json")], env
    )
    (run_dir / "stderr.txt").write_text(stderr)
    if rc:
        raise UserError(f"TRL DPOTrainer failed (exit {rc}): {stderr.strip().splitlines()[-1:]}; log: {run_dir / 'stderr.txt'}")
    return {"config": "trl", "index": index, "train_wall_s": wall, "train_cpu_s": cpu, "peak_mib": peak, "train_loss": loss}


def run_dpo(
    work: Path,
    model_dir: Path,
    data: Path,
    configs: list[str],
    repeats: int,
    cutoff_len: int,
    micro_batch: int,
    precision: str,
    max_steps: int,
) -> dict[str, Any]:
    """The `dpo` case: interleaved rounds of `configs` (DPO_CONFIGS) on the same records; tokens per
    train CPU-second over the non-padding tokens each run trains on, and peak memory."""
    from chinese_vicuna.data.preference import load_preference_dataset
    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import load_template

    unknown = [c for c in configs if c not in DPO_CONFIGS]
    if unknown:
        raise UserError(f"--configs {','.join(unknown)}: unknown; use some of {', '.join(DPO_CONFIGS)}")
    for after_sft in ("dpo-sft", "dpo-sft-split"):
        if after_sft in configs and ("sft" not in configs or configs.index("sft") > configs.index(after_sft)):
            raise UserError(f"--configs: {after_sft} starts from the sft run's adapter; list sft before it")
    precision = resolve_bench_precision(precision)
    files = make_dpo_data(data, work)
    tokenizer = load_tokenizer(str(model_dir))
    pairs = load_preference_dataset(files["pairs"], tokenizer, load_template("alpaca", tokenizer), cutoff_len, use_cache=False)
    pair_tokens = float(pairs.lengths.sum())
    steps = math.ceil(len(pairs) / micro_batch) if max_steps <= 0 else min(max_steps, math.ceil(len(pairs) / micro_batch))
    share = min(1.0, steps * micro_batch / len(pairs))  # of the data the runs train on (--max_steps)
    tokens = {
        "sft": data_token_counts(model_dir, files["sft"], cutoff_len, micro_batch, 42)["tokens"] * share,
        "sft-pairs": data_token_counts(model_dir, files["sft-pairs"], cutoff_len, 2 * micro_batch, 42)["tokens"] * share,
        "dpo": pair_tokens * share,
        "dpo-sft": pair_tokens * share,
        "dpo-split": pair_tokens * share,
        "dpo-sft-split": pair_tokens * share,
        "trl": pair_tokens * share,
    }
    common = dpo_flags(precision, cutoff_len, max_steps)
    batch = ["--micro_batch_size", str(micro_batch), "--batch_size", str(micro_batch)]
    pair_batch = ["--micro_batch_size", str(2 * micro_batch), "--batch_size", str(2 * micro_batch)]
    dpo = ["--pref_beta", str(DPO_BETA)]
    split = ["--pref_split_sequences", "true"]
    runs = []
    for i in range(repeats):
        for name in configs:
            if name == "trl":
                r = trl_dpo_run(work, model_dir, pairs, precision, micro_batch, i, max_steps)
            else:
                script, data_file, flags = {
                    "sft": ("finetune.py", files["sft"], batch),
                    "sft-pairs": ("finetune.py", files["sft-pairs"], pair_batch),
                    "dpo": ("finetune_dpo.py", files["pairs"], batch + dpo),
                    "dpo-sft": ("finetune_dpo.py", files["pairs"], [*batch, *dpo, "--lora_weights", str(work / "runs" / f"sft-{i}")]),
                    "dpo-split": ("finetune_dpo.py", files["pairs"], batch + dpo + split),
                    "dpo-sft-split": (
                        "finetune_dpo.py",
                        files["pairs"],
                        [*batch, *dpo, *split, "--lora_weights", str(work / "runs" / f"sft-{i}")],
                    ),
                }[name]
                o = one_run(name, work, model_dir, data_file, common, i, flags, script=script)
                r = {"config": name, "index": i, "train_wall_s": o["train_runtime_s"], "train_cpu_s": o["train_cpu_s"],
                     "peak_mib": o["peak_mib"], "train_loss": o["train_loss"]}  # fmt: skip
            r["tokens"] = tokens[name]
            r["tokens_per_cpu_s"] = r["tokens"] / max(r["train_cpu_s"], 1e-9)
            r["load_average"] = os.getloadavg()
            logger.info(
                "%s #%d: %.0f tokens/CPU-s, peak %.0f MiB, loss %.4f", name, i, r["tokens_per_cpu_s"], r["peak_mib"], r["train_loss"]
            )
            runs.append(r)
    summary: dict[str, Any] = {}
    for name in configs:
        rs = [r for r in runs if r["config"] == name]
        summary[name] = {
            "tokens_per_cpu_s_median": statistics.median(r["tokens_per_cpu_s"] for r in rs),
            "peak_mib_max": max(r["peak_mib"] for r in rs),
            "train_cpu_s_median": statistics.median(r["train_cpu_s"] for r in rs),
            "train_loss_median": statistics.median(r["train_loss"] for r in rs),
            "tokens": tokens[name],
            "runs": DPO_CONFIGS[name],
        }
    ratios = {}
    for a in ("dpo", "dpo-sft", "dpo-split", "dpo-sft-split"):
        for b in ("sft", "sft-pairs", "trl"):
            if a in summary and b in summary:
                ratios[f"peak {a}/{b}"] = summary[a]["peak_mib_max"] / summary[b]["peak_mib_max"]
    for a in ("dpo", "dpo-split"):
        if a in summary and "trl" in summary:
            ratios[f"tokens_per_cpu_s {a}/trl"] = summary[a]["tokens_per_cpu_s_median"] / summary["trl"]["tokens_per_cpu_s_median"]
    summary["ratios"] = ratios
    return {
        "machine": machine_info(),
        "precision": precision,
        "model": str(model_dir),
        "pairs": len(pairs),
        "pair_tokens": pair_tokens,
        "cutoff_len": cutoff_len,
        "micro_batch_size": micro_batch,
        "max_steps": max_steps,
        "steps": steps,
        "learning_rate": DPO_LR,
        "beta": DPO_BETA,
        "lora": peer_lora(),
        "runs": runs,
        "summary": summary,
    }


@dataclass
class DpoArguments:
    samples: int = field(default=40, metadata={"help": "Instruction records: as many pairs (one epoch)."})
    configs: str = field(default="sft,sft-pairs,dpo,dpo-sft,trl", metadata={"help": f"Of {', '.join(DPO_CONFIGS)}."})
    repeats: int = field(default=1, metadata={"help": "Interleaved rounds."})
    cutoff_len: int = field(default=512)
    micro_batch_size: int = field(default=4, metadata={"help": "Pairs a step (SFT: samples; sft-pairs: twice as many)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop early; -1 = one epoch."})
    train_precision: str = field(default="native", metadata={"help": "native, bf16 or fp32."})
    shape: str = field(default="50m")
    model: str | None = field(default=None)
    out: str | None = field(default=None, metadata={"help": "JSON path (default WORK/dpo.json)."})


COMMANDS = {
    "logits": LogitsArguments,
    "rollout": RolloutArguments,
    "prepare": PrepareArguments,
    "run": RunArguments,
    "quick": QuickArguments,
    "sweep": SweepArguments,
    "tokenize": TokenizeArguments,
    "report": ReportArguments,
    "peers": PeersArguments,
    "env": ReportArguments,
    "dpo": DpoArguments,
}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in COMMANDS or argv[1].startswith("-"):
        raise UserError(
            f"usage: tools/benchmark.py {{{','.join(COMMANDS)}}} WORK [flags]; `tools/benchmark.py COMMAND WORK --help` lists a command's flags"
        )
    command, work = argv[0], Path(argv[1])
    # Flags run/quick/sweep do not know go to finetune.py for both configurations, e.g. --lora_r 16.
    args, extra = parse_args((COMMANDS[command],), argv[2:], pass_through=True)
    if extra and command not in ("run", "quick", "sweep"):
        raise UserError(f"unrecognized arguments: {' '.join(extra)}")
    model = Path(args.model) if getattr(args, "model", None) else None
    out = Path(args.out) if getattr(args, "out", None) else None
    configure_logging()

    if command == "prepare":
        prepare(work, args.samples, args.shape)
        return
    if command == "env":
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(work / "env.json", json.dumps(machine_info(), indent=2).encode())
        return
    if command == "peers":
        model_dir, data = prepare(work, args.samples, args.shape, model)
        configs = args.configs.split(",")
        unknown = [c for c in configs if c not in PEER_LOSS]
        if unknown:
            raise UserError(f"--configs {','.join(unknown)}: unknown; use some of {', '.join(PEER_LOSS)}")
        result = run_peers(
            work,
            model_dir,
            data,
            configs,
            args.repeats,
            args.cutoff_len,
            args.micro_batch_size,
            args.batch_size,
            args.train_precision,
            args.max_steps,
        )
        out = out or work / "peers.json"
        atomic_write_bytes(out, json.dumps(result, indent=2).encode())
        plot_peers(result, out.with_suffix(".png"))
        print(json.dumps(result["summary"], indent=2))
        return
    if command == "dpo":
        model_dir, data = prepare(work, args.samples, args.shape, model)
        configs = args.configs.split(",")
        result = run_dpo(
            work, model_dir, data, configs, args.repeats, args.cutoff_len, args.micro_batch_size, args.train_precision, args.max_steps
        )
        atomic_write_bytes(out or work / "dpo.json", json.dumps(result, indent=2).encode())
        print(json.dumps(result["summary"], indent=2))
        return
    if command == "report":
        result, table = gpu_report(work)
        atomic_write_bytes(work / "gpu_check.json", json.dumps(result, indent=2).encode())
        atomic_write_bytes(work / "gpu_check.md", table.encode())
        return
    if command == "logits":
        work.mkdir(parents=True, exist_ok=True)
        result = logits_memory(args.vocab, args.micro_batch_size, args.cutoff_len, [int(c) for c in args.chunks.split(",")], args.repeats)
        atomic_write_bytes(out or work / "logits-memory.json", json.dumps(result, indent=2).encode())
        print(json.dumps({"fp32_logits_mib": result["fp32_logits_mib"], **result["summary"]}, indent=2))
        return
    if command == "rollout":
        work.mkdir(parents=True, exist_ok=True)
        model_dir = model or work / "llama-50m"
        if not (model_dir / "config.json").is_file():
            build_model(model_dir, "50m")
        result = rollout_speed(
            model_dir,
            args.prompts,
            args.num_generations,
            args.max_new_tokens,
            args.repeats,
            args.temperature,
            args.lora_r,
            args.lora_weights,
        )
        atomic_write_bytes(out or work / "rollout.json", json.dumps(result, indent=2).encode())
        print(json.dumps({"greedy_equal": result["greedy_equal"], **result["summary"]}, indent=2))
        return
    if command == "tokenize":
        model_dir, data = prepare(work, 400, "50m", model)
        result = tokenize_speed(model_dir, data, args.samples)
        atomic_write_bytes(work / "tokenize.json", json.dumps(result, indent=2).encode())
        print(json.dumps(result, indent=2))
        return
    if command == "sweep":
        model_dir, _ = prepare(work, 16, "50m", model)
        result = run_sweep(
            work, model_dir, [int(c) for c in args.cutoffs.split(",")], args.samples, args.max_steps, extra, args.train_precision
        )
        out = out or work / "sweep.json"
        atomic_write_bytes(out, json.dumps(result, indent=2).encode())
        plot_sweep(result, out.with_suffix(".png"))
        print(
            json.dumps(
                [
                    {
                        "cutoff_len": p["cutoff_len"],
                        **{k: v for k, v in p["summary"].items() if k in ("speedup_median", "peak_memory_ratio")},
                    }
                    for p in result["points"]
                ],
                indent=2,
            )
        )
        return
    model_dir, data = prepare(work, args.samples, args.shape, model)
    result = run_benchmark(
        work,
        model_dir,
        data,
        args.cutoff_len,
        args.repeats,
        args.micro_batch_size,
        args.batch_size,
        tuple(args.configs.split(",")),
        args.max_steps,
        extra,
        logging_steps=5 if command == "run" else 1,
        precision=args.train_precision,
    )
    out = out or work / ("benchmark.json" if command == "run" else "benchmark-quick.json")
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
