"""Samples from a training checkpoint into a folder: checkpoint -> Generator -> WAVs, samples.json, index.html.

    from sashimi.pipelines.from_checkpoint import generate_from_checkpoint
    result, paths = generate_from_checkpoint("runs/tiny", n=4, seconds=1.0)   # paths["index"]: the page
"""

from __future__ import annotations

import os
import warnings

from ..checks import check_int, check_number
from ..data.audio import probe_audio
from ..models.autoregressive import describe
from ..training.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, model_from_checkpoint, \
    resolve_checkpoint
from .generate import FastPathWarning, GenerationResult, Generator
from .report import write_report
from .sampling import check_sampling

__all__ = ["check_generation", "generate_from_checkpoint"]


def check_generation(n: int, seconds: float, temperature: float, top_k: int, top_p: float, batch_size: int | None,
                     seed: int) -> None:
    """The generation settings, checked before anything is loaded (ValueError naming the setting)."""
    check_sampling(temperature, top_k, top_p)
    check_int("n", n, 1)
    check_number("seconds", seconds, 0, low_open=True)
    check_int("batch_size", batch_size, 1, allow_none=True)
    check_int("seed", seed, 0)


def generate_from_checkpoint(ckpt: str, out: str | None = None, *, n: int = 16, seconds: float = 4.0,
                             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, prefix=None,
                             batch_size: int | None = None, seed: int = 0, fast: bool = True, use_ema: bool = True,
                             progress: bool = True, info: dict | None = None, title: str = "sashimi samples",
                             score: str | None = None, score_real=None, real_clips: int = 4,
                             log=print) -> tuple[GenerationResult, dict]:
    """n samples from a run directory (its best.pt, else last.pt) or checkpoint file; (result, report paths).

    out: the folder (default: RUN_DIR/samples). info: extra rows for the page's table. log: where
    the notes go (what was loaded, a resampled prefix, an unavailable fast path). score: an
    evaluation classifier folder (sashimi.metrics): the samples are scored against score_real
    (default: the run's data) and the page shows the scores and `real_clips` real clips;
    paths["scores"] holds the scores (None without score).
    """
    check_generation(n, seconds, temperature, top_k, top_p, batch_size, seed)
    if score is not None and not os.path.isfile(os.path.join(score, "config.json")):
        raise ValueError(f"--score {score}: not an evaluation classifier folder (no config.json); train one with "
                         f"`sashimi metrics train-classifier --data DIR|builtin --out DIR`")
    path = resolve_checkpoint(ckpt, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, use_ema=use_ema, path=path)
    rate = model.config.sample_rate
    log(f"sashimi generate: {path} (step {state.get('step')}): {describe(model)}")
    if prefix is not None:
        file_rate = probe_audio(prefix, check_content=False).sample_rate
        if file_rate != rate:
            log(f"note: prefix {prefix} is at {file_rate} Hz; resampled to the model's {rate} Hz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FastPathWarning)
        generator = Generator(model, batch_size=batch_size or min(n, 16), fast="auto" if fast else False)
    if any(issubclass(w.category, FastPathWarning) for w in caught):
        log(f"note: fast path unavailable ({generator.fast_reason}); using the eager step loop")
    result = generator.generate(n, seconds=seconds, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                prefix=prefix, progress=progress)
    out = out if out is not None else os.path.join(os.path.dirname(os.path.abspath(path)), "samples")
    info = {"checkpoint": os.path.abspath(path), "step": state.get("step"), "preset": state.get("preset"),
            "ema_weights": bool(use_ema and state.get("ema") is not None), **(info or {})}
    info["generated_bits_per_sample"] = float(result.bits_per_sample.mean())  # the samples' NLL under the model
    if info.get("test_bits_per_sample") is not None:
        info["nll_gap_bits_per_sample"] = info["generated_bits_per_sample"] - info["test_bits_per_sample"]
    scores = references = None
    if score is not None:
        from ..metrics.score import scores_and_references

        real = score_real or state["train_config"]["data"]
        scores, references = scores_and_references(score, real, result, n_references=real_clips)
    paths = write_report(out, result, info=info, title=title, scores=scores, references=references)
    return result, {**paths, "scores": scores}
