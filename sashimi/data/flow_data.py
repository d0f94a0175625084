"""The datasets the flow families train on: audio clips (captioned for prompt models) or reflow pair folders.

    from sashimi.data.flow_data import flow_dataset
    flow_dataset(config, "builtin", "train")      # clips at the model's rate and length
    flow_dataset(config, "runs/pairs", "val")     # a reflow pair folder (sashimi reflow)

`FlowConfig.make_dataset` calls it, so `sashimi.data.datasets.dataset_for` (the training loop,
evaluation) gives a flow model the right items without knowing the family.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from .datasets import make_dataset
from .reflow_pairs import ReflowPairs, is_pair_folder

__all__ = ["flow_dataset", "builtin_caption", "CaptionedDataset"]


def builtin_caption(info: dict) -> str:
    """A builtin clip's caption from its metadata: 'pluck arpeggio up'."""
    return f"{info['timbre_name']} {info['class_name'].replace('_', ' ')}"


class CaptionedDataset(Dataset):
    """A BuiltinDataset whose items carry a 'prompt' (the clip's caption)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        clip = (i % len(self.dataset)) // self.dataset.chunks_per_clip
        item["prompt"] = builtin_caption(self.dataset.clip_info(clip))
        return item


def flow_dataset(config, data, split: str = "train", *, n_items: int | None = None, **kwargs) -> Dataset:
    """Items for a FlowConfig: a reflow pair folder's pairs, or float audio clips (no tokens) of `data`.

    Stages '2-rf' and 'distilled' train on pairs only; the pairs must be in the model's space.
    """
    if is_pair_folder(data):
        pairs = ReflowPairs(os.fspath(data), split, n_items=n_items)
        wanted = (config.frames, config.channels)
        if tuple(pairs.shape) != wanted:
            raise ValueError(f"the pairs in {data} have shape {list(pairs.shape)} (frames, channels); this model "
                             f"works on {list(wanted)}: make the pairs with this model's 1-RF")
        return pairs
    if config.stage != "1-rf":
        raise ValueError(f"stage {config.stage!r} trains on reflow pairs (a folder written by `sashimi reflow`), "
                         f"not on audio ({data!r})")
    dataset = make_dataset(data, split, sample_rate=config.sample_rate, sample_len=config.sample_len,
                           quantization=None, n_items=n_items, **kwargs)
    if config.condition == "text":
        if not hasattr(dataset, "clip_info"):
            raise ValueError("a prompt-conditioned model trains on the builtin data (its clips have captions) "
                             f"or on reflow pairs, not on {data!r}")
        dataset = CaptionedDataset(dataset)
    return dataset
