"""Score a set of generated clips against real ones: FID, IS, mIS, AM, NDB with the evaluation classifier, and mel FD.

    from sashimi.metrics import score
    scores = score("runs/classifier", real="builtin", fake="runs/tiny/samples")
    scores["fid"], scores["is"], scores["mel_fd"], scores["notes"]

`real` and `fake` are each a folder of audio files (searched recursively), 'builtin' (the
builtin test split) or 'builtin:SPLIT', a float tensor / array (N, T) at the classifier's rate,
a (waveforms, sample_rate) pair, or anything with `.audio` and `.sample_rate` (a
GenerationResult). Audio at another rate is resampled to the classifier's, and the result's
"notes" say so. Clips are cut or zero-padded to the classifier's clip length.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import numpy as np
import torch

from ..data.audio import AudioError, load_audio, probe_audio, resample_factors
from ..data.audio import _resample as resample_array
from ..data.datasets import BuiltinDataset, make_dataset
from ..data.datasets import _find_audio_files as find_audio_files
from ..nn.mel import LogMel
from . import functional as F
from .classifier import EvalClassifier, fit_length

__all__ = ["score", "scores_and_references", "ScoreInputError", "load_clips", "mel_frame_features", "mel_frechet_distance", "MEL_SETTINGS"]

# The classifier-free mel statistics: 64 Slaney mel bands up to min(8 kHz, Nyquist), 64 ms windows, 16 ms hop.
MEL_SETTINGS = dict(n_fft=1024, win_length=1024, hop_length=256, n_mels=64, f_min=0.0, f_max=8000.0)
_BUILTIN_CLIPS = 500


class ScoreInputError(ValueError):
    """A real or fake set that cannot be scored (empty, unreadable, wrong shape)."""


def _builtin_clips(spec: str, sample_rate: int, clip_samples: int, n: int | None) -> torch.Tensor:
    split = spec.split(":", 1)[1] if ":" in spec else "test"
    dataset = make_dataset("builtin", split, sample_rate=sample_rate, sample_len=clip_samples, quantization=None,
                           n_items=n or _BUILTIN_CLIPS)
    return torch.stack([dataset[i]["wav"] for i in range(len(dataset))])


def _folder_clips(folder: str, name: str, sample_rate: int, notes: list, n: int | None = None) -> list[torch.Tensor]:
    if not os.path.isdir(folder):
        raise ScoreInputError(f"{name} set {folder!r} is not a folder, 'builtin' or 'builtin:SPLIT'")
    files = find_audio_files(folder)
    if not files:
        raise ScoreInputError(f"{name} folder {folder!r} holds no audio files (.wav/.flac/.ogg, searched recursively)")
    clips, bad, rates = [], [], Counter()
    if n is not None and len(files) > n:  # an even spread over the (sorted) files: every class of an SC09 folder
        notes.append(f"{name}: {n} of the {len(files)} files in {folder!r} used")
        files = [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]
    for rel in files:
        path = os.path.join(folder, rel)
        try:
            rates[probe_audio(path, check_content=False).sample_rate] += 1
            clips.append(load_audio(path, sample_rate))
        except AudioError as e:
            bad.append(f"{rel}: {e.reason}")
    if not clips:
        raise ScoreInputError(f"{name} folder {folder!r}: none of its {len(files)} audio files could be read ("
                              + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") + ")")
    if bad:
        notes.append(f"{name}: skipped {len(bad)} of {len(files)} unreadable files ({'; '.join(bad[:3])}"
                     + (" ..." if len(bad) > 3 else "") + ")")
    other = {r: n for r, n in rates.items() if r != sample_rate}
    if other:
        notes.append(f"{name}: resampled {sum(other.values())} file(s) from "
                     + ", ".join(f"{r} Hz" for r in sorted(other)) + f" to the classifier's {sample_rate} Hz")
    return clips


def load_clips(source, name: str, sample_rate: int, clip_samples: int, notes: list, n: int | None = None) -> torch.Tensor:
    """(N, clip_samples) float32 waveforms at `sample_rate` from any accepted source (see the module docstring)."""
    rate = sample_rate
    if isinstance(source, (str, os.PathLike)):
        spec = os.fspath(source)
        if spec.lower() == "builtin" or spec.lower().startswith("builtin:"):
            return _builtin_clips(spec.lower(), sample_rate, clip_samples, n)
        clips = _folder_clips(spec, name, sample_rate, notes, n)
    else:
        if hasattr(source, "audio") and hasattr(source, "sample_rate"):
            source, rate = source.audio, int(source.sample_rate)
        elif isinstance(source, tuple) and len(source) == 2:
            source, rate = source[0], int(source[1])
        wav = torch.as_tensor(np.asarray(source) if not isinstance(source, torch.Tensor) else source)
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2 or not wav.is_floating_point():
            raise ScoreInputError(f"{name} waveforms must be a float array (clips, samples), got "
                                  f"{wav.dtype} of shape {tuple(wav.shape)}")
        if not bool(torch.isfinite(wav).all()):
            raise ScoreInputError(f"{name} waveforms contain NaN or infinite samples")
        clips = list(wav.float().cpu())
        if rate != sample_rate:
            up, down = resample_factors(rate, sample_rate)
            clips = [torch.from_numpy(resample_array(c.numpy(), up, down)) for c in clips]
            notes.append(f"{name}: resampled {len(clips)} clip(s) from {rate} Hz to the classifier's {sample_rate} Hz")
    if not clips:
        raise ScoreInputError(f"the {name} set is empty")
    lengths = {len(c) for c in clips}
    if any(n_ != clip_samples for n_ in lengths):
        notes.append(f"{name}: clips of {min(lengths)}-{max(lengths)} samples cut or zero-padded to "
                     f"{clip_samples} ({clip_samples / sample_rate:g} s)")
    clips = torch.stack([fit_length(c[None], clip_samples)[0] for c in clips])
    if n is not None and len(clips) > n:
        clips = clips[:n]
    return clips


@torch.no_grad()
def mel_frame_features(wav: torch.Tensor, sample_rate: int, batch_size: int = 64) -> np.ndarray:
    """Log-mel frames of every clip as rows (N * frames, n_mels), float64 (MEL_SETTINGS at this rate)."""
    settings = dict(MEL_SETTINGS, f_max=min(MEL_SETTINGS["f_max"], sample_rate / 2))
    log_mel = LogMel(sample_rate, **settings)
    frames = [log_mel(wav[s:s + batch_size].float()).transpose(1, 2).reshape(-1, settings["n_mels"])
              for s in range(0, len(wav), batch_size)]
    return torch.cat(frames).double().numpy()


def mel_frechet_distance(real_wav: torch.Tensor, fake_wav: torch.Tensor, sample_rate: int) -> float:
    """Fréchet distance between Gaussians of the log-mel frames of two sets of clips. Lower is better; no classifier."""
    return F.frechet_distance(mel_frame_features(real_wav, sample_rate), mel_frame_features(fake_wav, sample_rate))


def score(classifier, real, fake, *, n_real: int | None = None, n_fake: int | None = None,
          ndb_bins: int | None = None, seed: int = 0, batch_size: int = 64) -> dict:
    """All metrics of `fake` against `real` (see the module docstring for the accepted sources).

    Returns a JSON-able dict: fid, is, mis, am, ndb, ndb_fraction, ndb_bins, mel_fd (the
    generated set's scores), real_is / real_mis (the same classifier on the real set, for
    reference), fake_class_counts, n_real, n_fake, sample_rate, clip_seconds, classifier,
    classifier_test_accuracy and notes (resampling, skipped files, small-set warnings).
    Lower is better for fid, am, ndb, mel_fd; higher for is and mis (up to the real set's).
    """
    model = classifier if isinstance(classifier, EvalClassifier) else EvalClassifier.from_pretrained(classifier)
    cfg = model.config
    notes: list[str] = []
    real_wav = load_clips(real, "real", cfg.sample_rate, cfg.clip_samples, notes, n_real)
    fake_wav = load_clips(fake, "fake", cfg.sample_rate, cfg.clip_samples, notes, n_fake)
    for name, wav in (("real", real_wav), ("fake", fake_wav)):
        if len(wav) < F.MIN_SAMPLES_FOR_COVARIANCE:
            raise ScoreInputError(f"the {name} set has {len(wav)} clip(s); the Fréchet distances need at least "
                                  f"{F.MIN_SAMPLES_FOR_COVARIANCE} clips in each set (a covariance), and more "
                                  f"than {cfg.embedding_dim} for an unbiased FID")
        if len(wav) <= cfg.embedding_dim:
            notes.append(f"{name}: {len(wav)} clips <= {cfg.embedding_dim} feature dimensions: the covariance is "
                         f"singular and FID is biased upwards; compare FIDs only at equal set sizes")
    real_feats, real_probs = (t.double().numpy() for t in model.features_and_probabilities(real_wav, batch_size))
    fake_feats, fake_probs = (t.double().numpy() for t in model.features_and_probabilities(fake_wav, batch_size))
    bins = ndb_bins or int(min(20, max(2, len(real_wav) // 25)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ndb = F.ndb(real_feats, fake_feats, n_bins=bins, seed=seed)
    counts = np.bincount(fake_probs.argmax(axis=1), minlength=cfg.num_classes)
    return {
        "fid": F.frechet_distance(real_feats, fake_feats),
        "is": F.inception_score(fake_probs),
        "mis": F.modified_inception_score(fake_probs),
        "am": F.am_score(fake_probs, real_probs),
        "ndb": ndb["ndb"], "ndb_fraction": ndb["ndb_fraction"], "ndb_bins": bins,
        "mel_fd": mel_frechet_distance(real_wav, fake_wav, cfg.sample_rate),
        "real_is": F.inception_score(real_probs),
        "real_mis": F.modified_inception_score(real_probs),
        "fake_class_counts": {c: int(k) for c, k in zip(cfg.classes, counts)},
        "n_real": len(real_wav), "n_fake": len(fake_wav), "sample_rate": cfg.sample_rate,
        "clip_seconds": cfg.clip_samples / cfg.sample_rate,
        "classifier": classifier if isinstance(classifier, str) else None,
        "classifier_test_accuracy": cfg.evaluation.get("test_accuracy"),
        "notes": notes,
    }


def scores_and_references(classifier: str, real, result, n_references: int = 4, n_real: int = 500):
    """(scores of a GenerationResult against `real`, {"audio", "sample_rate", "labels"} of a few real clips).

    What `sashimi generate --score` puts on the listening page. The real clips are at the
    result's sample rate; from the builtin data they are of different classes and timbres.
    """
    model = EvalClassifier.from_pretrained(classifier)
    scores = score(model, real, result, n_real=n_real)
    scores["classifier"] = os.path.abspath(classifier)
    references = None
    if n_references > 0:
        length = result.audio.shape[1]
        if isinstance(real, str) and real.lower() == "builtin":
            data = BuiltinDataset("test", sample_rate=result.sample_rate, quantizer=None)
            clips = [11 * i % data.n_items for i in range(n_references)]  # motif i, timbre i % 4
            audio = [data.clip(c)[:length] for c in clips]
            labels = [f"{data.clip_info(c)['class_name']}, {data.clip_info(c)['timbre_name']}" for c in clips]
        else:
            audio = list(load_clips(real, "real", result.sample_rate, length, [], n_references).numpy())
            labels = None
        references = {"audio": audio, "sample_rate": result.sample_rate, "labels": labels}
    return scores, references
