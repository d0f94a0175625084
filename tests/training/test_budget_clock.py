"""A CPU-time budget (budget_clock='cpu'): the run stops on the process's CPU seconds, and resumes the same budget."""

import pytest

from sashimi.training.checkpoint import load_checkpoint
from sashimi.training.loop import TrainConfig, train


def test_a_cpu_budget_stops_the_run_and_records_cpu_seconds(tmp_path):
    cfg = TrainConfig(preset="rf-tiny", data="builtin", sample_len=256, n_train_items=4, n_val_items=2, batch_size=2,
                      warmup_steps=1, val_every=1000, val_batches=1, max_time="2s", budget_clock="cpu",
                      threads=1, out=str(tmp_path / "r"), progress=False)
    result = train(cfg)
    assert result["status"] == "out of time" and result["step"] >= 1
    state = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    assert 0 < state["elapsed_seconds"] <= 2.0 + 1.0  # CPU seconds spent, not a wall-clock timestamp


def test_the_checkpoint_before_the_first_step_records_no_training_time(tmp_path):
    cfg = TrainConfig(preset="rf-tiny", data="builtin", sample_len=256, n_train_items=4, n_val_items=2, batch_size=2,
                      max_steps=1, val_batches=1, threads=1, out=str(tmp_path / "r"), progress=False)
    from sashimi.training import loop

    procs = loop.setup_processes()
    loop.start_run(cfg, procs)  # writes last.pt before any step
    assert load_checkpoint(str(tmp_path / "r" / "last.pt"))["elapsed_seconds"] < 60


def test_budget_clock_is_checked():
    with pytest.raises(ValueError, match="budget_clock must be 'wall' or 'cpu'"):
        TrainConfig(budget_clock="gpu").check()
