"""`sashimi export`: a training checkpoint becomes a model folder that loads with the same outputs."""

import json
import os

import torch

import sashimi
from sashimi.cli import main
from sashimi.models.pretrained import CONFIG_NAME

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
CKPT = os.path.join(FIXTURES, "ar_tiny_format1.pt")


def test_export_uses_the_ema_weights_and_says_so(tmp_path, capsys):
    expected = torch.load(os.path.join(FIXTURES, "ar_tiny_format1_outputs.pt"), weights_only=True)
    out = str(tmp_path / "model")
    assert main(["export", "--ckpt", CKPT, "--out", out]) == 0
    assert "EMA weights" in capsys.readouterr().out
    info = json.load(open(os.path.join(out, CONFIG_NAME)))["info"]
    assert info["weights"] == "ema" and info["step"] == 3 and info["source_checkpoint"] == os.path.abspath(CKPT)
    model = sashimi.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["tokens"]), expected["logits"], rtol=1e-5, atol=1e-5)
    ema = torch.load(CKPT, weights_only=True)["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_export_raw_weights(tmp_path, capsys):
    state = torch.load(CKPT, weights_only=True)
    raw = state["model"]
    out = str(tmp_path / "raw")
    assert main(["export", "--ckpt", CKPT, "--out", out, "--no-ema"]) == 0
    assert "raw weights" in capsys.readouterr().out
    model = sashimi.from_pretrained(out)
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    # a checkpoint without EMA exports its raw weights and says why
    state["ema"] = None
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "last.pt")
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "noema")]) == 0
    assert "raw (no EMA in the checkpoint)" in capsys.readouterr().out
    assert json.load(open(tmp_path / "noema" / CONFIG_NAME))["info"]["weights"] == "raw"


def test_export_errors(tmp_path, capsys):
    assert main(["export", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    assert "sashimi export: error: checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--ckpt", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err
