"""The demo recipe: train the tiny preset on builtin data within a few minutes, evaluate it, write a listening page.

    from sashimi.demo import run_demo
    run_demo("runs/demo", minutes=4)      # runs/demo/run (training run), runs/demo/samples/index.html

The recipe times a few training steps first (1 or 2 threads, whichever is faster on this
machine) to size the warmup and the validation interval, then trains with that many minutes as
the wall-clock budget (the learning rate decays over it), evaluates a few test clips and
generates samples with the fast step engine when it is available.
"""

from __future__ import annotations

import os
import time

import torch

from .checks import check_number
from .models.registry import build_model
from .pipelines.from_checkpoint import check_generation, generate_from_checkpoint
from .training.checkpoint import LAST_CHECKPOINT, load_checkpoint
from .training.evaluate import evaluate
from .training.loop import TrainConfig, train
from .training.runtime import read_metrics

__all__ = ["DEMO_TRAIN", "DEMO_TEST_CLIPS", "DEMO_SAMPLING", "run_demo"]

DEMO_TRAIN = dict(data="builtin", preset="tiny", sample_len=1024, batch_size=8, n_val_items=16, lr=4e-3)
DEMO_TEST_CLIPS = 16  # test clips evaluated after training
DEMO_SAMPLING = dict(temperature=1.0, top_p=0.95)  # chosen by sample-quality scores (docs/metrics.md)
DEMO_CLASSIFIER = dict(n_train=1500, epochs=4)  # a quick evaluation classifier for the scores (docs/metrics.md)
MAX_STEPS = 20_000


def step_seconds(threads: int, give_up_after: float | None = None) -> float:
    """Seconds per training step of the demo recipe with this many torch threads (a short timing run).

    Stops early when a step takes longer than give_up_after seconds (clearly the slower choice).
    """
    torch.set_num_threads(threads)
    model = build_model(DEMO_TRAIN["preset"], sample_len=DEMO_TRAIN["sample_len"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.n_classes, (DEMO_TRAIN["batch_size"], DEMO_TRAIN["sample_len"]))
    times = []
    for _ in range(3):  # the first is warm-up
        t0 = time.perf_counter()
        bits, count = model(x, x)
        (bits / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
        if give_up_after is not None and times[-1] > give_up_after:
            return times[-1]
    return min(times[1:]) * 1.15  # plus data loading, validation and checkpoints


def _last_val(run_dir: str):
    values = [r["val_bits"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "val_bits" in r]
    return values[-1] if values else None


def demo_classifier(out: str, classifier: str | None = None, seed: int = 0) -> str:
    """The evaluation classifier folder for the scores: `classifier`, or out/classifier (trained now if missing)."""
    from .metrics.classifier import CONFIG_FILE
    from .metrics.training import train_classifier

    folder = classifier or os.path.join(out, "classifier")
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        if classifier:
            raise ValueError(f"--classifier {folder}: not an evaluation classifier folder (no {CONFIG_FILE})")
        print(f"sashimi demo: training the evaluation classifier for the scores ({DEMO_CLASSIFIER['n_train']} "
              f"builtin clips, {DEMO_CLASSIFIER['epochs']} epochs) into {folder}")
        train_classifier("builtin", folder, seed=seed, **DEMO_CLASSIFIER)
    return folder


def run_demo(out: str = "runs/demo", minutes: float = 4.0, n: int = 32, seconds: float = 1.0, seed: int = 0,
             fast: bool = True, progress: bool = True, score: bool = True, classifier: str | None = None) -> dict:
    """Train (unless out/run holds a trained model), evaluate, generate, score; returns what was done.

    {"val_bits", "test", "steps", "result", "paths", "minutes"}; paths["scores"] holds the
    sample-quality scores (None with score=False). Raises ValueError on bad settings.
    """
    t_start = time.time()
    check_number("minutes", minutes, 0, low_open=True)
    check_generation(n, seconds, DEMO_SAMPLING["temperature"], 0, DEMO_SAMPLING["top_p"], n, seed)
    run_dir, samples_dir = os.path.join(out, "run"), os.path.join(out, "samples")
    steps = None
    last = os.path.join(run_dir, LAST_CHECKPOINT)
    trained = os.path.exists(last) and load_checkpoint(last).get("step", 0) > 0
    if trained:
        print(f"sashimi demo: {run_dir} already holds a trained model; skipping training "
              f"(delete it or pass another --out to train again)")
    else:
        timings = {1: step_seconds(1)}
        if (os.cpu_count() or 1) > 1:
            timings[2] = step_seconds(2, give_up_after=3 * timings[1])
        threads = min(timings, key=timings.get)
        torch.set_num_threads(threads)
        budget = max(1.0, minutes * 60 - (time.time() - t_start))
        expected = int(min(MAX_STEPS, max(20, budget / timings[threads])))
        print(f"sashimi demo: training the 'tiny' preset on builtin data for {budget / 60:.1f} min "
              f"(~{expected} steps at {timings[threads]:.2f} s/step, {threads} thread(s)); "
              f"Ctrl-C stops training early and goes on to generation")
        cfg = TrainConfig(**DEMO_TRAIN, out=run_dir, max_steps=MAX_STEPS, max_time=f"{budget:.1f}s",
                          warmup_steps=max(10, expected // 20), val_every=-(-expected // 4),
                          ckpt_every=-(-expected // 4), log_every=10, seed=seed, progress=progress,
                          resume=os.path.exists(last))  # a run stopped before its first step goes on
        steps = train(cfg)["step"]
    val_bits = _last_val(run_dir)
    t_trained = time.time()
    test = evaluate(run_dir, "builtin", split="test", n_items=DEMO_TEST_CLIPS, batch_size=8, progress=progress)
    info = {"training_steps": steps, "training_minutes": round((t_trained - t_start) / 60, 2),
            "val_bits_per_sample": val_bits, "test_bits_per_sample": test["nll_bits_per_sample"],
            "data": "builtin (synthetic)"}
    classifier = demo_classifier(out, classifier, seed) if score else None
    result, paths = generate_from_checkpoint(run_dir, samples_dir, n=n, seconds=seconds, batch_size=min(n, 32),
                                             seed=seed, fast=fast, progress=progress, info=info,
                                             title="sashimi demo: tiny model on builtin data", score=classifier,
                                             score_real="builtin", real_clips=4, **DEMO_SAMPLING)
    return {"val_bits": val_bits, "test": test, "steps": steps, "result": result, "paths": paths,
            "minutes": (time.time() - t_start) / 60}
