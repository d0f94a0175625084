"""Tests of the evaluation classifier, `sashimi.metrics.score` and the `sashimi metrics` CLI on small made-up audio."""

import json
import os

import numpy as np
import pytest
import torch

from sashimi.data.audio import save_audio
from sashimi.cli import main
from sashimi.metrics import ClassifierConfig, EvalClassifier, ScoreInputError, score, train_classifier
from sashimi.metrics.score import mel_frame_features

RATE, CLIP = 8000, 2000  # small clips keep the tests fast


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = EvalClassifier(ClassifierConfig(classes=("a", "b", "c"), sample_rate=RATE, clip_samples=CLIP, n_fft=256,
                                            win_length=256, hop_length=64, n_mels=16, channels=(4, 8),
                                            embedding_dim=8))
    folder = str(tmp_path_factory.mktemp("classifier"))
    model.eval().save_pretrained(folder)
    return folder


def tones(n, rate=RATE, length=CLIP, seed=0, shift=1.0):
    rng = np.random.default_rng(seed)
    t = np.arange(length) / rate
    f = rng.uniform(200, 1200, size=(n, 1)) * shift
    return (0.5 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal((n, length))).astype(np.float32)


def write_folder(folder, clips, rate=RATE):
    os.makedirs(folder, exist_ok=True)
    for i, clip in enumerate(clips):
        save_audio(os.path.join(folder, f"clip_{i:03d}.wav"), clip, rate)
    return str(folder)


def test_save_and_load_give_the_same_outputs(classifier_dir):
    model = EvalClassifier.from_pretrained(classifier_dir)
    again = EvalClassifier.from_pretrained(classifier_dir)
    wav = torch.from_numpy(tones(5))
    feats, probs = model.features_and_probabilities(wav)
    assert feats.shape == (5, 8) and probs.shape == (5, 3)
    torch.testing.assert_close(again.features_and_probabilities(wav)[1], probs, rtol=0, atol=0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5, dtype=probs.dtype))
    assert "log_mel.filters" not in model.network_state()


def test_not_a_classifier_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        EvalClassifier.from_pretrained(str(tmp_path))


def test_identical_sets_score_zero_distances(classifier_dir):
    wav = tones(40)
    s = score(classifier_dir, real=wav, fake=wav)
    assert abs(s["fid"]) < 1e-6 and abs(s["mel_fd"]) < 1e-6
    assert s["ndb"] == 0 and s["is"] == pytest.approx(s["real_is"])
    assert s["n_real"] == s["n_fake"] == 40
    json.dumps(s)  # JSON-able


def test_mel_fd_separates_shifted_tones(classifier_dir):
    real, same, shifted = tones(40, seed=0), tones(40, seed=1), tones(40, seed=2, shift=3.0)
    near, far = (score(classifier_dir, real, fake)["mel_fd"] for fake in (same, shifted))
    assert far > 2 * near


def test_mel_frame_features_are_frames_by_bands():
    feats = mel_frame_features(torch.from_numpy(tones(3, rate=16000, length=4096)), 16000)
    assert feats.shape == (3 * 16, 64) and feats.dtype == np.float64


def test_folders_and_resampling_are_reported(classifier_dir, tmp_path):
    real = write_folder(tmp_path / "real", tones(12, seed=0))
    fake = write_folder(tmp_path / "fake", tones(12, rate=16000, length=2 * CLIP, seed=1), rate=16000)
    s = score(classifier_dir, real, fake)
    assert s["n_fake"] == 12
    assert any("resampled 12 file(s) from 16000 Hz to the classifier's 8000 Hz" in n for n in s["notes"])
    in_memory = score(classifier_dir, real, (torch.from_numpy(tones(12, rate=16000, length=2 * CLIP, seed=1)), 16000))
    assert any("from 16000 Hz" in n for n in in_memory["notes"])
    assert in_memory["fid"] == pytest.approx(s["fid"], rel=1e-2, abs=1e-3)  # only the 16-bit WAV rounding differs


def test_bad_inputs(classifier_dir, tmp_path):
    good = tones(10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoreInputError, match="holds no audio files"):
        score(classifier_dir, good, str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"bad_{i}.wav").write_bytes(b"not audio at all")
    with pytest.raises(ScoreInputError, match="none of its 3 audio files could be read"):
        score(classifier_dir, good, str(broken))
    write_folder(broken, tones(4))
    assert any("skipped 3 of 7 unreadable" in n for n in score(classifier_dir, good, str(broken))["notes"])
    with pytest.raises(ScoreInputError, match="at least 2 clips"):
        score(classifier_dir, good, good[:1])
    with pytest.raises(ScoreInputError, match="empty"):
        score(classifier_dir, good, np.zeros((0, CLIP), np.float32))
    with pytest.raises(ScoreInputError, match="not a folder"):
        score(classifier_dir, good, str(tmp_path / "missing"))
    with pytest.raises(ScoreInputError, match="NaN"):
        score(classifier_dir, good, np.full((3, CLIP), np.nan, np.float32))


def test_cli_score_writes_json_and_fails_cleanly(classifier_dir, tmp_path, capsys):
    real = write_folder(tmp_path / "real", tones(10, seed=0))
    fake = write_folder(tmp_path / "fake", tones(10, seed=1))
    out = tmp_path / "scores.json"
    assert main(["metrics", "score", "--classifier", classifier_dir, "--real", real, "--fake", fake,
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "lower is better" in printed
    assert set(json.loads(out.read_text())) >= {"fid", "is", "mis", "am", "ndb", "mel_fd"}
    (tmp_path / "nothing").mkdir()
    assert main(["metrics", "score", "--classifier", classifier_dir, "--real", real,
                 "--fake", str(tmp_path / "nothing")]) == 1
    assert "holds no audio files" in capsys.readouterr().err


def test_train_classifier_on_a_labelled_folder(tmp_path):
    """Two classes a CNN separates at once (low vs high tones); the held-out accuracy lands in config.json."""
    rng = np.random.default_rng(0)
    t = np.arange(CLIP) / RATE
    for name, (lo, hi) in (("low", (150, 300)), ("high", (1500, 3000))):
        clips = [0.5 * np.sin(2 * np.pi * rng.uniform(lo, hi) * t).astype(np.float32) for _ in range(40)]
        write_folder(tmp_path / "data" / name, clips)
    logs = []
    result = train_classifier(str(tmp_path / "data"), str(tmp_path / "cls"), sample_rate=RATE, clip_samples=CLIP,
                              epochs=4, batch_size=16, log=logs.append)
    assert result["test_accuracy"] >= 0.9 and result["n_test"] > 0
    saved = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert saved["classes"] == ["high", "low"] and saved["evaluation"]["test_accuracy"] == result["test_accuracy"]
    assert any("held-out" in line for line in logs)


def test_train_classifier_needs_classes(tmp_path):
    write_folder(tmp_path / "flat", tones(30))
    with pytest.raises(ValueError, match="at least 2 sub-folders"):
        train_classifier(str(tmp_path / "flat"), None, sample_rate=RATE, clip_samples=CLIP, epochs=1)


def test_cli_generate_score_adds_scores_and_real_clips(tmp_path, capsys):
    """`sashimi generate --score CLS`: scores in samples.json and on the page, real clips beside the samples."""
    from sashimi.training.loop import TrainConfig, train

    run = str(tmp_path / "run")
    train(TrainConfig(data="builtin", preset="tiny", out=run, sample_len=256, batch_size=2, max_steps=2,
                      n_train_items=2, n_val_items=1, val_batches=1, warmup_steps=1, progress=False))
    torch.manual_seed(0)
    cls = str(tmp_path / "cls")
    EvalClassifier(ClassifierConfig(classes=("a", "b"), sample_rate=16000, clip_samples=800, n_fft=256,
                                    win_length=256, hop_length=64, n_mels=16, channels=(4,),
                                    embedding_dim=4)).save_pretrained(cls)
    real = write_folder(tmp_path / "real", tones(6, rate=16000, length=800), rate=16000)
    out = str(tmp_path / "samples")
    assert main(["generate", "--ckpt", run, "--n", "3", "--seconds", "0.05", "--out", out, "--no-progress",
                 "--score", cls, "--score-real", real, "--real-clips", "2"]) == 0
    assert "FID" in capsys.readouterr().out
    record = json.loads(open(os.path.join(out, "samples.json")).read())
    assert record["scores"]["n_fake"] == 3 and record["scores"]["n_real"] == 6
    page = open(os.path.join(out, "index.html")).read()
    assert "Sample quality" in page and "real_001.wav" in page
    assert os.path.isfile(os.path.join(out, "real_001.wav")) and os.path.isfile(os.path.join(out, "real_001.png"))
    assert main(["generate", "--ckpt", run, "--n", "1", "--seconds", "0.02", "--out", out, "--no-progress",
                 "--score", str(tmp_path / "nothing")]) == 1
    assert "not an evaluation classifier folder" in capsys.readouterr().err


def test_cli_demo_scores_its_samples(tmp_path, capsys, monkeypatch):
    """The demo with a classifier: scores, real clips and the NLL gap on the page and in the printout."""
    import sashimi.demo

    monkeypatch.setattr(sashimi.demo, "DEMO_TRAIN", {**sashimi.demo.DEMO_TRAIN, "sample_len": 256, "n_val_items": 1})
    monkeypatch.setattr(sashimi.demo, "DEMO_TEST_CLIPS", 1)
    torch.manual_seed(0)
    cls = str(tmp_path / "cls")
    EvalClassifier(ClassifierConfig(classes=("a", "b"), sample_rate=16000, clip_samples=800, n_fft=256,
                                    win_length=256, hop_length=64, n_mels=16, channels=(4,),
                                    embedding_dim=4)).save_pretrained(cls)
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--minutes", "0.01", "--n", "3", "--seconds", "0.05", "--no-progress",
                 "--classifier", cls]) == 0
    printed = capsys.readouterr().out
    assert "from the test NLL" in printed and "FID" in printed
    record = json.loads(open(os.path.join(out, "samples", "samples.json")).read())
    assert record["scores"]["n_fake"] == 3 and "nll_gap_bits_per_sample" in record["info"]
    page = open(os.path.join(out, "samples", "index.html")).read()
    assert "Real clips" in page and "real_003.wav" in page and "Sample quality" in page
    assert main(["demo", "--out", out, "--n", "2", "--seconds", "0.05", "--no-progress",
                 "--classifier", str(tmp_path / "none")]) == 1
    assert "not an evaluation classifier folder" in capsys.readouterr().err


def test_listening_page_spectrogram_of_silence(tmp_path):
    """A silent clip (the builtin data's leading silence, a model that outputs zeros) still gets a picture."""
    from sashimi.pipelines.report import spectrogram_png

    spectrogram_png(str(tmp_path / "silence.png"), np.zeros(4000, np.float32), 16000)
    assert (tmp_path / "silence.png").stat().st_size > 0


@pytest.mark.filterwarnings("error")
def test_listening_page_of_silent_stretches_warns_nothing(tmp_path):
    """Silence (a whole clip, or stretches of one) has zero power: the spectrogram floors it instead of log10(0)."""
    from sashimi.pipelines.generate import GenerationResult
    from sashimi.pipelines.report import SPECTROGRAM_FLOOR_DB, write_report

    t = torch.arange(4000) / 16000
    half = torch.where(t < 0.125, torch.sin(2 * np.pi * 440 * t), torch.zeros(()))
    audio = torch.stack([torch.zeros(4000), half, torch.zeros(4000)]).float()
    audio[2, :600] = 0.5 * torch.sin(2 * np.pi * 100 * t[:600])  # a tone ending in digital silence
    n = audio.shape[0]
    result = GenerationResult(audio=audio, tokens=torch.zeros(n, 4000, dtype=torch.long),
                              logprobs=torch.zeros(n, 4000, dtype=torch.float64),
                              prefix_logprobs=torch.zeros(n, 0, dtype=torch.float64), prefix_len=0,
                              sample_rate=16000, seconds=1.0, path="eager")
    paths = write_report(str(tmp_path / "page"), result)
    assert len(paths["pngs"]) == 3 and all(os.path.getsize(p) > 0 for p in paths["pngs"])
    assert SPECTROGRAM_FLOOR_DB < -120  # below the colour scale of an audible clip
