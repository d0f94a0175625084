"""Train the evaluation classifier on labelled audio (a folder with one sub-folder per class, or the builtin set).

    from sashimi.metrics.training import train_classifier
    summary = train_classifier("builtin", "runs/classifier")   # prints and stores held-out accuracy

Clips come from the data layer's train / val / test splits. The log-mel of every clip is
computed once (no augmentation), the CNN is trained with AdamW and a cosine schedule, the
epoch with the best validation accuracy is kept, and the held-out accuracy on the test split is
stored in config.json ("evaluation") beside model.safetensors.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from ..data.datasets import make_dataset
from .classifier import ClassifierConfig, EvalClassifier

__all__ = ["labelled_clips", "train_classifier", "accuracy"]

_BUILTIN_ITEMS = {"train": 3000, "val": 400, "test": 500}


def labelled_clips(data, split: str, sample_rate: int, clip_samples: int, n_items: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(waveforms (N, clip_samples) float32, labels (N,) int64, class names) of one split of `data`.

    `data` is 'builtin' or a folder with one sub-folder per class (files directly in the folder
    have no class and are an error). Clips longer than clip_samples give several chunks.
    """
    if isinstance(data, str) and data.lower() == "builtin" and n_items is None:
        n_items = _BUILTIN_ITEMS[split]
    dataset = make_dataset(data, split, sample_rate=sample_rate, sample_len=clip_samples, quantization=None,
                           seed=seed, n_items=n_items)
    classes = tuple(dataset.classes)
    if len(classes) < 2:
        raise ValueError(f"{data!r} has {len(classes)} class sub-folder(s); the classifier needs labelled audio in "
                         f"at least 2 sub-folders (one per class, like SC09's zero/ one/ ...)")
    wavs, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if item["label"] < 0:
            raise ValueError(f"{data!r} holds audio files outside the class sub-folders (e.g. item {i}); put every "
                             f"file in the sub-folder of its class")
        wavs.append(item["wav"])
        labels.append(item["label"])
    return torch.stack(wavs), torch.tensor(labels, dtype=torch.long), classes


@torch.no_grad()
def accuracy(model: EvalClassifier, mels: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model.head(model.embed_mel(mels[start:start + batch_size]))
        correct += int((logits.argmax(dim=1) == labels[start:start + batch_size]).sum())
    return correct / max(1, len(labels))


@torch.no_grad()
def recalibrate_batchnorm(model: EvalClassifier, mels: torch.Tensor, batch_size: int = 128) -> None:
    """Set every BatchNorm's running statistics to their exact average over `mels` (train-mode passes, no grad).

    The running averages of a short training lag behind the weights; eval-mode features then
    drift from the training ones. Recomputing them makes eval mode match what was trained.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for start in range(0, len(mels), batch_size):
        model.embed_mel(mels[start:start + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def _mels(model: EvalClassifier, wavs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.mel(wavs[s:s + batch_size]) for s in range(0, len(wavs), batch_size)])


def train_classifier(data, out: str | None, *, sample_rate: int = 16000, clip_samples: int = 16000,
                     epochs: int = 4, batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 1e-2,
                     n_train: int | None = None, seed: int = 0, threads: int | None = None,
                     config: dict | None = None, log=print) -> dict:
    """Train on `data`'s train split, select on val, report test accuracy; save to `out` (when given).

    config: other ClassifierConfig fields (n_mels, channels, ...). Returns {"test_accuracy", "val_accuracy", "train_accuracy", "epoch", "n_train", "n_val",
    "n_test", "seconds", "model"}.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    t0 = time.time()
    torch.manual_seed(seed)
    train_wav, train_y, classes = labelled_clips(data, "train", sample_rate, clip_samples, n_train, seed)
    val_wav, val_y, _ = labelled_clips(data, "val", sample_rate, clip_samples, None, seed)
    test_wav, test_y, _ = labelled_clips(data, "test", sample_rate, clip_samples, None, seed)
    log(f"classifier data: {len(train_y)} train / {len(val_y)} val / {len(test_y)} test clips, "
        f"{len(classes)} classes ({time.time() - t0:.0f} s to load)")

    model = EvalClassifier(ClassifierConfig(classes=classes, sample_rate=sample_rate, clip_samples=clip_samples,
                                            **(config or {})))
    train_mel, val_mel, test_mel = _mels(model, train_wav), _mels(model, val_wav), _mels(model, test_wav)
    model.set_input_statistics(train_mel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(seed)
    best = (-1.0, 0, None)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model.head(model.embed_mel(train_mel[idx])), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
        recalibrate_batchnorm(model, train_mel[order[:1024]])
        val_acc = accuracy(model, val_mel, val_y)
        log(f"epoch {epoch}/{epochs}: train loss {loss_sum / len(train_y):.4f}, val accuracy {val_acc:.4f} "
            f"({time.time() - t0:.0f} s)")
        if val_acc > best[0]:
            best = (val_acc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    result = {"test_accuracy": accuracy(model, test_mel, test_y), "val_accuracy": best[0],
              "train_accuracy": accuracy(model, train_mel, train_y), "epoch": best[1], "n_train": len(train_y),
              "n_val": len(val_y), "n_test": len(test_y), "data": str(data), "seed": seed,
              "seconds": round(time.time() - t0, 1)}
    model.config.evaluation = dict(result)
    model.eval()
    if out is not None:
        model.save_pretrained(out)
    log(f"held-out (test split) accuracy {result['test_accuracy']:.4f} on {len(test_y)} clips "
        f"(val {best[0]:.4f}, epoch {best[1]})" + (f"; saved to {out}" if out else ""))
    result["model"] = model
    return result


def per_class_accuracy(model: EvalClassifier, wavs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Accuracy of each class (K,), for diagnosing a classifier."""
    _, probs = model.features_and_probabilities(wavs)
    predicted = probs.argmax(dim=1)
    k = model.config.num_classes
    return np.array([float((predicted[labels == c] == c).float().mean()) if (labels == c).any() else float("nan")
                     for c in range(k)])
