"""WaveFlow pipeline and CLI: shareable format, vocoding from wav and .npy, unconditional generate, errors."""

import json
import os

import numpy as np
import pytest
import torch

from sashimi.cli import main
from sashimi.data.audio import save_audio
from sashimi.models.waveflow import WaveFlow, WaveFlowConfig
from sashimi.pipelines.waveflow import WaveFlowPipeline, load_waveflow, read_mel_input


def tiny(**kw):
    return WaveFlowConfig(**{"h": 8, "n_flows": 2, "n_layers": 3, "residual_channels": 8, "d_state": 4,
                             "sample_rate": 16000, "hop_length": 64, "n_fft": 256, "win_length": 256, **kw})


def trained_looking(config, seed=0):
    torch.manual_seed(seed)
    model = WaveFlow(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("width_model", ["conv", "s4"])
def test_save_and_load_pretrained_give_the_same_flow(tmp_path, width_model):
    model = trained_looking(tiny(width_model=width_model))
    model.save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["family"] == "waveflow"
    loaded = load_waveflow(str(tmp_path))
    x = 0.3 * torch.randn(2, 512)
    mel = model.mel(x)
    z, logdet = model(x, mel)
    z2, logdet2 = loaded(x, mel)
    assert torch.equal(z, z2) and torch.equal(logdet, logdet2)
    torch.testing.assert_close(loaded.inverse(z, mel), x, rtol=1e-4, atol=1e-5)


def test_vocode_reports_the_exact_likelihood_of_its_output():
    model = trained_looking(tiny())
    mel = model.mel(0.3 * torch.randn(2, 1024))
    pipe = WaveFlowPipeline(model)
    fast = pipe.vocode(mel, temperature=0.8, seed=3)
    plain = pipe.vocode(mel, temperature=0.8, seed=3, fast=False)
    assert fast.audio.shape == (2, 1024) and fast.path == "fast"
    torch.testing.assert_close(fast.audio, plain.audio, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.nats_per_sample, plain.nats_per_sample, rtol=1e-4, atol=1e-4)
    assert fast.real_time_factor > 0


def test_cli_vocode_from_wav_and_npy(tmp_path, capsys):
    model = trained_looking(tiny())
    model.save_pretrained(str(tmp_path / "model"))
    t = np.arange(8000) / 8000
    save_audio(str(tmp_path / "speech.wav"), 0.3 * np.sin(2 * np.pi * 220 * t), 8000)  # resampled to 16 kHz
    mel = model.mel(0.3 * torch.randn(1, 640))[0].numpy()
    np.save(tmp_path / "mels.npy", mel)
    rc = main(["vocode", "--ckpt", str(tmp_path / "model"), "--in", str(tmp_path / "speech.wav"),
               str(tmp_path / "mels.npy"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "resampled" in out
    for name, samples in (("speech", 16000), ("mels", 640)):
        record = json.load(open(tmp_path / "out" / name / "samples.json"))
        assert record["throughput"]["generated_samples"] == samples
        assert os.path.isfile(tmp_path / "out" / name / "index.html")


def test_cli_vocode_errors_name_the_expected_mel(tmp_path, capsys):
    model = trained_looking(tiny())
    model.save_pretrained(str(tmp_path / "model"))
    np.save(tmp_path / "bad.npy", np.zeros((10, 80), np.float32))
    rc = main(["vocode", "--ckpt", str(tmp_path / "model"), "--in", str(tmp_path / "bad.npy"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "transposed" in err and "hop 64" in err and "16000 Hz" in err
    with pytest.raises(ValueError, match="n_mels=80"):
        read_mel_input(str(tmp_path / "bad.npy"), model)


def test_cli_generate_for_an_unconditional_flow(tmp_path, capsys):
    model = trained_looking(tiny(condition="none"))
    model.save_pretrained(str(tmp_path / "model"))
    rc = main(["generate", "--ckpt", str(tmp_path / "model"), "--n", "2", "--seconds", "0.05",
               "--out", str(tmp_path / "samples")])
    assert rc == 0, capsys.readouterr()
    record = json.load(open(tmp_path / "samples" / "samples.json"))
    assert len(record["samples"]) == 2 and record["throughput"]["generated_samples"] == 2 * 800
    rc = main(["vocode", "--ckpt", str(tmp_path / "model"), "--in", "x.wav", "--out", str(tmp_path)])
    assert rc == 1 and "unconditional" in capsys.readouterr().err


def test_train_eval_and_vocode_through_the_shared_loop(tmp_path, capsys):
    run = str(tmp_path / "run")
    rc = main(["train", "--data", "builtin", "--preset", "waveflow-tiny", "--out", run, "--max-steps", "3",
               "--batch-size", "2", "--sample-len", "1024", "--n-train-items", "4", "--n-val-items", "2",
               "--val-every", "3", "--warmup-steps", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rc = main(["eval", "--ckpt", run, "--data", "builtin", "--n-items", "2", "--batch-size", "2",
               "--json", str(tmp_path / "test.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.load(open(tmp_path / "test.json"))
    assert "nats/sample" in out and result["n_samples"] > 0 and np.isfinite(result["nll_nats_per_sample"])
    again = main(["eval", "--ckpt", run, "--data", "builtin", "--n-items", "2", "--batch-size", "2",
                  "--json", str(tmp_path / "again.json"), "--no-progress"])
    assert again == 0 and json.load(open(tmp_path / "again.json"))["nll_nats_per_sample"] == result["nll_nats_per_sample"]
    model = load_waveflow(run)
    np.save(tmp_path / "mel.npy", model.mel(0.1 * torch.randn(1, 2048))[0].numpy())
    assert main(["vocode", "--ckpt", run, "--in", str(tmp_path / "mel.npy"), "--out", str(tmp_path / "voc")]) == 0
