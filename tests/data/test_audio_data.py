"""Tests of sashimi.data.audio and sashimi.data.datasets on audio files the tests write themselves."""

import os
import time
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from sashimi.data.audio import AudioError, load_audio, probe_audio, resample_factors, resampled_length, save_audio
from sashimi.data.builtin_synth import BUILTIN_CLASSES
from sashimi.data.datasets import (AudioFolderDataset, BadAudioWarning, BuiltinDataset, assign_file_splits,
                                   dataset_for, make_dataset)
from sashimi.data.quantize import Quantizer

SR = 16000


def sine(freq=440.0, seconds=1.0, sr=SR, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)).astype(np.float32)


def write(path, data, sr=SR, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, data, sr, **kwargs)
    return path


def peak_frequency(x, sr):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * sr / len(x)


# ---------------------------------------------------------------------------------------------
# load_audio / save_audio
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,subtype,tol", [
    ("WAV", "PCM_16", 1 / 32768), ("WAV", "PCM_24", 1e-6), ("WAV", "PCM_32", 1e-7), ("WAV", "FLOAT", 0.0),
    ("WAV", "PCM_U8", 1 / 128), ("FLAC", "PCM_16", 1 / 32768), ("FLAC", "PCM_24", 1e-6),
])
def test_load_formats(tmp_path, fmt, subtype, tol):
    x = sine(seconds=0.25)
    path = write(str(tmp_path / f"a.{fmt.lower()}"), x, format=fmt, subtype=subtype)
    wav = load_audio(path, SR)
    assert wav.dtype == torch.float32 and wav.shape == (len(x),)
    assert np.abs(wav.numpy() - x).max() <= tol + 1e-7


def test_load_ogg(tmp_path):
    x = sine(seconds=0.5)
    path = write(str(tmp_path / "a.ogg"), x, format="OGG", subtype="VORBIS")
    wav = load_audio(path, SR).numpy()
    assert len(wav) == len(x)
    assert abs(peak_frequency(wav, SR) - 440) < 5
    assert np.corrcoef(wav, x)[0, 1] > 0.95


def test_stereo_mixdown(tmp_path):
    left, right = sine(440), sine(1000, amp=0.25)
    path = write(str(tmp_path / "st.wav"), np.stack([left, right], 1), subtype="FLOAT")
    wav = load_audio(path, SR).numpy()
    assert wav.shape == (len(left),)
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-7)


def test_resample_44k_length_and_frequency(tmp_path):
    sr_in = 44100
    x = sine(440.0, seconds=1.0, sr=sr_in)
    path = write(str(tmp_path / "hi.wav"), x, sr=sr_in, subtype="PCM_16")
    assert resample_factors(sr_in, SR) == (160, 441)
    wav, rate = load_audio(path, SR, return_rate=True)
    assert rate == SR
    assert len(wav) == resampled_length(sr_in, sr_in, SR) == 16000
    assert abs(peak_frequency(wav.numpy(), SR) - 440) < 2
    # amplitude survives (the anti-aliasing filter passes 440 Hz)
    assert abs(np.abs(wav.numpy()[1000:-1000]).max() - 0.5) < 0.01
    # a tone above the new Nyquist (9 kHz) is removed, not aliased
    high = write(str(tmp_path / "high.wav"), sine(9000.0, sr=sr_in), sr=sr_in)
    assert np.abs(load_audio(high, SR).numpy()[1000:-1000]).max() < 0.01
    assert load_audio(path).shape == (sr_in,)  # sample_rate=None keeps the file's rate


@pytest.mark.parametrize("sr_in", [44100, 8000, SR])
def test_region_read_equals_whole_file(tmp_path, sr_in):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, int(1.7 * sr_in)).astype(np.float32)
    path = write(str(tmp_path / "r.wav"), x, sr=sr_in, subtype="FLOAT")
    whole = load_audio(path, SR)
    for start, n in [(0, 100), (1, 4096), (5000, 16000), (len(whole) - 10, 100), (len(whole) + 5, 10)]:
        part = load_audio(path, SR, start=start, num_frames=n)
        assert torch.allclose(part, whole[start:start + n], atol=1e-6), (start, n)


def test_bad_files_raise_audio_error(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    empty = write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32))
    x = sine(seconds=0.1)
    x[10] = np.nan
    nan = write(str(tmp_path / "nan.wav"), x, subtype="FLOAT")
    x[10] = np.inf
    inf = write(str(tmp_path / "inf.wav"), x, subtype="FLOAT")
    cases = [(corrupt, "unreadable"), (tmp_path / "missing.wav", "unreadable"), (empty, "empty"),
             (nan, "non-finite"), (inf, "non-finite")]
    for path, reason in cases:
        with pytest.raises(AudioError) as info:
            probe_audio(path)
        assert info.value.reason == reason and str(path) in str(info.value)
        with pytest.raises(ValueError):  # AudioError is a ValueError
            load_audio(path, SR)
    assert probe_audio(nan, check_content=False).frames == len(x)  # header alone looks fine


def test_save_audio_round_trip_and_atomic(tmp_path):
    x = sine(seconds=0.2)
    path = tmp_path / "out" / "a.wav"
    save_audio(path, torch.from_numpy(x), SR)
    info = sf.info(str(path))
    assert (info.samplerate, info.subtype, info.frames) == (SR, "PCM_16", len(x))
    assert np.abs(load_audio(path, SR).numpy() - x).max() <= 1 / 32768
    save_audio(path, np.full(10, 3.0), SR)  # overwrite; clipped to [-1, 1]
    assert load_audio(path).numpy().min() > 0.999
    save_audio(tmp_path / "st.wav", np.stack([x, -x]), SR)  # (channels, T)
    assert sf.info(str(tmp_path / "st.wav")).channels == 2
    with pytest.raises(ValueError):
        save_audio(path, np.array([0.0, np.nan]), SR)
    assert load_audio(path).shape == (10,)  # the failed write left the old file intact
    assert sorted(os.listdir(tmp_path / "out")) == ["a.wav"]  # no temporary files left


# ---------------------------------------------------------------------------------------------
# AudioFolderDataset
# ---------------------------------------------------------------------------------------------

def make_folder(root, n_per_class=12, classes=("down", "up"), seconds=0.5):
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            write(os.path.join(root, name, f"clip{i:02d}.wav"), sine(200 + 50 * c + 5 * i, seconds))
    return root


def test_empty_missing_and_no_audio_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        AudioFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files.*empty"):
        AudioFolderDataset(tmp_path / "empty")
    (tmp_path / "text" / "sub").mkdir(parents=True)
    (tmp_path / "text" / "sub" / "notes.txt").write_text("hello")
    (tmp_path / "text" / "a.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="no audio files"):
        AudioFolderDataset(tmp_path / "text")
    write(str(tmp_path / "file.wav"), sine())
    with pytest.raises(ValueError, match="not a folder"):
        AudioFolderDataset(tmp_path / "file.wav")


def test_mixed_formats_bad_files_one_warning(tmp_path):
    root = str(tmp_path / "data")
    rng = np.random.default_rng(1)
    good = {
        "a/s16.wav": dict(subtype="PCM_16"), "a/u8.wav": dict(subtype="PCM_U8"),
        "a/s24.WAV": dict(subtype="PCM_24"), "b/f32.wav": dict(subtype="FLOAT"),
        "b/deep/x.flac": dict(subtype="PCM_16"), "b/y.ogg": dict(format="OGG", subtype="VORBIS"),
    }
    for rel, kw in good.items():
        write(os.path.join(root, rel), sine(seconds=0.3), **kw)
    write(os.path.join(root, "a", "stereo44.wav"), np.stack([sine(sr=44100), sine(sr=44100)], 1), sr=44100)
    with open(os.path.join(root, "a", "corrupt.wav"), "wb") as f:
        f.write(rng.bytes(3000))
    write(os.path.join(root, "b", "empty.wav"), np.zeros(0, np.float32))
    bad_nan = sine(seconds=0.3)
    bad_nan[::100] = np.nan
    write(os.path.join(root, "b", "nan.wav"), bad_nan, subtype="FLOAT")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = AudioFolderDataset(root, "train", split_fractions=(1.0, 0.0, 0.0), sample_len=SR)
    bad = [w for w in caught if issubclass(w.category, BadAudioWarning)]
    assert len(bad) == 1
    assert "skipped 3 of 10" in str(bad[0].message) and "1 unreadable" in str(bad[0].message)
    assert sorted((p, r) for p, r, _ in ds.skipped) == [("a/corrupt.wav", "unreadable"), ("b/empty.wav", "empty"),
                                                       ("b/nan.wav", "non-finite")]
    assert len(ds.files) == 7 and len(ds) == 7
    assert ds.classes == ["a", "b"]
    lengths = {ds.item_source(i)[0]: int(ds[i]["mask"].sum()) for i in range(len(ds))}
    assert lengths["a/stereo44.wav"] == SR  # 1 s at 44.1 kHz -> 16000 samples
    assert lengths["a/s16.wav"] == int(0.3 * SR)
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] == (0 if ds.item_source(i)[0].startswith("a/") else 1)
        assert set(item) == {"tokens", "wav", "mask", "label"}


def test_nothing_usable_is_a_clear_error(tmp_path):
    root = tmp_path / "allbad"
    root.mkdir()
    (root / "x.wav").write_bytes(b"RIFF garbage")
    write(str(root / "e.wav"), np.zeros(0, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadAudioWarning)
        with pytest.raises(ValueError, match="no usable audio.*allbad"):
            AudioFolderDataset(root, "train")


def test_hash_split_is_deterministic_disjoint_and_stable(tmp_path):
    root = make_folder(str(tmp_path / "d"), n_per_class=30, seconds=0.05)
    splits = {s: AudioFolderDataset(root, s, sample_len=800) for s in ("train", "val", "test")}
    files = {s: set(d.files) for s, d in splits.items()}
    assert files["train"] == set(AudioFolderDataset(root, "train", sample_len=800).files)
    assert not files["train"] & files["val"] and not files["train"] & files["test"] and not files["val"] & files["test"]
    assert sum(len(f) for f in files.values()) == 60
    assert len(files["train"]) > len(files["val"]) and files["val"] and files["test"]
    # adding files never moves existing ones between splits
    write(os.path.join(root, "up", "new_one.wav"), sine(seconds=0.05))
    assert files["val"] <= set(AudioFolderDataset(root, "val", sample_len=800).files)
    assert AudioFolderDataset(root, "valid", sample_len=800).split == "val"


def test_split_assignment_rules():
    files = [f"f{i}.wav" for i in range(200)]
    ids = assign_file_splits(files)
    assert np.array_equal(ids, assign_file_splits(list(files)))
    assert 0.8 < (ids == 0).mean() < 0.97
    # speech-commands names: one speaker's files always share a split
    spk = [f"{w}/abcd1234_nohash_{k}.wav" for w in ("one", "two", "three") for k in range(3)]
    assert len(set(assign_file_splits(spk + files)[:len(spk)].tolist())) == 1
    # 3 files: every split still gets one
    assert sorted(assign_file_splits(["a.wav", "b.wav", "c.wav"]).tolist()) == [0, 1, 2]
    assert assign_file_splits(["a.wav"]) is None


def test_sc09_lists_define_splits(tmp_path):
    root = make_folder(str(tmp_path / "sc09"), n_per_class=5, classes=("zero", "one"), seconds=0.1)
    (tmp_path / "sc09" / "validation_list.txt").write_text("zero/clip00.wav\none/clip01.wav\nnot/there.wav\n")
    (tmp_path / "sc09" / "testing_list.txt").write_text("./zero/clip02.wav\n")
    val = AudioFolderDataset(root, "validation", sample_len=SR)
    test = AudioFolderDataset(root, "test", sample_len=SR)
    train = AudioFolderDataset(root, "train", sample_len=SR)
    assert val.split_rule == "lists"
    assert sorted(val.files) == ["one/clip01.wav", "zero/clip00.wav"]
    assert test.files == ["zero/clip02.wav"]
    assert len(train.files) == 7 and not set(train.files) & (set(val.files) | set(test.files))
    assert train.classes == ["one", "zero"]


def test_chunking_long_file_and_padding_short(tmp_path):
    root = tmp_path / "long"
    long = np.random.default_rng(2).uniform(-0.9, 0.9, 2 * 4000 + 1500).astype(np.float32)
    write(str(root / "long.wav"), long, subtype="FLOAT")
    write(str(root / "short.wav"), long[:1000], subtype="FLOAT")
    write(str(root / "third.wav"), long[:4000], subtype="FLOAT")
    ds = AudioFolderDataset(root, "train", sample_len=4000, split_fractions=(1, 0, 0))
    items = {ds.item_source(i): ds[i] for i in range(len(ds))}
    assert sorted(items) == [("long.wav", 0), ("long.wav", 4000), ("long.wav", 8000), ("short.wav", 0),
                             ("third.wav", 0)]
    quantizer = Quantizer()
    for (name, start), item in items.items():
        n = {("long.wav", 8000): 1500, ("short.wav", 0): 1000}.get((name, start), 4000)
        assert item["mask"].sum() == n and item["mask"][:n].all()
        assert torch.equal(item["tokens"][:n], quantizer.encode(long[start:start + n]))
        assert torch.all(item["tokens"][n:] == 128) and torch.all(item["wav"][n:] == 0)
        assert torch.allclose(item["wav"][:n], torch.from_numpy(long[start:start + n]))
        assert item["label"] == -1  # files at the top of the folder have no class


def test_items_carry_wav_mask_label_and_the_quantised_tokens():
    for ds in (BuiltinDataset("val", n_items=3), BuiltinDataset("val", n_items=3, quantizer="linear", bits=4)):
        item = ds[1]
        assert set(item) == {"wav", "mask", "label", "tokens"}
        assert item["tokens"].dtype == torch.long and item["mask"].dtype == torch.bool
        assert item["wav"].dtype == torch.float32 and item["wav"].shape == item["tokens"].shape
        assert torch.equal(item["tokens"], ds.quantizer.encode(item["wav"]))
        assert int(item["tokens"].max()) < ds.quantizer.levels


def test_dataset_for_a_model_config_uses_its_quantiser():
    from sashimi.models.autoregressive import get_config

    config = get_config("tiny", sample_len=512, quantization="linear", bits=4)
    ds = dataset_for(config, "builtin", "val", n_items=2)
    assert ds.sample_len == 512 and ds.quantizer == Quantizer("linear", 4)
    assert int(ds[0]["tokens"].max()) < 16


def test_tiny_folder_splits_by_chunk(tmp_path):
    write(str(tmp_path / "one" / "song.flac"), np.random.default_rng(3).uniform(-0.5, 0.5, 40 * 1000),
          subtype="PCM_16")
    parts = {s: AudioFolderDataset(tmp_path / "one", s, sample_len=1000) for s in ("train", "val", "test")}
    assert all(d.split_unit == "chunk" for d in parts.values())
    starts = {s: [d.item_source(i)[1] for i in range(len(d))] for s, d in parts.items()}
    assert (len(starts["train"]), len(starts["val"]), len(starts["test"])) == (36, 2, 2)
    assert max(starts["train"]) < min(starts["val"]) < max(starts["val"]) < min(starts["test"])


def test_read_failure_replaced_deterministically(tmp_path):
    root = make_folder(str(tmp_path / "r"), n_per_class=4, seconds=0.1)

    def build():
        return AudioFolderDataset(root, "train", sample_len=SR, split_fractions=(1, 0, 0), cache_bytes=0)

    ds, ds2 = build(), build()
    victim = 2
    victim_file = os.path.join(root, ds.item_source(victim)[0])
    with open(victim_file, "wb") as f:  # the file goes bad after the index was built
        f.write(b"\0" * 100)
    with pytest.warns(BadAudioWarning, match="could not read"):
        item = ds[victim]
    assert ds.n_replaced == 1 and ds.item_source(victim)[0] in ds.read_failures
    assert item["mask"].any()
    with pytest.warns(BadAudioWarning):
        assert torch.equal(ds2[victim]["tokens"], item["tokens"])  # the same replacement in another instance
    for i in range(len(ds)):  # an epoch completes
        ds[i]
    assert ds.n_replaced == 2


def test_unchecked_bad_file_is_replaced_not_fatal(tmp_path):
    root = make_folder(str(tmp_path / "u"), n_per_class=3, seconds=0.1)
    bad = sine(seconds=0.1)
    bad[50] = np.inf
    write(os.path.join(root, "up", "zz_inf.wav"), bad, subtype="FLOAT")
    ds = AudioFolderDataset(root, "train", sample_len=SR, split_fractions=(1, 0, 0), check_files=False)
    assert len(ds) == 7 and not ds.skipped  # the header alone looks fine
    with pytest.warns(BadAudioWarning, match="non-finite"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.n_replaced == 1 and ds.read_failures == {"up/zz_inf.wav": "non-finite"}
    assert all(torch.isfinite(item["tokens"].float()).all() for item in items)


def test_waveform_only_items_and_caching_paths_agree(tmp_path):
    root = make_folder(str(tmp_path / "w"), n_per_class=3, seconds=0.2)
    cached = AudioFolderDataset(root, "train", sample_len=2000, split_fractions=(1, 0, 0))
    uncached = AudioFolderDataset(root, "train", sample_len=2000, split_fractions=(1, 0, 0),
                                  cache_bytes=0, check_files=False)
    assert cached._cache and not uncached._cache
    for i in range(len(cached)):
        assert torch.equal(cached[i]["wav"], uncached[i]["wav"]) and torch.equal(cached[i]["tokens"], uncached[i]["tokens"])
    wav_only = AudioFolderDataset(root, "train", sample_len=2000, split_fractions=(1, 0, 0), quantizer=None)
    assert set(wav_only[0]) == {"wav", "mask", "label"}
    assert set(cached[0]) == {"wav", "mask", "label", "tokens"}


def test_default_collate_and_make_dataset(tmp_path):
    root = make_folder(str(tmp_path / "m"), n_per_class=10, seconds=0.1)
    folder = make_dataset(root, "train", sample_len=1024, quantization="linear", n_items=5)
    assert isinstance(folder, AudioFolderDataset) and len(folder) == 5 and folder.quantizer.kind == "linear"
    builtin = make_dataset("builtin", "val", sample_len=4000, n_items=4, seed=3)
    assert isinstance(builtin, BuiltinDataset) and builtin.seed == 3
    for ds in (folder, builtin):
        batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
        assert batch["tokens"].shape == batch["wav"].shape == batch["mask"].shape == (4, ds.sample_len)
        assert batch["label"].shape == (4,) and batch["label"].dtype == torch.long
    with pytest.raises(ValueError, match="split"):
        make_dataset("builtin", "dev")


# ---------------------------------------------------------------------------------------------
# BuiltinDataset
# ---------------------------------------------------------------------------------------------

def test_builtin_shape_classes_and_determinism():
    ds = BuiltinDataset("train", n_items=40)
    assert len(ds) == 40 and ds.num_classes == len(BUILTIN_CLASSES) >= 10
    labels = [ds[i]["label"] for i in range(40)]
    assert sorted(set(labels)) == list(range(10)) and labels.count(0) == 4
    assert {ds.clip_info(i)["timbre_name"] for i in range(40)} == set(ds.timbres)
    item = ds[17]
    assert item["tokens"].shape == (SR,) and item["mask"].all()
    fresh = BuiltinDataset("train", n_items=40)[17]  # no state: rebuilt from (seed, split, index)
    assert all(torch.equal(item[k], fresh[k]) for k in ("tokens", "wav", "mask")) and item["label"] == fresh["label"]
    assert not torch.equal(item["tokens"], BuiltinDataset("train", n_items=40, seed=1)[17]["tokens"])
    assert not torch.equal(item["tokens"], BuiltinDataset("test", n_items=40)[17]["tokens"])
    assert BuiltinDataset("val").n_items == 500 and BuiltinDataset("train").n_items == 10000


def test_builtin_audio_is_sane_and_structured():
    ds = BuiltinDataset("val", n_items=40, quantizer=None)
    wavs = np.stack([ds[i]["wav"].numpy() for i in range(40)])
    assert np.isfinite(wavs).all() and np.abs(wavs).max() <= 0.8 + 1e-3
    assert (np.abs(wavs).max(axis=1) > 0.2).all()  # every clip has a note
    assert (wavs[:, :200] == 0).all()  # a silent start (the motif begins after >= 20 ms)
    # learnable: the codes are far from uniform, and far more predictable from the previous code
    q = Quantizer().encode(wavs).numpy().ravel()
    p = np.bincount(q, minlength=256) / len(q)
    unigram = -(p[p > 0] * np.log2(p[p > 0])).sum()
    joint = np.bincount(q[:-1] * 256 + q[1:], minlength=256 * 256).reshape(256, 256) / (len(q) - 1)
    given_previous = joint / np.maximum(joint.sum(1, keepdims=True), 1e-30)
    conditional = -(joint[joint > 0] * np.log2(given_previous[joint > 0])).sum()
    assert unigram < 7.5 and conditional < 5.0, (unigram, conditional)


def test_builtin_chunks_and_other_rates():
    ds = BuiltinDataset("train", n_items=2, sample_len=4096)
    assert ds.chunks_per_clip == 4 and len(ds) == 8
    assert [int(ds[i]["mask"].sum()) for i in range(4)] == [4096, 4096, 4096, 16000 - 3 * 4096]
    whole = BuiltinDataset("train", n_items=2)[1]["tokens"]
    assert torch.equal(torch.cat([ds[4 + k]["tokens"] for k in range(4)])[:16000], whole)
    slow = BuiltinDataset("train", n_items=2, sample_rate=8000, sample_len=8000)
    assert slow[0]["wav"].shape == (8000,) and slow[0]["wav"].abs().max() > 0.2


def test_builtin_generation_is_fast():
    ds = BuiltinDataset("train", n_items=1000)
    ds[0]
    start = time.process_time()
    for i in range(1, 41):
        ds[i]
    per_item = (time.process_time() - start) / 40
    assert per_item < 0.02, f"{per_item * 1e3:.1f} ms per item"
