"""Training that survives users (issue 15): atomic checkpoints and honest resumes, the run
fingerprint, one line per user error, Ctrl-C as a clean stop, flags checked before the model loads."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import finetune
from chinese_vicuna.args import (
    parse_args,
)
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.run import prepare_run
from chinese_vicuna.train.data import default_val_set_size
from conftest import REPO, SAMPLE_INSTRUCT, read_jsonl, run_script

TRAIN_GROUPS = finetune.FLAG_GROUPS


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 8-sample alpaca files with different records (runs A and B of issue 15)."""
    lines = SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()
    root = tmp_path_factory.mktemp("ab")
    (root / "a.jsonl").write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(lines[8:16]) + "\n", encoding="utf-8")
    return root / "a.jsonl", root / "b.jsonl"


def run_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """8 samples, 2 per step: 4 optimizer steps an epoch, a checkpoint every 3 steps; dropout on and
    shuffled data, so a resume must restore the RNG and data position to end equal."""
    return ["--base_model", str(base), "--data_path", str(data), "--output_dir", str(out), "--val_set_size", "0",
            "--micro_batch_size", "2", "--batch_size", "2", "--num_epochs", "2", "--save_steps", "3", "--logging_steps", "1",
            "--lora_dropout", "0.1", "--learning_rate", "1e-3", "--warmup_steps", "0", "--disable_tqdm", "true", *extra]  # fmt: skip


def logged_steps(out: Path) -> list[int]:
    return [e["step"] for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e]


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        # the same float operations in the same order on the same machine: bit-identical
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0)


def user_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """finetune.main(argv) must end in exit code 2 with one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exc:
        finetune.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def whole_run(tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run on data a: checkpoint-3, checkpoint-6, checkpoint-8 and the final adapter."""
    out = tmp_path_factory.mktemp("whole") / "out"
    finetune.main(run_args(tiny_model_dir, data_files[0], out))
    return out


# ---------------------------------------------------------------- 1. atomic checkpoints, honest resume


def test_a_kill_during_a_save_leaves_no_checkpoint_and_resume_ends_equal(
    tiny_model_dir: Path, data_files: tuple[Path, Path], whole_run: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    out = tmp_path / "killed"
    real = Trainer._save_rng_state

    def killed_at_step_6(self, output_dir):  # the optimizer and adapter of checkpoint-6 are written, then the kill
        if self.state.global_step == 6:
            raise KeyboardInterrupt
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_at_step_6)
    with pytest.raises(SystemExit) as exc:
        finetune.main(run_args(tiny_model_dir, data_files[0], out))
    assert exc.value.code == 130
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    # checkpoint-6 was never published: only the staging folder holds its parts
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (out / ".checkpoint-staging" / "checkpoint-6" / "optimizer.pt").is_file()

    # what a kill left with the old writer: a checkpoint-7 with a 0-byte optimizer.pt and no trainer_state.json
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-7")
    (out / "checkpoint-7" / "trainer_state.json").unlink()
    (out / "checkpoint-7" / "optimizer.pt").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        finetune.main(run_args(tiny_model_dir, data_files[0], out, "--resume_from_checkpoint", "true"))
    assert f"not resuming from checkpoint-7: {out / 'checkpoint-7' / 'trainer_state.json'} is missing" in caplog.text
    assert f"resuming from {out / 'checkpoint-3'} (the newest complete checkpoint" in caplog.text
    assert not (out / ".checkpoint-staging").exists()
    assert_same_adapter(whole_run, out)
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6, 7, 8]  # cut back to step 3 on resume, not 1…5, 4…8


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("delete optimizer.pt", "optimizer.pt is missing"),
        ("empty scheduler.pt", "scheduler.pt is empty (0 bytes)"),
        ("truncate rng_state.pth", "rng_state.pth is truncated or damaged"),
        ("truncate adapter_model.safetensors", "adapter_model.safetensors is truncated"),
        ("delete trainer_state.json", "trainer_state.json is missing"),
    ],
)
def test_a_named_damaged_checkpoint_is_one_line(
    damage: str, expected: str, tiny_model_dir: Path, data_files: tuple[Path, Path], whole_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    shutil.copytree(whole_run, out)
    action, name = damage.split(" ")
    path = out / "checkpoint-6" / name
    if action == "delete":
        path.unlink()
    elif action == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:-100])
    line = user_error(run_args(tiny_model_dir, data_files[0], out, "--resume_from_checkpoint", str(out / "checkpoint-6")), capsys)
    assert expected in line and str(path) in line


# ---------------------------------------------------------------- 2. the run fingerprint


def test_another_run_in_the_same_folder_is_refused_and_resume_checks_the_fingerprint(
    tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path: Path, capsys, caplog
) -> None:
    data_a, data_b = data_files
    out = tmp_path / "out"
    finetune.main(run_args(tiny_model_dir, data_a, out, "--max_steps", "6"))  # run A: checkpoint-3, checkpoint-6
    assert json.loads((out / "checkpoint-6" / "run_fingerprint.json").read_text()) == json.loads((out / "run_fingerprint.json").read_text())

    # run B, other data, same folder, no resume: refused before anything loads
    line = user_error(run_args(tiny_model_dir, data_b, out, "--max_steps", "4"), capsys)
    assert f"--output_dir {out} holds another run (checkpoint-6, checkpoint-3)" in line and "--overwrite_output_dir true" in line
    with caplog.at_level(logging.WARNING):
        finetune.main(run_args(tiny_model_dir, data_b, out, "--max_steps", "4", "--overwrite_output_dir", "true"))
    [aside] = out.glob("superseded-*")
    assert f"the previous run's checkpoints and adapter were moved to {aside}" in caplog.text
    assert sorted(p.name for p in aside.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert logged_steps(out) == [1, 2, 3, 4]

    # run C resumes with A's data: B's checkpoint is not A's run
    line = user_error(run_args(tiny_model_dir, data_a, out, "--max_steps", "6", "--resume_from_checkpoint", "true"), capsys)
    assert "it belongs to a run with other data or settings (data_path (other content))" in line
    # other data on purpose: the resumed run starts it from the beginning (Chinese-Vicuna's finetune_continue.sh)
    flags = parse_args(TRAIN_GROUPS, run_args(tiny_model_dir, data_a, out, "--resume_from_checkpoint", "true", "--ignore_data_skip", "true"))
    assert prepare_run(flags, finetune.RUN_IDENTITY).resume_from_checkpoint == str(out / "checkpoint-4")
    line = user_error(
        run_args(tiny_model_dir, data_b, out, "--max_steps", "6", "--cutoff_len", "128", "--resume_from_checkpoint", "true"), capsys
    )
    assert "cutoff_len 256 → 128" in line
    finetune.main(run_args(tiny_model_dir, data_b, out, "--max_steps", "6", "--resume_from_checkpoint", "true"))
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 3. one top-level handler, Ctrl-C


def test_os_errors_users_cause_are_one_line_and_bugs_keep_their_traceback(tmp_path: Path, capsys) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    cases = {
        lambda: (tmp_path / "missing.json").read_text(): f"error: {tmp_path / 'missing.json'}: not found; check the path",
        lambda: open(tmp_path): f"error: {tmp_path}: is a folder where a file is expected; give a file",  # noqa: SIM115
        lambda: latin1.read_text(encoding="utf-8"): f"error: {latin1}: not UTF-8 text (unexpected end of data at byte 3); save it as UTF-8",
        lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")): "error: no space left on the device",
    }
    for action, expected in cases.items():
        with pytest.raises(SystemExit) as exc:
            exit_on_user_error(action)()
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith(expected)
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(lambda: (_ for _ in ()).throw(KeyboardInterrupt))()
    assert exc.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error
        exit_on_user_error(lambda: 1 / 0)()


def test_ctrl_c_in_training_stops_cleanly_and_the_run_resumes(tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # As typed in a terminal: SIGINT handled even where this test runs with it ignored (a job started with `&`
    # by a non-interactive shell ignores SIGINT, and so would the child; exec keeps SIG_DFL, Python then handles it).
    as_foreground = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    argv = [
        sys.executable,
        "-c",
        as_foreground,
        "finetune.py",
        *run_args(tiny_model_dir, data_files[0], out, "--num_epochs", "1000", "--save_steps", "2"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # loading and tokenizing on a loaded 2-core machine
        while not any(out.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
            time.sleep(0.2)
        assert logged_steps(out)  # trainer_log.jsonl shows training steps
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith("is complete: resume with --resume_from_checkpoint true")
    step = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    resumed = run_script_ok(*run_args(tiny_model_dir, data_files[0], out, "--num_epochs", "1000", "--save_steps", "2"),
                            "--max_steps", str(step + 2), "--resume_from_checkpoint", "true")  # fmt: skip
    assert f"resuming from {out / f'checkpoint-{step}'}" in resumed
    assert (out / "adapter_model.safetensors").is_file() and logged_steps(out)[-2:] == [step + 1, step + 2]


def test_a_ctrl_c_dropped_in_a_destructor_still_stops_at_the_next_step(tmp_path: Path) -> None:
    """Python drops a KeyboardInterrupt raised inside __del__ (datasets' Dataset.__del__ runs during
    training): Ctrl-C must still stop training, at the next step boundary."""
    from transformers import TrainingArguments

    from chinese_vicuna.train.trainer import ctrl_c_at_step_end

    trainer = Trainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))

    class PressedDuringDel:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # a call: the handler runs here, and Python drops its KeyboardInterrupt

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also where this runs with SIGINT ignored
    try:
        with ctrl_c_at_step_end(trainer) as callback:
            assert callback is not None and callback in trainer.callback_handler.callbacks
            PressedDuringDel()
            time.sleep(0.01)  # nothing is pending any more: the first KeyboardInterrupt is gone
            with pytest.raises(KeyboardInterrupt):
                callback.on_step_end(trainer.args, trainer.state, trainer.control)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert callback not in trainer.callback_handler.callbacks
        # Where SIGINT is ignored (a background job), training leaves it so.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with ctrl_c_at_step_end(trainer) as callback:
            assert callback is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def run_script_ok(*args: str) -> str:
    from conftest import run_script

    proc = run_script("finetune.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


# ---------------------------------------------------------------- 4. fail before the model loads


def test_output_dir_must_be_a_writable_folder(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, expected in [(a_file, "is a file, not a folder"), (a_file / "sub", f"{a_file} is a file, not a folder")]:
        with pytest.raises(UserError, match=expected):
            prepare_run(parse_args(TRAIN_GROUPS, ["--base_model", "b", "--output_dir", str(out)]), finetune.RUN_IDENTITY)
    if os.geteuid() != 0:  # root writes into read-only folders, so only a user sees this error
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        with pytest.raises(UserError, match="cannot write in"):
            prepare_run(parse_args(TRAIN_GROUPS, ["--base_model", "b", "--output_dir", str(read_only / "out")]), finetune.RUN_IDENTITY)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--learning_rate", "-1"], "--learning_rate -1.0: must be > 0"),
        (["--cutoff_len", "-5"], "--cutoff_len -5: must be a positive number of tokens"),
        (["--lora_r", "0"], "--lora_r 0: the LoRA rank must be at least 1"),
        (["--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
        (["--num_epochs", "0"], "--num_epochs 0.0: must be > 0"),
        (["--warmup_steps", "-3"], "--warmup_steps -3.0: must be >= 0"),
        (["--val_set_size", "-1"], "--val_set_size -1: must be >= 0"),
        (["--lora_weights", "lora-typo"], "--lora_weights lora-typo: folder not found"),
        (["--lora_weights", "tests/checkpoint-60x"], "--lora_weights tests/checkpoint-60x: folder not found"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(flags: list[str], expected: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        parse_args(TRAIN_GROUPS, ["--base_model", "b", "--output_dir", str(tmp_path / "out"), *flags])
    assert str(exc.value).startswith(expected) and "\n" not in str(exc.value)


def test_a_hub_id_passes_the_lora_weights_check(tmp_path: Path) -> None:
    model, *_ = parse_args(TRAIN_GROUPS, ["--base_model", "b", "--output_dir", str(tmp_path), "--lora_weights", "someone/my-lora"])
    assert model.lora_weights == "someone/my-lora"


def test_a_target_module_typo_is_found_before_the_weights_load(
    tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    # no weights at all: the check needs only config.json, so it runs before any loading could
    base = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("*.safetensors"))
    line = user_error(run_args(base, data_files[0], tmp_path / "out", "--lora_target_modules", "q_proj,v_prj"), capsys)
    assert line == (
        f"error: --lora_target_modules q_proj,v_prj: v_prj matches no module of {base}; its linear modules are "
        "down_proj,gate_proj,k_proj,lm_head,o_proj,q_proj,up_proj,v_proj (or pass all-linear)"
    )


# ---------------------------------------------------------------- 5. defaults and words


def test_default_hold_out_fits_the_data() -> None:
    assert [default_val_set_size(n) for n in (0, 1, 2, 19, 72, 2000, 52000)] == [0, 0, 1, 1, 7, 200, 200]


def test_the_defaults_train_on_the_shipped_data_and_warn_about_warm_up(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    # the shipped 72 samples with the default --val_set_size (was: "--val_set_size 200 leaves no training data")
    # and the default 100 warm-up steps against a 2-step run
    argv = ["--base_model", str(tiny_model_dir), "--data_path", str(SAMPLE_INSTRUCT), "--output_dir", str(tmp_path / "out"),
            "--micro_batch_size", "8", "--batch_size", "32", "--num_epochs", "1", "--disable_tqdm", "true"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        finetune.main(argv)
    assert "validation: 7 of 72 samples held out (the default: 200, at most a tenth of the data" in caplog.text
    assert "warm-up (100 steps) is longer than the whole run (3 optimizer steps)" in caplog.text


# ---------------------------------------------------------------- 5. issue 31: one run per folder, weights readable, a full disk


NON_DETERMINISTIC = {"trainer_state.json", "trainer_log.jsonl", "training_args.bin"}  # timings and wall-clock stamps


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a run's folder (relative path → bytes), those holding timings without their timing fields."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        data = path.read_bytes()
        if path.name == "trainer_log.jsonl":
            data = b"".join(
                json.dumps(
                    {k: v for k, v in json.loads(line).items() if "runtime" not in k and "per_second" not in k and k != "time"}
                ).encode()
                for line in data.splitlines()
            )
        elif path.name == "trainer_state.json":
            state = json.loads(data)
            state["log_history"] = [
                {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in state["log_history"]
            ]
            data = json.dumps(state).encode()
        elif path.name == "training_args.bin":
            continue
        files[name] = data
    return files


def test_a_second_run_into_a_running_runs_folder_is_refused_under_every_flag_combination(
    tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    argv = run_args(tiny_model_dir, data_files[0], out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}  # adapter_config.json lists a set of module names
    # The run left alone, under umask 022: its folder, then moved aside (the same path for both runs).
    old_umask = os.umask(0o022)
    try:
        alone = subprocess.run([sys.executable, "finetune.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.umask(old_umask)
    assert alone.returncode == 0, alone.stderr[-3000:]
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert {name for name, mode in modes.items() if mode != (0o755 if (out / name).is_dir() else 0o644)} == set(), modes
    assert {"adapter_model.safetensors", "checkpoint-3/adapter_model.safetensors", "checkpoint-8/optimizer.pt"} <= modes.keys()
    reference = folder_bytes(out)
    shutil.rmtree(out)

    first = subprocess.Popen(
        [sys.executable, "finetune.py", *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-3" / "trainer_state.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # held mid-run: it keeps its lock, the attempts below cannot race its steps
        try:
            for flags in ([], ["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "true"], ["--max_steps", "2"]):
                line = user_error(run_args(tiny_model_dir, data_files[1], out, *flags), capsys)
                assert line.startswith(f"error: --output_dir {out.absolute()}: in use by pid {first.pid} (python finetune.py --base_model")
                assert line.endswith("; wait for it to end, or choose another --output_dir")
                assert "--overwrite_output_dir true" not in line and "--resume_from_checkpoint true" not in line  # nothing that harms it
            # a second process, as a user starts it
            second = run_script("finetune.py", *run_args(tiny_model_dir, data_files[0], out, "--overwrite_output_dir", "true"))
            assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr.strip().splitlines()[-1]
        finally:
            first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert folder_bytes(out) == reference  # byte for byte what the run left alone wrote (timings aside)
    assert not (tmp_path / ".out.lock").exists()  # let go at the end


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(
    tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real full disk: a small tmpfs in a private mount namespace (`unshare`), filled once checkpoint-3 is published."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm)")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    argv = " ".join(run_args(tiny_model_dir, data_files[0], disk / "out", "--num_epochs", "100"))
    script = f"""
        set -u
        mount -t tmpfs -o size=4m tmpfs {disk}
        {sys.executable} finetune.py {argv} 2> {tmp_path / "stderr"} > /dev/null &
        pid=$!
        while [ ! -f {disk}/out/checkpoint-3/trainer_state.json ] && kill -0 $pid 2>/dev/null; do sleep 0.1; done
        dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null
        wait $pid; echo $? > {tmp_path / "rc"}
        cp -r {disk}/out {kept}
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {disk / 'out'}") and last.endswith(
        "no space left on the device; free some space or write somewhere else"
    )
    from chinese_vicuna.checkpoints import checkpoint_problem

    assert checkpoint_problem(kept / "checkpoint-3") is None  # the previous checkpoint is whole
