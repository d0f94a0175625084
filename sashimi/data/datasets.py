"""Audio datasets: a folder of audio files and a built-in synthetic set, as items every family trains on.

Every item is a dict that torch's default collate stacks into a batch:

    wav     FloatTensor (sample_len,) the waveform in [-1, 1] (padding = 0)
    mask    BoolTensor (sample_len,)  True on real samples, False on padding
    label   int                       class id, -1 when unknown
    tokens  LongTensor (sample_len,)  the quantised waveform (padding holds the zero level);
                                      only when the dataset has a quantizer

`dataset_for(model_config, data, split)` builds the dataset a model trains on (its sample
rate, clip length and quantiser); `make_dataset('builtin' | folder, split, ...)` takes them as
arguments. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import warnings
from collections import Counter, deque

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checks import check_int
from .audio import AUDIO_EXTENSIONS, AudioError, load_audio, probe_audio, resampled_length
from .builtin_synth import BUILTIN_CLASSES, BUILTIN_TIMBRES, MOTIFS, synthesize_clip
from .quantize import Quantizer

__all__ = ["AudioFolderDataset", "BuiltinDataset", "make_dataset", "dataset_for", "BadAudioWarning", "LinkWarning",
           "SPLITS"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
_MAX_REPLACEMENT_TRIES = 32


class BadAudioWarning(UserWarning):
    """Audio files were skipped (when the index was built) or replaced (when read)."""


def _canonical_split(split: str) -> str:
    key = str(split).lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {SPLITS} (or 'valid'/'validation'), got {split!r}")
    return _SPLIT_ALIASES[key]


def _make_quantizer(quantizer, bits: int) -> Quantizer | None:
    if quantizer is None or isinstance(quantizer, Quantizer):
        return quantizer
    if isinstance(quantizer, str):
        return Quantizer(quantizer, bits)
    raise TypeError(f"quantizer must be a Quantizer, 'mu_law', 'linear' or None, got {type(quantizer).__name__}")


class _ItemMaker:
    """Turns a float clip (at most sample_len samples) into the padded item dict (tokens with a quantizer)."""

    def __init__(self, sample_len: int, quantizer: Quantizer | None):
        self.sample_len, self.quantizer = sample_len, quantizer

    def __call__(self, wav: np.ndarray, label: int) -> dict:
        L, n = self.sample_len, min(len(wav), self.sample_len)
        wav = np.clip(np.asarray(wav[:n], dtype=np.float32), -1.0, 1.0)
        item = {"wav": torch.zeros(L, dtype=torch.float32), "mask": torch.zeros(L, dtype=torch.bool),
                "label": int(label)}
        item["wav"][:n] = torch.from_numpy(wav)
        item["mask"][:n] = True
        if self.quantizer is not None:
            item["tokens"] = torch.full((L,), self.quantizer.zero_level, dtype=torch.long)
            item["tokens"][:n] = self.quantizer.encode(wav)
        return item


# ----------------------------------------------------------------------------------------------
# A folder of audio files
# ----------------------------------------------------------------------------------------------

MAX_FOLDER_DEPTH = 32  # file discovery descends at most this many folders below root


class LinkWarning(UserWarning):
    """File discovery skipped symbolic links: loops, second paths to a file already indexed, dangling links."""


def _find_audio_files(root: str) -> list[str]:
    """Relative POSIX paths of .wav/.flac/.ogg files under root (any case), sorted; hidden entries skipped.

    Symbolic links are followed, but each real folder is walked once and each real file (by device
    and inode) is indexed once, under its own name rather than a link's, then its shortest path: a link loop
    or a second link to the same file can neither hang the walk nor put one file in two splits.
    The walk stops MAX_FOLDER_DEPTH folders below root. Links and folders skipped are summarised
    in one LinkWarning.
    """
    by_file: dict[tuple[int, int], tuple] = {}  # (device, inode) -> (is a link, depth, path)
    skipped: list[tuple[str, str]] = []  # (relative path, why)
    seen_dirs: set[tuple[int, int]] = set()
    rel = lambda path: os.path.relpath(path, root).replace(os.sep, "/")  # noqa: E731
    queue = deque([(root, 0)])  # breadth first: a folder reached by two paths is walked under the shorter
    while queue:
        folder, depth = queue.popleft()
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel(folder), f"unreadable ({e.strerror})"))
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            skipped.append((rel(folder), "a link to a folder already searched (a loop or a second path)"))
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            audio = name.lower().endswith(AUDIO_EXTENSIONS)
            try:
                is_dir = entry.is_dir()  # follows links
                info = entry.stat() if audio and not is_dir else None
            except OSError:
                skipped.append((rel(entry.path), "a dangling link"))
                continue
            if is_dir:
                if name == "_background_noise_":
                    continue
                if depth + 1 > MAX_FOLDER_DEPTH:
                    skipped.append((rel(entry.path), f"deeper than {MAX_FOLDER_DEPTH} folders below the root"))
                    continue
                queue.append((entry.path, depth + 1))
            elif info is not None and stat.S_ISREG(info.st_mode):
                # preference: the file itself over a link to it, then the shortest path, then sort order
                path, key = rel(entry.path), (info.st_dev, info.st_ino)
                rank = (entry.is_symlink(), path.count("/"), path)
                kept = by_file.get(key)
                if kept is None:
                    by_file[key] = rank
                else:
                    first, second = sorted((kept, rank))
                    by_file[key] = first
                    skipped.append((second[2], f"the same file as {first[2]}"))
    if skipped:
        warnings.warn(f"file discovery under {root!r} skipped {len(skipped)} entries: "
                      + "; ".join(f"{p}: {why}" for p, why in skipped[:3])
                      + (f"; ... ({len(skipped) - 3} more at logging level DEBUG)" if len(skipped) > 3 else ""),
                      LinkWarning, stacklevel=3)
        for p, why in skipped:
            logger.debug("file discovery skipped %s: %s", p, why)
    return sorted(path for _, _, path in by_file.values())


def _split_key(relpath: str) -> str:
    """What the split hash sees: SC09/Speech-Commands names 'spk_nohash_3.wav' group by speaker."""
    folder, _, name = relpath.rpartition("/")
    if "_nohash_" in name:
        return re.sub(r"_nohash_.*$", "", name)
    return relpath


def _hash_unit(key: str) -> float:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)


def _read_list(path: str) -> set[str]:
    """Relative paths listed one per line (SC09's validation_list.txt / testing_list.txt)."""
    with open(path, encoding="utf-8") as f:
        entries = (line.strip().replace("\\", "/") for line in f)
        return {e[2:] if e.startswith("./") else e for e in entries if e}


def _position_split(n: int, fractions) -> np.ndarray:
    """Split ids (0 train, 1 val, 2 test) for n consecutive pieces: train first, then val, then test.

    Each split with a positive fraction gets at least one piece when n allows (train first).
    """
    ids = np.zeros(n, dtype=np.int8)
    n_val, n_test = (max(1, int(round(n * f))) if f > 0 else 0 for f in fractions[1:])
    n_val = min(n_val, max(0, n - 1))  # train keeps at least one piece
    n_test = min(n_test, max(0, n - 1 - n_val))
    ids[n - n_val - n_test:n - n_test] = 1
    ids[n - n_test:] = 2
    return ids


def assign_file_splits(files: list[str], fractions=(0.9, 0.05, 0.05), val_list=None, test_list=None):
    """Split id per file (0 train, 1 val, 2 test), or None when the folder is too small to split by file.

    With SC09 lists, listed files are val/test and the rest train. Otherwise each file's split
    comes from a hash of its path (so it never changes when files are added or removed); if
    that leaves a split with a positive fraction empty, files are ranked by the hash and cut by
    the fractions instead (every such split gets one); with fewer files than such splits, None.
    """
    if val_list is not None or test_list is not None:
        val_list, test_list = val_list or set(), test_list or set()
        return np.array([1 if f in val_list else 2 if f in test_list else 0 for f in files], dtype=np.int8)
    u = np.array([_hash_unit(_split_key(f)) for f in files])
    ids = np.where(u < fractions[0], 0, np.where(u < fractions[0] + fractions[1], 1, 2)).astype(np.int8)
    needed = {k for k, f in enumerate(fractions) if f > 0}
    if needed <= set(ids.tolist()):
        return ids
    if len(files) < len(needed):
        return None
    ranked = np.empty(len(files), dtype=np.int8)
    ranked[np.argsort(u, kind="stable")] = _position_split(len(files), fractions)
    return ranked


class AudioFolderDataset(Dataset):
    """Audio files found recursively under `root` (.wav/.flac/.ogg, any case), as next-sample items.

    Files are mixed down to mono, resampled to `sample_rate` and cut into `sample_len` chunks
    (the tail chunk of each file is kept, padded, with mask False on the padding). Labels come
    from the first folder level under root (sorted names -> 0, 1, ...); files at the top: -1.

    Splits: SC09's `validation_list.txt` / `testing_list.txt` in root when present; otherwise a
    hash of each relative path against `split_fractions` (see `assign_file_splits`); a folder of
    1-2 files is split by position of its chunks instead (`split_unit == 'chunk'`).

    Bad files (unreadable, corrupt, empty, NaN/inf) are found when the index is built (with
    check_files, by decoding each file of the split once), listed in `skipped` as
    (path, reason, detail) and summarised in ONE BadAudioWarning. A file that fails later, in
    __getitem__, is replaced by a deterministic other item; `n_replaced` counts these.
    Decoded audio is kept in memory while the split fits in `cache_bytes` (float32 at
    sample_rate); the rest is read from disk per item, only the chunk's region.
    """

    def __init__(self, root, split: str = "train", sample_rate: int = 16000, sample_len: int = 16000,
                 quantizer: Quantizer | str | None = "mu_law", *, bits: int = 8,
                 split_fractions=(0.9, 0.05, 0.05), check_files: bool = True, cache_bytes: int = 128 << 20,
                 max_items: int | None = None):
        self.root = os.fspath(root)
        self.split = _canonical_split(split)
        self.sample_rate = check_int("sample_rate", sample_rate, 1)
        self.sample_len = check_int("sample_len", sample_len, 1)
        self.quantizer = _make_quantizer(quantizer, bits)
        self._make_item = _ItemMaker(self.sample_len, self.quantizer)
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}")

        if not os.path.isdir(self.root):
            what = "does not exist" if not os.path.exists(self.root) else "is not a folder"
            raise ValueError(f"audio folder {self.root!r} {what}")
        all_files = _find_audio_files(self.root)
        if not all_files:
            raise ValueError(f"no audio files ({'/'.join(AUDIO_EXTENSIONS)}, searched recursively) "
                             f"in folder {self.root!r}")
        self.classes = sorted({f.split("/", 1)[0] for f in all_files if "/" in f})
        class_id = {c: i for i, c in enumerate(self.classes)}

        lists = [os.path.join(self.root, n) for n in ("validation_list.txt", "testing_list.txt")]
        if any(os.path.isfile(p) for p in lists):
            val_list, test_list = (_read_list(p) if os.path.isfile(p) else set() for p in lists)
            ids = assign_file_splits(all_files, fractions, val_list, test_list)
            self.split_rule = "lists"
        else:
            ids = assign_file_splits(all_files, fractions)
            self.split_rule = "hash"
        self.split_unit = "file" if ids is not None else "chunk"
        wanted = SPLITS.index(self.split)
        candidates = all_files if ids is None else [f for f, s in zip(all_files, ids) if s == wanted]

        lengths = self._probe_files(candidates, check_files, cache_bytes)
        self.labels_of_files = [class_id[f.split("/", 1)[0]] if "/" in f else -1 for f in self.files]

        # Items: (file, start) for every sample_len chunk; a tiny folder keeps its split's chunks.
        item_file, item_start = [], []
        for k, n in enumerate(lengths):
            starts = np.arange(0, n, self.sample_len, dtype=np.int64)
            if ids is None:
                starts = starts[_position_split(len(starts), fractions) == wanted]
            item_file.append(np.full(len(starts), k, dtype=np.int64))
            item_start.append(starts)
        self._item_file = np.concatenate(item_file) if item_file else np.zeros(0, np.int64)
        self._item_start = np.concatenate(item_start) if item_start else np.zeros(0, np.int64)
        if max_items is not None and check_int("max_items", max_items, 1) < len(self._item_file):
            keep = np.linspace(0, len(self._item_file) - 1, max_items).round().astype(np.int64)
            self._item_file, self._item_start = self._item_file[keep], self._item_start[keep]
        if self._cache:  # drop cached files that no item of this split uses (tiny-folder chunk split)
            used = set(self._item_file.tolist())
            self._cache = {k: v for k, v in self._cache.items() if k in used}

        if self.skipped:
            reasons = Counter(reason for _, reason, _ in self.skipped)
            warnings.warn(
                f"skipped {len(self.skipped)} of {len(candidates)} audio files in split '{self.split}' of "
                f"{self.root!r}: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
                + " (the list is in dataset.skipped; file names at logging level DEBUG)",
                BadAudioWarning, stacklevel=2)
        if len(self._item_file) == 0:
            raise ValueError(
                f"no usable audio in split '{self.split}' of folder {self.root!r}: {len(all_files)} audio files "
                f"found, {len(candidates)} in this split, {len(self.skipped)} of them skipped as bad"
                + (f" ({', '.join(f'{r}: {p}' for p, r, _ in self.skipped[:5])})" if self.skipped else "")
                + ("; the folder has too few files to split by file, so it is split by chunk position, "
                   "and its files are too short to give this split a chunk" if ids is None else ""))
        self.n_replaced = 0
        self.read_failures: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._item_file)

    def _probe_files(self, candidates: list[str], check_files: bool, cache_bytes: int) -> list[int]:
        """Fill self.files (usable), self.skipped (bad) and self._cache; return the lengths at sample_rate.

        With check_files, each file is decoded once: kept in the cache while the budget lasts,
        else only checked in blocks. Without, only the header is read.
        """
        self.files, self.skipped, self._cache, lengths = [], [], {}, []
        cache_left = int(cache_bytes)
        for rel in candidates:
            path = os.path.join(self.root, rel)
            try:
                info = probe_audio(path, check_content=False)
                n = resampled_length(info.frames, info.sample_rate, self.sample_rate)
                if check_files and 4 * n <= cache_left:
                    wav = load_audio(path, self.sample_rate).numpy()
                    if len(wav) == 0:
                        raise AudioError(path, "empty", "0 frames decoded")
                    n, cache_left = len(wav), cache_left - 4 * len(wav)
                    self._cache[len(self.files)] = wav
                elif check_files:
                    info = probe_audio(path, check_content=True)
                    n = resampled_length(info.frames, info.sample_rate, self.sample_rate)
            except AudioError as e:
                self.skipped.append((rel, e.reason, e.detail))
                logger.debug("skipping %s: %s (%s)", path, e.reason, e.detail)
                continue
            self.files.append(rel)
            lengths.append(n)
        return lengths

    def label(self, index: int) -> int:
        return self.labels_of_files[int(self._item_file[index])]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def item_source(self, index: int) -> tuple[str, int]:
        """(relative path, first sample at sample_rate) of item `index`."""
        return self.files[int(self._item_file[index])], int(self._item_start[index])

    def _read_item(self, index: int) -> np.ndarray:
        k, start = int(self._item_file[index]), int(self._item_start[index])
        if k in self._cache:
            return self._cache[k][start:start + self.sample_len]
        wav = load_audio(os.path.join(self.root, self.files[k]), self.sample_rate, start=start,
                         num_frames=self.sample_len).numpy()
        if len(wav) == 0:
            raise AudioError(self.files[k], "read-error", f"no samples at {start}")
        return wav

    def _replacement(self, index: int, attempt: int) -> int:
        digest = hashlib.sha1(f"{index}:{attempt}".encode()).hexdigest()
        return int(digest[:12], 16) % len(self)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        candidate = index
        for attempt in range(1, _MAX_REPLACEMENT_TRIES + 1):
            rel = self.files[int(self._item_file[candidate])]
            if rel not in self.read_failures:
                try:
                    wav = self._read_item(candidate)
                except (AudioError, OSError, RuntimeError) as e:
                    self.read_failures[rel] = getattr(e, "reason", type(e).__name__)
                    warnings.warn(f"could not read {os.path.join(self.root, rel)} ({e}); its items are replaced "
                                  f"by other items of split '{self.split}'", BadAudioWarning, stacklevel=2)
                else:
                    if candidate != index:
                        self.n_replaced += 1
                    return self._make_item(wav, self.label(candidate))
            candidate = self._replacement(index, attempt)
        raise AudioError(self.root, "read-error", f"item {index} and {_MAX_REPLACEMENT_TRIES - 1} replacements "
                         f"failed to read; {len(self.read_failures)} files failed so far")

    def __repr__(self) -> str:
        return (f"AudioFolderDataset({self.root!r}, split={self.split!r}, files={len(self.files)}, items={len(self)}, "
                f"sample_rate={self.sample_rate}, sample_len={self.sample_len}, skipped={len(self.skipped)})")


# ----------------------------------------------------------------------------------------------
# The built-in synthetic dataset
# ----------------------------------------------------------------------------------------------

_DEFAULT_N_ITEMS = {"train": 10000, "val": 500, "test": 500}


class BuiltinDataset(Dataset):
    """Procedurally synthesised, SC09-like clips (1 s at 16 kHz): 10 motif classes x 4 timbres.

    Clip c of a split plays motif c % 10 (its `label`) in timbre (c // 10) % 4; everything
    else is drawn from a generator seeded by (seed, split, c), so any item can be rebuilt on its
    own and the splits never share a clip. Nothing is downloaded or stored: clips are
    synthesised on access (a few ms each). n_items counts clips (default 10000 train, 500 val,
    500 test); if sample_len is shorter than the clip, each clip gives ceil(clip/sample_len)
    chunks, the last padded and masked, like AudioFolderDataset.
    """

    classes = BUILTIN_CLASSES
    timbres = BUILTIN_TIMBRES

    def __init__(self, split: str = "train", n_items: int | None = None, sample_rate: int = 16000,
                 sample_len: int = 16000, seed: int = 0, quantizer: Quantizer | str | None = "mu_law", *,
                 bits: int = 8, duration: float = 1.0):
        self.split = _canonical_split(split)
        self.n_items = _DEFAULT_N_ITEMS[self.split] if n_items is None else check_int("n_items", n_items, 1)
        self.sample_rate = check_int("sample_rate", sample_rate, 1)
        self.sample_len = check_int("sample_len", sample_len, 1)
        self.seed = check_int("seed", seed, 0)
        if not duration > 0:
            raise ValueError(f"duration must be positive (seconds), got {duration!r}")
        self.clip_len = max(1, int(round(duration * self.sample_rate)))
        self.quantizer = _make_quantizer(quantizer, bits)
        self._make_item = _ItemMaker(self.sample_len, self.quantizer)
        self.chunks_per_clip = -(-self.clip_len // self.sample_len)
        self._last = (None, None)

    def __len__(self) -> int:
        return self.n_items * self.chunks_per_clip

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def clip_info(self, clip: int) -> dict:
        return {"label": clip % len(MOTIFS), "timbre": (clip // len(MOTIFS)) % len(BUILTIN_TIMBRES),
                "class_name": BUILTIN_CLASSES[clip % len(MOTIFS)],
                "timbre_name": BUILTIN_TIMBRES[(clip // len(MOTIFS)) % len(BUILTIN_TIMBRES)]}

    def label(self, index: int) -> int:
        return (index // self.chunks_per_clip) % len(MOTIFS)

    def clip(self, clip: int) -> np.ndarray:
        """The whole float32 clip number `clip` (clip_len samples)."""
        if self._last[0] == clip:
            return self._last[1]
        info = self.clip_info(clip)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), clip])
        wav = synthesize_clip(info["label"], info["timbre"], rng, self.sample_rate, self.clip_len)
        self._last = (clip, wav)
        return wav

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        clip, chunk = divmod(index % n, self.chunks_per_clip)
        start = chunk * self.sample_len
        return self._make_item(self.clip(clip)[start:start + self.sample_len], self.label(index % n))

    def __repr__(self) -> str:
        return (f"BuiltinDataset(split={self.split!r}, n_items={self.n_items}, sample_rate={self.sample_rate}, "
                f"sample_len={self.sample_len}, seed={self.seed})")


def make_dataset(data, split: str = "train", *, sample_rate: int = 16000, sample_len: int = 16000,
                 quantization: Quantizer | str | None = "mu_law", bits: int = 8, seed: int = 0,
                 n_items: int | None = None, **kwargs) -> Dataset:
    """'builtin' -> BuiltinDataset; a folder path -> AudioFolderDataset (n_items caps its items).

    `quantization` is 'mu_law', 'linear', a Quantizer, or None (items without tokens). Other
    keyword arguments go to the dataset class.
    """
    common = dict(sample_rate=sample_rate, sample_len=sample_len, quantizer=quantization, bits=bits)
    if isinstance(data, str) and data.lower() == "builtin":
        return BuiltinDataset(split, n_items=n_items, seed=seed, **common, **kwargs)
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be 'builtin' or a folder path, got {type(data).__name__}")
    return AudioFolderDataset(data, split, max_items=n_items, **common, **kwargs)


def dataset_for(model_config, data, split: str = "train", *, n_items: int | None = None, **kwargs) -> Dataset:
    """The dataset a model of `model_config` trains on: its sample_rate and sample_len, and tokens
    from its quantiser when the config has one (`model_config.quantizer()`, a Quantizer). A config with a
    `make_dataset(data, split, n_items=)` method builds its own (the flow families: reflow pairs, captions)."""
    make = getattr(model_config, "make_dataset", None)
    if callable(make):
        return make(data, split, n_items=n_items, **kwargs)
    quantizer = model_config.quantizer() if hasattr(model_config, "quantizer") else None
    return make_dataset(data, split, sample_rate=model_config.sample_rate, sample_len=model_config.sample_len,
                        quantization=quantizer, n_items=n_items, **kwargs)
