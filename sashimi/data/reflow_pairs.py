"""A reflow pair folder as a dataset: (noise seed, ODE sample) pairs written by sashimi.pipelines.reflow.

A pair folder holds pairs.json (format, the model space's shape, seeds, conditions, how the pairs
were made, the config of the model that made them) and samples.npy (N, frames, channels) float32:
x1_hat in the model's space. The noise of pair i is `pair_noise(seed_i, shape)`, regenerated when
read, so the folder stores no noise. Splits: every 20th pair (i % 20 == 19) is held out for
validation and test, the rest is the training split; a folder of fewer than 20 pairs holds out its
last pair, and a single pair serves every split.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

__all__ = ["FORMAT", "pair_noise", "is_pair_folder", "ReflowPairs"]

FORMAT = "sashimi-reflow-pairs-1"
HELD_OUT_EVERY = 20


def pair_noise(seed: int, shape: tuple) -> torch.Tensor:
    """The standard normal noise (shape) of one pair, from its seed."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def is_pair_folder(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "pairs.json"))


def split_indices(n: int, split: str | None) -> list[int]:
    """The pair indices of a split (None: all of them)."""
    if split is None:
        return list(range(n))
    split = {"validation": "val", "valid": "val"}.get(split, split)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    held = [i for i in range(n) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1] or [n - 1]
    if split != "train":
        return held
    rest = sorted(set(range(n)) - set(held))
    return rest or held


class ReflowPairs(torch.utils.data.Dataset):
    """A pair folder as a dataset of {"x1", "noise", "mask", "label" (-1: none), "prompt" | "embedding"} items.

    split: None (every pair), 'train', 'val' or 'test' (see the module docstring); n_items caps the
    split. `mask` (sample_len,) marks the audio samples the pair stands for (all real), so a pair
    counts as many units as a clip of audio in the training loop.
    """

    def __init__(self, folder: str, split: str | None = None, n_items: int | None = None):
        path = os.path.join(folder, "pairs.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} is not a reflow pair folder (no pairs.json); make one with "
                                    "`sashimi reflow`")
        try:
            with open(path) as f:
                self.meta = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); remake the pairs") from e
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            found = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise ValueError(f"{path}: unknown format {found!r}, expected {FORMAT!r}")
        self.samples = np.load(os.path.join(folder, "samples.npy"), mmap_mode="r")
        if len(self.samples) != len(self.meta["seeds"]):
            raise ValueError(f"{folder}: {len(self.samples)} samples but {len(self.meta['seeds'])} seeds")
        self.folder = folder
        self.shape = tuple(self.meta["shape"])
        self.sample_len = int((self.meta.get("model") or {}).get("sample_len", self.shape[0]))
        self.indices = split_indices(len(self.samples), split)
        if n_items is not None:
            self.indices = self.indices[:n_items]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        item = {"x1": torch.from_numpy(np.array(self.samples[i])), "noise": pair_noise(self.meta["seeds"][i], self.shape),
                "mask": torch.ones(self.sample_len, dtype=torch.bool), "label": torch.tensor(-1, dtype=torch.int64)}
        conds = self.meta["conditions"]
        if "labels" in conds:
            item["label"] = torch.tensor(conds["labels"][i], dtype=torch.int64)
        if "prompts" in conds:
            item["prompt"] = conds["prompts"][i]
        if "embedding" in conds:
            item["embedding"] = torch.tensor(conds["embedding"][i], dtype=torch.float32)
        return item

    def __repr__(self):
        return f"ReflowPairs({self.folder!r}, {len(self)} pairs of shape {self.shape})"
