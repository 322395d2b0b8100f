"""GRPO's rollouts through a vLLM server (infer/vllm_rollouts.py), protocol-tested against a scripted
server on 127.0.0.1 (no GPU, no vLLM here): the stub answers vLLM's runtime LoRA endpoints and
/v1/completions by running the tiny model with the adapter folder it was told to load (HF
`generate`, greedy at temperature 0), the way vLLM answers (token ids with the EOS, finish_reason
"length" checked before the EOS). At temperature 0 the vLLM engine's completions are the built-in
sampler's and generate.py's, token for token; the adapter pushed each step is the trained one."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

import finetune_grpo
from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.engine import Engine
from chinese_vicuna.infer.vllm_rollouts import ADAPTER_FOLDER, VllmServerRollouts, completion_rollouts
from conftest import free_port, read_jsonl

G = 3
MAX_NEW = 12


def weights_hash(adapter_dir: Path) -> str:
    """The adapter's tensors (names and values), whatever the file's metadata."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(adapter_dir / "adapter_model.safetensors")).items()):
        digest.update(name.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


class VllmStub:
    """vLLM's OpenAI server as far as the rollouts use it. `loads` records (name, path, weights hash),
    `unloads` names, `requests` the /v1/completions bodies. `lora_updating=False`: the runtime LoRA
    endpoints answer 404, as vLLM's without VLLM_ALLOW_RUNTIME_LORA_UPDATING."""

    def __init__(self, base: Path, lora_updating: bool = True, max_lora_rank: int = 64) -> None:
        self.base, self.lora_updating, self.max_lora_rank = base, lora_updating, max_lora_rank
        self.models: dict[str, Any] = {}
        self.loads: list[tuple[str, str, str]] = []
        self.unloads: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = json.dumps({"object": "list", "data": [{"id": str(stub.base), "object": "model"}]}).encode()
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    status, payload = stub.handle(self.path, body)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> VllmStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        from chinese_vicuna.model.build import load_for_inference

        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and not self.lora_updating:
            return 404, {"detail": "Not Found"}
        if path == "/v1/load_lora_adapter":
            name, folder = body["lora_name"], body["lora_path"]
            rank = json.loads((Path(folder) / "adapter_config.json").read_text())["r"]
            if rank > self.max_lora_rank:
                return 400, {"error": {"message": f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.", "code": 400}}
            if name in self.models:
                return 400, {"error": {"message": f"The lora adapter '{name}' has already been loaded.", "code": 400}}
            self.models[name] = load_for_inference(str(self.base), folder)
            self.loads.append((name, folder, weights_hash(Path(folder))))
            return 200, f"Success: LoRA adapter '{name}' added successfully."
        if path == "/v1/unload_lora_adapter":
            self.models.pop(body["lora_name"])
            self.unloads.append(body["lora_name"])
            return 200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully."
        if path == "/v1/completions":
            self.requests.append(body)
            if body["model"] not in self.models:
                return 404, {"error": {"message": f"The model `{body['model']}` does not exist.", "code": 404}}
            return 200, self.complete(body)
        return 404, {"detail": "Not Found"}

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        model, tokenizer = self.models[body["model"]]
        prompt, n, max_tokens, temperature = body["prompt"], body["n"], body["max_tokens"], body["temperature"]
        eos = tokenizer.eos_token_id
        sampling: dict[str, Any] = {"do_sample": False}  # greedy: one answer, n times (HF's greedy search takes one sequence)
        if temperature > 0:
            torch.manual_seed(body["seed"])
            sampling = {"do_sample": True, "temperature": temperature, "top_p": body["top_p"], "top_k": max(body["top_k"], 0),
                        "num_return_sequences": n}  # fmt: skip
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=eos, **sampling
            )
        out = out.expand(n, -1) if temperature == 0 else out
        choices = []
        for j, row in enumerate(out[:, len(prompt) :].tolist()):
            ids = row[: row.index(eos) + 1] if eos in row else row
            finish = "length" if len(ids) >= max_tokens else "stop"  # vLLM checks the length first
            text = tokenizer.decode(ids, skip_special_tokens=True)
            choices.append({"index": j, "text": text, "token_ids": ids if body.get("return_token_ids") else None, "logprobs": None,
                            "finish_reason": finish, "stop_reason": None})  # fmt: skip
        return {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": sum(len(c["token_ids"] or []) for c in choices),
                          "total_tokens": 0}}  # fmt: skip


# ---------------------------------------------------------------- the completion rule


def test_eos_is_kept_and_truncation_means_cut_without_an_eos() -> None:
    eos = [2]
    choices = [
        {"index": 1, "token_ids": [5, 6, 2], "finish_reason": "length"},  # EOS exactly at the limit: vLLM says length
        {"index": 0, "token_ids": [5, 2], "finish_reason": "stop"},
        {"index": 2, "token_ids": [5, 6, 7], "finish_reason": "length"},
    ]
    rollouts = completion_rollouts(choices, 3, eos, 3, "here")
    assert rollouts.completion_ids == [[5, 2], [5, 6, 2], [5, 6, 7]]
    assert rollouts.truncated == [False, False, True]
    with pytest.raises(UserError, match=r"^here: the server returned no token ids; vLLM 0.10.2 or later"):
        completion_rollouts([{"index": 0, "token_ids": None, "finish_reason": "stop"}], 1, eos, 3, "here")
    with pytest.raises(UserError, match=r"^here: the server returned 1 completions for n=2"):
        completion_rollouts(choices[:1], 2, eos, 3, "here")


# ---------------------------------------------------------------- greedy: the built-in sampler's and generate.py's


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir: Path, memorized_lora: Path) -> Engine:
    from chinese_vicuna.model.build import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir), str(memorized_lora))
    return Engine.around(model, tokenizer, None, [str(memorized_lora), str(tiny_model_dir)], "instruction")


def test_greedy_server_rollouts_are_the_builtin_samplers_and_generate_pys(
    lora_engine: Engine, tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path, tmp_path: Path
) -> None:
    engine = lora_engine
    records = read_jsonl(memorized_data)[:4]
    questions = [r["instruction"] for r in records] + ["讲一个关于小羊驼的很长很长的故事"]
    prompts = [engine.instruction_ids(q) for q in questions]
    with VllmStub(tiny_model_dir) as stub:
        served = VllmServerRollouts(engine, stub.url + "/v1/", tmp_path, max_retries=0)
        assert served.url == stub.url
        rollouts = served.sample_groups(prompts, G, MAX_NEW, temperature=0)
        builtin = engine.sample_groups(prompts, G, MAX_NEW, temperature=0)
        assert rollouts.completion_ids == builtin.completion_ids
        assert rollouts.truncated == builtin.truncated
        assert rollouts.texts == builtin.texts
        decoding = DecodingArguments(max_new_tokens=MAX_NEW)
        for i, ids in enumerate(prompts):
            assert rollouts.texts[i * G] == engine.answer(ids, decoding)  # generate.py's answer
        assert rollouts.texts[0] == records[0]["output"]  # the memorized answer: the adapter was applied
        eos = engine.tokenizer.eos_token_id
        assert any(c[-1] == eos for c in rollouts.completion_ids) and any(rollouts.truncated)
        # one request per prompt, the prompt as token ids, the group as n, the adapter pushed as its model
        (name, folder, pushed), = stub.loads  # fmt: skip
        assert pushed == weights_hash(memorized_lora) and Path(folder) == tmp_path.resolve() / ADAPTER_FOLDER / name
        assert sorted(map(tuple, (r["prompt"] for r in stub.requests))) == sorted(map(tuple, prompts))
        for body in stub.requests:
            assert (body["model"], body["n"], body["max_tokens"], body["temperature"]) == (name, G, MAX_NEW, 0)
            assert body["return_token_ids"] is True and body["top_k"] == -1 and isinstance(body["seed"], int)
        served.close()
        assert stub.unloads == [name] and not (tmp_path / ADAPTER_FOLDER).exists()


# ---------------------------------------------------------------- one-line errors


@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA moved away from zero (random lora_B), saved: the trainer's starting point."""
    from chinese_vicuna.model.adapters import add_lora
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.model.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = add_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), 8, 16, 0.0, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("start") / "adapter"
    model.save_pretrained(str(out))
    return out


def test_no_server_and_runtime_lora_off_end_in_one_line(tiny_model_dir: Path, start_adapter: Path, tmp_path: Path) -> None:
    from chinese_vicuna.model.build import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir), str(start_adapter))
    engine = Engine.around(model, tokenizer, None, [str(start_adapter)], "instruction")
    prompts = [engine.instruction_ids("1+1=")]
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(UserError) as error:
        VllmServerRollouts(engine, down, tmp_path, max_retries=0).sample_groups(prompts, 2, 4)
    message = str(error.value)
    assert message.startswith(f"--vllm_server_url {down}: no server answers (POST /v1/load_lora_adapter")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank R" in message
    assert "\n" not in message
    with VllmStub(tiny_model_dir, lora_updating=False) as stub, pytest.raises(UserError) as error:
        VllmServerRollouts(engine, stub.url, tmp_path, max_retries=0).sample_groups(prompts, 2, 4)
    assert str(error.value).startswith(
        f"--vllm_server_url {stub.url}: POST /v1/load_lora_adapter answered 404: runtime LoRA updating is off; "
        "restart the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"
    )
    assert not any((tmp_path / ADAPTER_FOLDER).iterdir())  # the adapter the server refused is not left behind
    with VllmStub(tiny_model_dir, max_lora_rank=4) as stub, pytest.raises(UserError) as error:
        VllmServerRollouts(engine, stub.url, tmp_path, max_retries=0).sample_groups(prompts, 2, 4)
    assert str(error.value) == (
        f"--vllm_server_url {stub.url}: POST /v1/load_lora_adapter failed with HTTP 400: LoRA rank 8 is greater than "
        "max_lora_rank 4. (is the server started with --enable-lora, and --max-lora-rank at least the adapter's --lora_r?)"
    )


def test_the_recipe_refuses_colocated_vllm_and_a_missing_server_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n", encoding="utf-8")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for flags, says in (
        (["--rollout_engine", "vllm"], "--rollout_engine vllm: vLLM is not installed here, and colocated vLLM is not supported"),
        (["--vllm_server_url", "http://127.0.0.1:8000"], "--vllm_server_url http://127.0.0.1:8000: pass --rollout_engine vllm too"),
        (["--rollout_engine", "vllm", "--vllm_server_url", down], f"--vllm_server_url {down}: no server answers (GET /v1/models"),
    ):
        with pytest.raises(SystemExit) as exit_:
            finetune_grpo.main(["--base_model", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "o"), *flags])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and last.startswith(f"error: {says}"), last


# ---------------------------------------------------------------- finetune_grpo.py with --rollout_engine vllm

SPREAD_REWARD = """
def text_length(completions, **kwargs):
    return [float(len(c)) for c in completions]
"""


def test_two_grpo_steps_with_rollouts_from_the_server(tiny_model_dir: Path, start_adapter: Path, tmp_path: Path) -> None:
    """Step 1 samples with the starting adapter, step 2 with the adapter after one optimizer step
    (checkpoint-1's weights); the previous adapter is unloaded each time and the last at the end."""
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(10, 14)), encoding="utf-8")
    rewards = tmp_path / "rewards.py"
    rewards.write_text(SPREAD_REWARD, encoding="utf-8")
    out = tmp_path / "out"
    with VllmStub(tiny_model_dir) as stub:
        finetune_grpo.main([
            "--base_model", str(tiny_model_dir), "--lora_weights", str(start_adapter), "--data_path", str(data),
            "--output_dir", str(out), "--reward_funcs", f"{rewards}:text_length", "--rollout_engine", "vllm",
            "--vllm_server_url", stub.url, "--micro_batch_size", "2", "--batch_size", "2", "--num_generations", "4",
            "--max_completion_length", "8", "--max_steps", "2", "--save_steps", "1", "--learning_rate", "1e-2",
            "--logging_steps", "1", "--log_completions_steps", "1", "--disable_tqdm", "true",
        ])  # fmt: skip
    (first, _, first_hash), (second, _, second_hash) = stub.loads
    assert first.endswith("-step0") and second.endswith("-step1")
    assert first_hash == weights_hash(start_adapter)
    assert second_hash == weights_hash(out / "checkpoint-1") != first_hash  # the adapter as trained by step 1
    assert stub.unloads == [first, second]
    assert [r["model"] for r in stub.requests] == [first, first, second, second]
    assert all(r["n"] == 4 and r["max_tokens"] == 8 and r["temperature"] == 1.0 for r in stub.requests)
    assert len({r["seed"] for r in stub.requests}) == 4
    logged = [e for e in read_jsonl(out / "trainer_log.jsonl") if "reward" in e]
    assert [e["step"] for e in logged] == [1, 2]
    assert len(read_jsonl(out / "completions.jsonl")) == 2 * 2 * 4
    assert not (out / ADAPTER_FOLDER).exists()
