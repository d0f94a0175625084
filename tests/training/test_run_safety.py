"""Run directories under hostile conditions: never overwritten, exact resume with EMA, no non-finite weights
saved, I/O errors as one line, and a kill -9 / SIGTERM loop at random moments that never loses progress.

SASHIMI_KILL_LOOP=N runs N iterations of the kill loop (default 3, a few seconds of training each)."""

import errno
import glob
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from sashimi.cli import main
from sashimi.training import checkpoint as checkpoint_module
from sashimi.training.checkpoint import load_checkpoint
from sashimi.training.loop import NonFiniteLossError, TrainConfig, train

from run_helpers import REPO, cli_args, finite, one_thread, small_run, subprocess_env


@pytest.fixture(autouse=True)
def one_thread_naive(monkeypatch):
    """One thread and the pure-torch kernel backend: reliability does not depend on either, speed does."""
    monkeypatch.setenv("S4LIB_BACKEND", os.environ.get("S4LIB_BACKEND", "naive"))
    with one_thread():
        yield


def small(out, **overrides) -> TrainConfig:
    """The shared small run at batch 4, logging every step."""
    return small_run(out, **{"batch_size": 4, "log_every": 1, **overrides})


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ----------------------------------------------------------------------------- a run directory is never overwritten


@pytest.mark.parametrize("artefact", ["best.pt", "config.json", "metrics.jsonl"])
def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path, artefact):
    train(small(tmp_path, max_steps=1, val_every=1))
    os.remove(tmp_path / "last.pt")  # as if killed before the first periodic checkpoint
    kept = (tmp_path / artefact).read_bytes()
    for name in set(os.listdir(tmp_path)) - {artefact}:
        os.remove(tmp_path / name)
    with pytest.raises(FileExistsError, match=f"{artefact}.*--resume"):
        train(small(tmp_path, max_steps=2))
    with pytest.raises(FileExistsError, match="no last.pt.*--overwrite"):
        train(small(tmp_path, max_steps=2, resume=True))
    assert (tmp_path / artefact).read_bytes() == kept  # nothing touched


def test_overwrite_moves_the_old_run_aside(tmp_path):
    train(small(tmp_path, max_steps=1, val_every=1))
    os.remove(tmp_path / "last.pt")
    old = {name: (tmp_path / name).read_bytes() for name in ("best.pt", "config.json", "metrics.jsonl")}
    result = train(small(tmp_path, max_steps=2, resume=True, overwrite=True))
    assert result["status"] == "finished" and result["step"] == 2
    aside = glob.glob(str(tmp_path / "replaced-*"))
    assert len(aside) == 1
    for name, content in old.items():
        assert open(os.path.join(aside[0], name), "rb").read() == content
    records = [(r["step"], "val_bits" in r) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert records == [(1, False), (2, False), (2, True)]  # the new run's records only, no duplicates


def test_resume_in_an_empty_directory_starts_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run artefact")
    assert train(small(tmp_path / "new", max_steps=1, resume=True))["step"] == 1
    assert train(small(tmp_path, max_steps=1, resume=True))["step"] == 1


def test_cli_overwrite_flag(tmp_path, capsys):
    cfg = small(tmp_path, max_steps=1)
    assert main(["train", *cli_args(cfg)]) == 0
    assert main(["train", *cli_args(cfg)]) == 1
    one_line_error(capsys.readouterr().err, str(tmp_path), "--resume")
    assert main(["train", *cli_args(small(tmp_path, max_steps=1, overwrite=True))]) == 0
    assert glob.glob(str(tmp_path / "replaced-*" / "last.pt"))


# ----------------------------------------------------------------------------- exact resume with EMA


def test_ema_is_a_copy_of_the_whole_model_state(tmp_path):
    """The EMA's attuned kernel length (a Python int beside the l_kernel buffer) follows the model's."""
    from sashimi.training import loop

    model = loop.build_model(loop.resolve_model_config(small(tmp_path)))
    ema = __import__("copy").deepcopy(model).eval()
    model(torch.zeros(1, 128, dtype=torch.long))  # the first forward attunes the model's S4 kernels
    loop.update_ema(ema, model, 0.9, 0)
    kernels = [(m, e) for m, e in zip(model.modules(), ema.modules()) if hasattr(m, "_l_kernel_int")]
    assert kernels
    for m, e in kernels:
        assert e._l_kernel_int == m._l_kernel_int == int(e.l_kernel) > 0
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        ema(torch.zeros(1, 128, dtype=torch.long))  # validation must not transform the EMA's C again
    for k, v in ema.state_dict().items():
        assert torch.equal(v, before[k]), k


def sigterm_when(path, lines: int):
    """A thread that sends this process SIGTERM once `path` has `lines` lines (the loop stops after that step)."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if os.path.exists(path) and len(open(path).read().splitlines()) >= lines:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_and_resume_equal_a_straight_run_with_ema_and_dropout(tmp_path):
    common = dict(ema=0.9, dropout=0.1, val_every=6, ckpt_every=100, max_steps=8, decay_steps=8)
    train(small(tmp_path / "straight", **common))
    watcher = sigterm_when(tmp_path / "split" / "metrics.jsonl", 2)  # stop after step 2 (before validating)
    first = train(small(tmp_path / "split", **common))
    watcher.join()
    assert first["status"] == "interrupted" and first["step"] < 6, first
    resumed = train(small(tmp_path / "split", resume=True, **common))
    assert resumed["step"] == 8
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["best_val_bits"] == b["best_val_bits"]


# ----------------------------------------------------------------------------- no non-finite weights saved


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("nan")),
                                          ("grad_clip", float("inf")), ("ema", float("nan")),
                                          ("min_lr_ratio", float("nan")), ("dropout", float("inf"))])
def test_non_finite_hyperparameters_are_rejected(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        small(tmp_path, **{field: value}).check()


def test_a_learning_rate_beyond_float32_is_one_line_before_training(tmp_path, capsys):
    assert main(["train", *cli_args(small(tmp_path, max_steps=1, lr=1e39))]) == 1
    one_line_error(capsys.readouterr().err, "lr must be at most 3.403e+38", "1e+39")
    assert not os.path.exists(tmp_path / "last.pt")


def test_a_huge_finite_learning_rate_stops_in_one_line_without_a_traceback(tmp_path, capsys):
    """lr 1e38 passes the check, but AdamW's first update overflows float32 inside torch: each step is undone."""
    cfg = small(tmp_path, lr=1e38, warmup_steps=0, max_steps=5, max_nonfinite=2, val_every=100)
    assert main(["train", *cli_args(cfg)]) == 1
    one_line_error(capsys.readouterr().err, "2 consecutive steps had a non-finite loss, gradient or updated weights")
    for path in glob.glob(str(tmp_path / "*.pt")):
        assert finite(load_checkpoint(path)["model"]), path


def poison_updates(monkeypatch, steps):
    """After AdamW's update number k (0-based) for k in steps, one weight becomes NaN (as an overflowing update
    would make it): finite loss and gradient, non-finite weights."""
    original, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if len(calls) in steps:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        calls.append(1)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_a_step_leaving_non_finite_weights_is_undone_and_counted(tmp_path, monkeypatch):
    reference = train(small(tmp_path / "reference", max_steps=4, ckpt_every=1))
    poison_updates(monkeypatch, {2})
    result = train(small(tmp_path / "run", max_steps=4, ckpt_every=1))
    assert result["status"] == "finished" and result["nonfinite_steps"] == 1 == reference["nonfinite_steps"] + 1
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if "train_bits" in line]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1]
    for path in glob.glob(str(tmp_path / "run" / "*.pt")):
        assert finite(load_checkpoint(path)["model"]), path


def test_non_finite_weights_are_never_saved_and_stop_the_run(tmp_path, monkeypatch):
    poison_updates(monkeypatch, set(range(2, 100)))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps.*weights"):
        train(small(tmp_path, max_steps=20, ckpt_every=1, max_nonfinite=3))
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert state["step"] == 2 and finite(state["model"])
    for path in glob.glob(str(tmp_path / "*.pt")):
        assert finite(load_checkpoint(path)["model"]), path


def test_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(checkpoint_module.CheckpointError, match="non-finite"):
        checkpoint_module.write_checkpoint(
            str(tmp_path / "last.pt"), train_config={"preset": "tiny"}, model_config={}, model=bad, ema=None,
            optimizer={}, scheduler={}, step=1, data={}, rng=[], nonfinite_total=0, best_val_bits=1.0,
            val_bits=None, elapsed_seconds=0.0, world_size=1)
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- I/O errors: one line, nothing lost


def test_out_inside_a_file_is_one_line_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    assert main(["train", *cli_args(small(out, max_steps=1))]) == 1
    one_line_error(capsys.readouterr().err, str(tmp_path / "file"))


def test_read_only_out_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["train", *cli_args(small(tmp_path / "run", max_steps=1))]) == 1
    monkeypatch.undo()
    one_line_error(capsys.readouterr().err, str(tmp_path / "run"), "Read-only")


def test_eval_json_to_a_directory_fails_before_evaluating(tmp_path, capsys, monkeypatch):
    train(small(tmp_path / "run", max_steps=1))
    import sashimi.training.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "load_checkpoint", lambda *a, **k: pytest.fail("evaluated before checking"))
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--json", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    one_line_error(err, str(tmp_path), "--json")


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    cfg = small(tmp_path, max_steps=2, ckpt_every=1)
    assert main(["train", *cli_args(cfg)]) == 0
    good = (tmp_path / "last.pt").read_bytes()
    capsys.readouterr()

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    assert main(["train", *cli_args(small(tmp_path, max_steps=4, ckpt_every=1, resume=True))]) == 1
    one_line_error(capsys.readouterr().err, "last.pt", "No space left")
    assert (tmp_path / "last.pt").read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("content", ["", "{\"train\": ", "[]"])
def test_corrupt_config_json_on_resume_is_one_line(tmp_path, capsys, content):
    cfg = small(tmp_path, max_steps=1)
    assert main(["train", *cli_args(cfg)]) == 0
    capsys.readouterr()
    (tmp_path / "config.json").write_text(content)
    assert main(["train", "--out", str(tmp_path), "--resume", "--max-steps", "2", "--no-progress"]) == 1
    one_line_error(capsys.readouterr().err, "config.json")


def test_torn_metrics_line_is_dropped_with_a_warning_and_resume_works(tmp_path, capsys):
    train(small(tmp_path, max_steps=2, ckpt_every=2))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train_bi')  # a write cut short
    capsys.readouterr()
    result = train(small(tmp_path, max_steps=3, resume=True))
    assert result["step"] == 3
    out = capsys.readouterr()
    assert "metrics.jsonl" in out.out + out.err and "dropped" in out.out + out.err
    records = [(r["step"], "val_bits" in r) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert records == [(1, False), (2, False), (2, True), (3, False), (3, True)]


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path):
    train(small(tmp_path, max_steps=1))
    for name in (".last.pt.abc123.tmp", ".metrics.jsonl.x.tmp", ".best.pt.q.tmp"):
        (tmp_path / name).write_bytes(b"left by a killed write")
    (tmp_path / "mine.tmp").write_text("not ours")
    train(small(tmp_path, max_steps=2, resume=True))
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".tmp")) == ["mine.tmp"]


def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train(small(tmp_path, max_steps=1, val_every=1))
    finally:
        os.umask(old)
    for name in ("last.pt", "best.pt", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ----------------------------------------------------------------------------- kill -9 / SIGTERM at random moments


def test_kill_loop_never_loses_progress(tmp_path):
    iterations = int(os.environ.get("SASHIMI_KILL_LOOP", "3"))
    rng = random.Random(int(os.environ.get("SASHIMI_KILL_SEED", "0")))
    run = tmp_path / "run"
    cfg = small(run, max_steps=100_000, ckpt_every=2, val_every=3, ema=0.9, dropout=0.1, resume=True)
    env = subprocess_env(S4LIB_BACKEND=os.environ.get("S4LIB_BACKEND", "naive"))
    progress, had_checkpoint = 0, False
    for i in range(iterations):
        proc = subprocess.Popen([sys.executable, "-m", "sashimi", "train", *cli_args(cfg)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # wait for training to start (a metrics line past the last progress), then a random moment more
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            lines = open(run / "metrics.jsonl").read().splitlines() if (run / "metrics.jsonl").exists() else []
            try:
                if lines and json.loads(lines[-1])["step"] > progress:
                    break
            except ValueError:  # read while the line was being appended
                pass
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.0))
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode in (0, -signal.SIGKILL), (i, sig, err[-2000:])
        # invariants: a loadable checkpoint, a metrics file that parses, never fewer steps than before
        if (run / "last.pt").exists() or had_checkpoint:
            state = load_checkpoint(str(run / "last.pt"))
            had_checkpoint = True
            assert state["step"] >= progress, (i, state["step"], progress)
            assert finite(state["model"]) and finite(state["ema"])
            progress = state["step"]
        records = [json.loads(line) for line in open(run / "metrics.jsonl")]
        assert all(isinstance(r["step"], int) for r in records)
        if (run / "best.pt").exists():
            load_checkpoint(str(run / "best.pt"))
    assert had_checkpoint and progress > 0
