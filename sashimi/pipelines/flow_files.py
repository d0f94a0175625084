"""`sashimi generate` for the flow families: a trained model -> FlowPipeline -> WAVs, samples.json, index.html.

    from sashimi.pipelines.flow_files import flow_family, generate_flow_files
    if flow_family("runs/rf1"):                        # 'rectified_flow' / 'diffwave', else None
        result, paths = generate_flow_files("runs/rf1", None, n=8, steps=24, labels=[7], cfg=3.0)

A model is a run directory (its best.pt, else last.pt), a checkpoint file or a shareable model
folder (config.json + model.safetensors). The page is the shared one (sashimi.pipelines.report),
with the real-time factor, the sampler's settings and, with `score`, the offline metrics.
"""

from __future__ import annotations

import os

import torch

from ..checks import check_int
from ..data.reflow_pairs import is_pair_folder
from .flow_generate import FlowPipeline
from .report import write_report

__all__ = ["FLOW_FAMILIES", "flow_family", "load_flow_model", "load_embedding", "generate_flow_files"]

FLOW_FAMILIES = ("rectified_flow", "diffwave")


def _source(ckpt: str):
    """('folder', config dict) or ('checkpoint', loaded state) for any accepted model path."""
    from ..models.pretrained import WEIGHTS_NAME, read_pretrained_config
    from ..training.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, resolve_checkpoint

    if os.path.isdir(ckpt) and os.path.isfile(os.path.join(ckpt, WEIGHTS_NAME)):
        return "folder", read_pretrained_config(ckpt), ckpt
    path = resolve_checkpoint(ckpt, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
    return "checkpoint", load_checkpoint(path), path


def flow_family(ckpt: str) -> str | None:
    """The flow family ('rectified_flow' or 'diffwave') of a --ckpt argument, None for any other model
    (or a path that holds none: the caller's loader then reports why)."""
    try:
        kind, data, _ = _source(ckpt)
    except (OSError, ValueError):
        return None
    config = data if kind == "folder" else data.get("model_config", {})
    family = config.get("family") if isinstance(config, dict) else None
    return family if family in FLOW_FAMILIES else None


def load_flow_model(ckpt: str, use_ema: bool = True):
    """(FlowModel in eval mode, facts for the page: checkpoint, step, preset, stage, the run's data)."""
    from ..models.pretrained import from_pretrained
    from ..training.checkpoint import CheckpointError, model_from_checkpoint

    kind, data, path = _source(ckpt)
    if kind == "folder":
        model = from_pretrained(path)
        info = {"model": os.path.abspath(path)}
    else:
        model = model_from_checkpoint(data, use_ema=use_ema, path=path)
        info = {"checkpoint": os.path.abspath(path), "step": data.get("step"), "preset": data.get("preset"),
                "ema_weights": bool(use_ema and data.get("ema") is not None),
                "data": (data.get("train_config") or {}).get("data")}
    if model.config.family not in FLOW_FAMILIES:
        raise CheckpointError(f"{ckpt} holds a {model.config.family!r} model, not a rectified flow or DiffWave")
    info["stage"] = model.config.stage if model.config.family == "rectified_flow" else "diffusion"
    return model.eval(), info


def load_embedding(path: str) -> torch.Tensor:
    """A (N, d) float tensor of user embeddings from a .npy or a torch (.pt) file."""
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--embedding: no file {path}")
    try:
        if path.endswith(".npy"):
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, weights_only=True)
    except Exception as e:  # not an array file
        raise ValueError(f"--embedding {path}: cannot read a (N, d) array from it ({e})") from e
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"--embedding {path}: expected a float array of shape (N, d)")
    return value.float()


def real_data_of(info: dict) -> str | None:
    """The audio a run trained on (for --score): its data, or the data behind its reflow pairs."""
    data = info.get("data")
    if data is not None and is_pair_folder(data):
        import json

        with open(os.path.join(data, "pairs.json")) as f:
            data = (json.load(f).get("info") or {}).get("source_data")
    return data


def generate_flow_files(ckpt: str, out: str | None = None, *, n: int = 16, steps: int | None = None,
                        method: str | None = None, cfg: float = 1.0, labels=None, prompts=None, embedding=None,
                        vocoder: str | None = None, seed: int = 0, batch_size: int | None = None,
                        use_ema: bool = True, score: str | None = None, score_real=None, real_clips: int = 4,
                        log=print):
    """n samples of a flow / DiffWave model into `out` (default: next to the checkpoint, samples/); (result, paths)."""
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1, allow_none=True)
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("--prompt needs at least one prompt")
    if score is not None and not os.path.isfile(os.path.join(score, "config.json")):
        raise ValueError(f"--score {score}: not an evaluation classifier folder (no config.json); train one with "
                         f"`sashimi metrics train-classifier --data DIR|builtin --out DIR`")
    model, info = load_flow_model(ckpt, use_ema)
    voc = None
    if vocoder is not None:
        from .waveflow import load_waveflow

        voc = load_waveflow(vocoder).eval()
        info["vocoder"] = os.path.abspath(vocoder)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"sashimi generate: {ckpt}: {model.config.family} {model.config.name} ({n_params / 1e6:.2f}M parameters, "
        f"{model.config.space}, condition {model.config.condition}, stage {info['stage']})")
    if isinstance(embedding, str):
        embedding = load_embedding(embedding)
    result = FlowPipeline(model, voc)(n, labels=labels, prompts=prompts, embedding=embedding, steps=steps,
                                      method=method, cfg=cfg, seed=seed, batch_size=batch_size or min(n, 16))
    if out is None:
        base = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
        out = os.path.join(base, "samples")
    scores = references = None
    if score is not None:
        from ..metrics.score import scores_and_references

        real = score_real or real_data_of(info)
        if real is None:
            raise ValueError("--score needs --score-real (a folder or 'builtin'): the model does not say what "
                             "audio it was trained on")
        scores, references = scores_and_references(score, real, result, n_references=real_clips)
    title = f"sashimi {model.config.family.replace('_', ' ')} samples"
    paths = write_report(out, result, info=info, title=title, scores=scores, references=references)
    return result, {**paths, "scores": scores}
