"""Tests of sashimi.training.loop, sashimi.training.evaluate and the sashimi CLI: learning, exact resume, signals,
non-finite steps, checkpoint format and errors, evaluation JSON, and 2-process torchrun runs (matching one
process, SIGTERM, resuming with another number of processes)."""

import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sashimi import WaveformAR
from sashimi.cli import main
from sashimi.training import loop
from sashimi.training.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, model_from_checkpoint
from sashimi.training.evaluate import evaluate
from sashimi.training.loop import NonFiniteLossError, TrainConfig, train
from sashimi.training.runtime import read_metrics

from run_helpers import REPO, cli_args, finite, one_thread as single_thread, subprocess_env
from run_helpers import small_run as small

# Measured: the `learned_run` below reaches 5.28 bits/sample (seed 0; deterministic on CPU); uniform is 8.
LEARNED_VAL_BITS_MAX = 6.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def wait_for_lines(proc: subprocess.Popen, path, n: int, timeout: float = 180.0) -> None:
    """Poll until the text file `path` has at least n lines; fail if proc exits first or after timeout seconds."""
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not reach {n} lines within {timeout:.0f} s"
        time.sleep(0.1)


def child_pids(pid: int) -> list[int]:
    """The processes started by process pid (Linux /proc)."""
    kids = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as f:
            kids.update(int(k) for k in f.read().split())
    return sorted(kids)


def torchrun_cmd(cfg: TrainConfig, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "sashimi", "train", *cli_args(cfg)]


def poison_steps(monkeypatch, steps) -> None:
    """Make the loss and metrics NaN at these (0-based) training steps, as a diverging run would."""
    original = loop.train_step

    def train_step(run, batch):
        if run.position.step not in steps:
            return original(run, batch)
        objective = run.step_module.objective

        def nan_loss(model, part):
            loss_sum, count, metrics = objective.fn(model, part)
            return loss_sum * float("nan"), count, {k: v * float("nan") for k, v in metrics.items()}

        run.step_module.objective = dataclasses.replace(objective, fn=nan_loss)
        try:
            return original(run, batch)
        finally:
            run.step_module.objective = objective

    monkeypatch.setattr(loop, "train_step", train_step)


def assert_finite_weights(state: dict) -> None:
    assert finite(state["model"])


def assert_same_tensors(a: dict, b: dict, exact: bool = True, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def only_primitives(obj) -> bool:
    """True if obj is built from tensors, numbers, strings, None, lists, tuples and str-keyed dicts."""
    if isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))):
        return True
    if isinstance(obj, (list, tuple)):
        return all(only_primitives(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and only_primitives(v) for k, v in obj.items())
    return False


# --------------------------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned")
    cfg = TrainConfig(data="builtin", preset="tiny", out=str(out), sample_len=512, batch_size=8, max_steps=150,
                      warmup_steps=15, n_train_items=200, n_val_items=4, val_every=50, ckpt_every=50, log_every=25,
                      progress=False)
    start = time.time()
    result = train(cfg)
    return out, result, time.time() - start


def test_short_run_learns_well_below_uniform(learned_run):
    out, result, seconds = learned_run
    print(f"tiny run: val {result['val_bits']:.4f} bits/sample after {result['step']} steps in {seconds:.0f} s")
    assert result["status"] == "finished" and result["step"] == 150
    assert result["val_bits"] < LEARNED_VAL_BITS_MAX < 8.0

    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_records = [r for r in records if "train_bits" in r]
    val_records = [r for r in records if "val_bits" in r]
    assert [r["step"] for r in train_records] == [25, 50, 75, 100, 125, 150]
    assert [r["step"] for r in val_records] == [50, 100, 150]
    for r in train_records:
        assert {"step", "train_bits", "lr", "time", "samples_per_s", "nonfinite_steps"} <= r.keys()
        assert r["samples_per_s"] > 0 and r["nonfinite_steps"] == 0
    assert train_records[-1]["train_bits"] < train_records[0]["train_bits"]
    assert val_records[-1]["val_bits"] == pytest.approx(result["val_bits"])
    assert open(out / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    config = json.load(open(out / "config.json"))
    assert config["train"]["preset"] == "tiny" and config["model"]["sample_len"] == 512
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt",
                                                     "metrics.jsonl"]  # no temporary files left


def test_evaluate_matches_validation_and_writes_json(learned_run, tmp_path):
    out, result, _ = learned_run
    # the evaluator over the same items gives the trainer's validation figure
    again = evaluate(str(out / "last.pt"), "builtin", split="val", n_items=4, batch_size=5, progress=False)
    assert again["nll_bits_per_sample"] == pytest.approx(result["val_bits"], rel=1e-5)
    assert again["n_samples"] == 4 * 16000 and again["step"] == 150 and again["preset"] == "tiny"

    json_path = tmp_path / "eval" / "test.json"
    assert main(["eval", "--ckpt", str(out), "--data", "builtin", "--split", "test", "--n-items", "2",
                 "--json", str(json_path), "--no-progress"]) == 0
    written = json.load(open(json_path))
    assert {"nll_bits_per_sample", "n_samples", "split", "checkpoint", "preset", "step"} <= written.keys()
    assert written["split"] == "test" and written["n_samples"] == 2 * 16000 and written["preset"] == "tiny"
    assert written["checkpoint"].endswith("best.pt")
    assert 0 < written["nll_bits_per_sample"] < LEARNED_VAL_BITS_MAX + 0.5


def test_evaluate_covers_the_whole_split_without_padding(learned_run, tmp_path):
    import numpy as np
    import soundfile as sf

    from sashimi.data.datasets import make_dataset
    from sashimi.objectives.autoregressive import nll_bits, shift_right

    out, _, _ = learned_run
    rng = np.random.default_rng(0)
    for i in range(12):  # clips of 0.05-0.2 s: chunks of 512 with padded tails
        n = int(rng.integers(800, 3200))
        tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(n) / 16000)
        sf.write(tmp_path / f"clip{i:02d}.wav", tone.astype(np.float32), 16000)
    result = evaluate(str(out / "last.pt"), str(tmp_path), split="test", batch_size=3, progress=False)

    dataset = make_dataset(str(tmp_path), "test", sample_rate=16000, sample_len=512)
    masks = [dataset[i]["mask"] for i in range(len(dataset))]
    assert result["n_items"] == len(dataset) > 0 and not all(m.all() for m in masks)  # some padding
    assert result["n_samples"] == sum(int(m.sum()) for m in masks)
    model = model_from_checkpoint(load_checkpoint(str(out / "last.pt"))).eval()
    total = 0.0
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            tokens = item["tokens"][None]
            total += float(nll_bits(model(shift_right(tokens, 128)), tokens, item["mask"][None])[0])
    assert result["nll_bits_per_sample"] == pytest.approx(total / result["n_samples"], rel=1e-5)


# --------------------------------------------------------------------------------------------- resume


def test_resume_is_bit_identical(tmp_path):
    # dropout and EMA on, so that RNG and EMA state matter; 15 batches per epoch, so the data
    # order crosses an epoch boundary; validation every 5 steps feeds nothing back (cosine).
    common = dict(decay_steps=20, ema=0.9, dropout=0.1)
    straight = train(small(tmp_path / "straight", max_steps=20, **common))
    first = train(small(tmp_path / "split", max_steps=10, **common))
    assert first["step"] == 10
    resumed = train(small(tmp_path / "split", max_steps=20, resume=True, **common))
    assert straight["step"] == resumed["step"] == 20

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_tensors(sa, sb)
    assert a["data"] == b["data"] == {"epoch": 1, "index": 5, "seed": 0, "batch_size": 8}
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    val = lambda run: [(r["step"], r["val_bits"]) for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
                       if "val_bits" in r]  # noqa: E731
    assert val("straight") == val("split") and len(val("split")) == 4


def test_checkpoint_loads_with_weights_only(tmp_path):
    train(small(tmp_path, max_steps=2, ema=0.99))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert only_primitives(state)
    assert state["format_version"] == CHECKPOINT_FORMAT and state["step"] == 2 and state["preset"] == "tiny"
    assert {"model", "ema", "optimizer", "scheduler", "rng", "data", "model_config", "train_config"} <= state.keys()
    assert {"torch", "numpy", "python"} <= state["rng"][0].keys()


def test_mismatched_or_foreign_checkpoints_give_clear_errors(tmp_path, capsys):
    train(small(tmp_path, max_steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        train(small(tmp_path, max_steps=4))
    with pytest.raises(CheckpointError, match="preset 'tiny'.*d_model"):
        train(small(tmp_path, max_steps=4, preset="sc09-2layer", resume=True))
    with pytest.raises(CheckpointError, match="sample_len: checkpoint 128 vs requested 256"):
        train(small(tmp_path, max_steps=4, sample_len=256, resume=True))
    with pytest.raises(CheckpointError, match="preset 'tiny', not 'sc09'"):
        evaluate(str(tmp_path), "builtin", preset="sc09", progress=False)
    assert main(["eval", "--ckpt", str(tmp_path), "--preset", "sc09", "--no-progress"]) == 1
    assert "preset 'tiny', not 'sc09'" in capsys.readouterr().err

    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["format_version"] = CHECKPOINT_FORMAT + 1
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=f"format version {CHECKPOINT_FORMAT + 1}"):
        evaluate(str(tmp_path / "future.pt"), "builtin", progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(str(tmp_path / "missing.pt"), "builtin", progress=False)


# --------------------------------------------------------------------------------------------- time budget


def test_durations():
    assert [loop.parse_duration(t) for t in (90, "90", "90s", "30m", "2h", "1.5h", " 45 S")] == \
        [90, 90, 90, 1800, 7200, 5400, 45]
    for bad in ("", "3d", "-5m", "0", "m", "1e3"):
        with pytest.raises(ValueError, match="max_time"):
            loop.parse_duration(bad)
    with pytest.raises(ValueError, match="max_time"):
        small("unused", max_time="soon").check()


def test_max_time_stops_within_the_budget_with_the_schedule_decayed(tmp_path):
    """The run stops so that the final validation and checkpoint fit: its last step ends within the
    budget plus one step; the learning rate has decayed over the budget, down to ~min_lr_ratio * lr."""
    budget = 8.0
    result = train(small(tmp_path, max_steps=100_000, max_time=f"{budget}s", warmup_steps=3, log_every=1,
                         val_every=10_000, ckpt_every=10_000))
    assert result["status"] == "out of time" and result["step"] > 5
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    steps = [r for r in records if "train_bits" in r]
    assert [r["step"] for r in records if "val_bits" in r] == [result["step"]]  # the final validation
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == result["step"]
    longest_step = max(b["time"] - a["time"] for a, b in zip(steps, steps[1:]))
    assert steps[-1]["time"] <= budget + longest_step
    lrs = [r["lr"] for r in steps]
    assert max(lrs) == pytest.approx(4e-3, rel=0.1) and lrs[-1] < 0.1 * max(lrs)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # decaying after warmup


# --------------------------------------------------------------------------------------------- failures


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    poison_steps(monkeypatch, (2, 3))
    result = train(small(tmp_path, max_steps=6, max_nonfinite=3, log_every=1))
    assert result["status"] == "finished" and result["nonfinite_steps"] == 2
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "train_bits" in line]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert records[2]["train_bits"] is None  # the window held only the skipped step
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert state["nonfinite_total"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_repeated_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    # steps 0-4 are fine (checkpoints at 2 and 4); from step 5 on every loss is NaN
    poison_steps(monkeypatch, range(5, 30))
    cfg = small(tmp_path, max_steps=30, ckpt_every=2, val_every=100, max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps.*last good checkpoint"):
        train(cfg)
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert state["step"] == 4 and state["nonfinite_total"] == 0
    good_weights = state["model"]
    assert all(torch.isfinite(v).all() for v in good_weights.values() if v.is_floating_point())
    # the CLI says so and exits with status 1, leaving the checkpoint alone
    assert main(["train", *cli_args(cfg), "--resume"]) == 1
    assert "non-finite" in capsys.readouterr().err
    assert_same_tensors(load_checkpoint(str(tmp_path / "last.pt"))["model"], good_weights)


def test_sigterm_finishes_the_step_and_checkpoints(tmp_path):
    cfg = small(tmp_path, max_steps=100_000, log_every=1, val_every=10_000, ckpt_every=10_000)
    proc = subprocess.Popen([sys.executable, "-m", "sashimi", "train", *cli_args(cfg)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(proc, tmp_path / "metrics.jsonl", 2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "interrupted at step" in stdout and "SIGTERM received" in stdout
    state = load_checkpoint(str(tmp_path / "last.pt"))
    logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert state["step"] >= 2 and state["step"] == logged[-1]  # the checkpoint holds the last finished step
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    resumed = train(small(tmp_path, max_steps=state["step"] + 2, log_every=1, val_every=10_000,
                          ckpt_every=10_000, resume=True))
    assert resumed["status"] == "finished" and resumed["step"] == state["step"] + 2


def first_update(cfg: TrainConfig):
    """One training step of cfg: (the gradients the optimiser received, by parameter name; the model as
    it was at its first training forward; that forward's inputs)."""
    seen = {}

    def before_forward(module, args):
        if isinstance(module, WaveformAR) and module.training and "model" not in seen:
            seen.update(model=copy.deepcopy(module), inputs=[a.clone() for a in args],
                        names={id(p): n for n, p in module.named_parameters()})

    def before_step(optimizer, args, kwargs):
        if "grads" not in seen:
            seen["grads"] = {seen["names"][id(p)]: p.grad.detach().clone()
                             for group in optimizer.param_groups for p in group["params"] if p.grad is not None}

    handles = [register_module_forward_pre_hook(before_forward), register_optimizer_step_pre_hook(before_step)]
    try:
        train(dataclasses.replace(cfg, max_steps=1))
    finally:
        for handle in handles:
            handle.remove()
    return seen["grads"], seen["model"], seen["inputs"]


def float64_gradients(model, inputs, grad_clip: float) -> dict:
    """The first update's gradients recomputed in float64: the loss the loop minimises, clipped alike."""
    model = copy.deepcopy(model).to(torch.float64)
    x, y, mask = inputs
    bits, _ = model(x, y, mask)
    (bits * math.log(2.0) / mask.sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_first_update(tmp_path, **variant):
    """The first update of a run with `variant` settings equals the plain run's up to float32 rounding.

    Weights after a few Adam steps are no measure of that: Adam divides each gradient by its own
    running magnitude, so where a gradient is near zero (thousands of entries in the tiny model) a
    rounding-level difference becomes a step of up to lr. The gradients that reach the optimiser are:
    against a float64 recomputation of the same step, each tensor of the variant may be off by a few
    times the plain float32 run's rounding error, taken as the larger of its error on that tensor
    and its worst relative error over all tensors times the tensor's scale (one tensor's error is a
    single sample of rounding, and may be luckily small). A real fault is off by O(1) of the scale."""
    base = small(tmp_path / "base", batch_size=4)
    plain, model, inputs = first_update(base)
    other, _, _ = first_update(small(tmp_path / "variant", batch_size=4, **variant))
    reference = float64_gradients(model, inputs, base.grad_clip)
    assert plain.keys() == other.keys() == reference.keys()
    scale = {n: ref.abs().max().item() + 1e-30 for n, ref in reference.items()}
    err_plain = {n: (plain[n].double() - ref).abs().max().item() for n, ref in reference.items()}
    relative = max(err_plain[n] / scale[n] for n in reference)  # float32's rounding level in this step
    assert relative <= 1e-3, f"the float64 reference is not the same step (relative error {relative:.1e})"
    for name, ref in reference.items():
        err_other = (other[name].double() - ref).abs().max().item()
        tolerance = 4 * max(err_plain[name], relative * scale[name])
        assert err_other <= tolerance, (f"{name}: {variant} is off by {err_other:.2e} against float64, "
                                        f"tolerance {tolerance:.2e} (plain float32: {err_plain[name]:.2e})")


def test_micro_batches_give_the_same_update(tmp_path):
    """Micro-batches add up to the whole batch's gradient; and the run then goes on alike."""
    assert_same_first_update(tmp_path, micro_batch=1)
    whole = train(small(tmp_path / "whole", max_steps=3, batch_size=4))
    chunked = train(small(tmp_path / "chunked", max_steps=3, batch_size=4, micro_batch=1))
    assert chunked["val_bits"] == pytest.approx(whole["val_bits"], abs=1e-3)


def test_checkpointing_modes_give_the_same_update(tmp_path, capsys):
    """'on' recomputes activations, 'off' keeps them: the same first update. 'auto' stays
    off for a small micro-batch and turns on for a large one; a bad value is a clear error."""
    assert_same_first_update(tmp_path, checkpointing="on")
    train(small(tmp_path / "auto", max_steps=1, batch_size=4))
    assert "gradient checkpointing off (auto" in capsys.readouterr().out
    from sashimi.models.autoregressive import activation_bytes, get_config
    from sashimi.training.loop import checkpointing_decision

    sc09 = lambda batch: activation_bytes(get_config("sc09"), batch)  # noqa: E731
    assert checkpointing_decision(TrainConfig(preset="sc09", batch_size=8), sc09, 8)[0]  # ~5.5 GB
    assert not checkpointing_decision(TrainConfig(preset="sc09", batch_size=8, micro_batch=1), sc09, 8)[0]
    assert not checkpointing_decision(TrainConfig(preset="sc09", batch_size=1), sc09, 1)[0]
    assert checkpointing_decision(TrainConfig(preset="sc09", batch_size=1, checkpointing="on"), sc09, 1)[0]
    assert not checkpointing_decision(TrainConfig(preset="sc09", batch_size=8, checkpointing="off"), sc09, 8)[0]
    assert not checkpointing_decision(TrainConfig(preset="sc09", batch_size=8), None, 8)[0]  # no estimate: off
    with pytest.raises(ValueError, match="checkpointing must be"):
        small(tmp_path / "bad", checkpointing="yes").check()


# --------------------------------------------------------------------------------------------- processes


def test_torchrun_two_processes_match_one_process(tmp_path):
    cfg = small(tmp_path / "one", max_steps=5, batch_size=4, val_every=5)
    single = train(cfg)
    two = small(tmp_path / "two", max_steps=5, batch_size=4, val_every=5)
    done = subprocess.run(torchrun_cmd(two), cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished at step 5") == 1  # only rank 0 reports

    a = load_checkpoint(str(tmp_path / "one" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "two" / "last.pt"))
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert_same_tensors(a["model"], b["model"], exact=False, atol=1e-4)
    assert b["val_bits"] == pytest.approx(single["val_bits"], abs=1e-4)
    # only rank 0 wrote: the same files, one metrics line per event
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))
    lines = lambda run: len(open(tmp_path / run / "metrics.jsonl").read().splitlines())  # noqa: E731
    assert lines("one") == lines("two") == 2
    assert math.isfinite(b["val_bits"])


@pytest.mark.parametrize("recipients", ["launcher", "workers", "every process"])
def test_sigterm_to_torchrun_run_checkpoints_and_exits_cleanly(tmp_path, recipients):
    """SIGTERM to torchrun (it forwards the signal to its workers), to each worker, or to every process as a
    scheduler does (workers first: torchrun's forwarded copy then reaches workers already stopping): every
    process finishes the same step, rank 0 alone writes last.pt at that step, and the workers exit normally."""
    cfg = small(tmp_path, max_steps=100_000, batch_size=4, log_every=1, val_every=10_000, ckpt_every=10_000)
    proc = subprocess.Popen(torchrun_cmd(cfg), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(proc, tmp_path / "metrics.jsonl", 2)
        workers = child_pids(proc.pid)
        assert len(workers) == 2, workers
        for pid in {"launcher": [proc.pid], "workers": workers, "every process": [*workers, proc.pid]}[recipients]:
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed test leaves no training processes behind
            for pid in [*child_pids(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.communicate()
    if recipients == "workers":
        assert proc.returncode == 0, stderr[-3000:]  # torchrun saw both workers exit with status 0
    else:  # a signalled torchrun shuts its workers down and then re-raises the signal as SignalException
        assert proc.returncode in (0, 1), stderr[-3000:]
        assert stderr.count("Traceback") == stderr.count("SignalException: ") <= 1, stderr[-3000:]  # none from a worker
    assert "forcefully exiting" not in stderr, stderr[-3000:]  # torchrun did not have to SIGKILL a worker

    state = load_checkpoint(str(tmp_path / "last.pt"))
    logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert logged == list(range(1, len(logged) + 1))  # one line per step: only rank 0 wrote
    assert state["step"] >= 2 and state["step"] == logged[-1]  # the checkpoint holds the last finished step
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each process's own RNG state
    assert_finite_weights(state)
    assert stdout.count("SIGTERM received") == 1  # rank 0 reports, once
    assert stdout.count(f"interrupted at step {state['step']}; checkpoint") == 1, stdout
    assert sorted(os.listdir(tmp_path)) == ["config.json", "last.pt", "metrics.jsonl"]  # no temporary files left


def test_resume_with_another_number_of_processes(tmp_path, capsys):
    """1 process for 4 steps, torchrun with 2 up to step 8, 1 process again up to 10. Each resume starts at
    the saved step and warns that the RNG states were saved by another number of processes; as the tiny
    preset has no dropout, the run still follows a 1-process run's trajectory (up to float rounding)."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    settings = dict(batch_size=4, log_every=1, val_every=4, ckpt_every=4, decay_steps=10)  # one schedule for all
    train(small(run, max_steps=4, **settings))
    train(small(straight, max_steps=8, **settings))

    done = subprocess.run(torchrun_cmd(small(run, max_steps=8, resume=True, **settings)), cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"resumed from {run / 'last.pt'} at step 4") == 1, done.stdout
    assert done.stdout.count("warning: checkpoint has RNG states for 1 processes, this run has 2; reseeding") == 1
    assert done.stdout.count("finished at step 8") == 1
    two, one = load_checkpoint(str(run / "last.pt")), load_checkpoint(str(straight / "last.pt"))
    assert two["step"] == 8 and two["world_size"] == 2 and len(two["rng"]) == 2
    assert two["data"] == one["data"] == {"epoch": 0, "index": 8, "seed": 0, "batch_size": 4}
    assert_finite_weights(two)
    assert_same_tensors(one["model"], two["model"], exact=False, atol=1e-4)
    assert json.load(open(run / "config.json"))["world_size"] == 2
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records if "train_bits" in r] == list(range(1, 9))  # steps 1-4 kept, 5-8 added
    assert [r["step"] for r in records if "val_bits" in r] == [4, 8]

    capsys.readouterr()
    result = train(small(run, max_steps=10, resume=True, **settings))
    log = capsys.readouterr().out
    assert f"resumed from {run / 'last.pt'} at step 8" in log
    assert "warning: checkpoint has RNG states for 2 processes, this run has 1; reseeding" in log
    train(small(straight, max_steps=10, resume=True, **settings))
    back, one = load_checkpoint(str(run / "last.pt")), load_checkpoint(str(straight / "last.pt"))
    assert result["status"] == "finished" and result["step"] == back["step"] == 10
    assert back["world_size"] == 1 and len(back["rng"]) == 1 and back["data"] == one["data"]
    assert_finite_weights(back)
    assert_same_tensors(one["model"], back["model"], exact=False, atol=1e-4)


def test_bf16_autocast_training_runs(tmp_path):
    """--precision bf16 (CPU autocast): the FFT convolutions run in float32 inside (pocketfft has no
    bfloat16, and the backward runs outside autocast); every step is finite, none is skipped."""
    result = train(small(tmp_path / "bf16", max_steps=4, batch_size=2, precision="bf16"))
    state = load_checkpoint(str(tmp_path / "bf16" / "last.pt"))
    assert state["step"] == 4 and state["nonfinite_total"] == 0
    assert math.isfinite(result["val_bits"])
