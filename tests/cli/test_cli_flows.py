"""sashimi train-flow / reflow / distill / generate-flow on a tiny saved model: outputs and clear errors."""

import json

import numpy as np
import pytest
import torch

from sashimi.cli import main
from sashimi.models.flow_config import FlowConfig
from sashimi.models.flow_model import FlowModel
from sashimi.models.rectified_flow import RectifiedFlowModel

SMALL = dict(d_model=8, n_layers=1, pool=(2, 2), d_state=4, d_embed=16, d_sinusoid=8, sample_len=32, sample_rate=8000)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows")
    torch.manual_seed(0)
    model = RectifiedFlowModel(FlowConfig(**SMALL))
    for p in model.net.head[-1].parameters():
        p.data.normal_(0, 0.3)
    model.save_pretrained(str(root / "rf"))
    user = RectifiedFlowModel(FlowConfig(**SMALL, condition="embedding", d_condition=3))
    user.save_pretrained(str(root / "user"))
    return root


def test_generate_writes_the_listening_page(saved, capsys):
    out = saved / "samples"
    assert main(["generate-flow", "--model", str(saved / "rf"), "--out", str(out), "--n", "3", "--steps", "2",
                 "--label", "7", "--cfg", "3"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["n_samples"] == 3 and record["real_time_factor"] > 0 and record["settings"]["cfg"] == 3.0
    assert [s["condition"] for s in record["samples"]] == [7, 7, 7]
    assert (out / "index.html").exists() and (out / "sample_002.wav").exists()
    loaded = FlowModel.from_pretrained(str(saved / "rf"))
    assert type(loaded).__name__ == "RectifiedFlowModel"


@pytest.mark.parametrize("flags, message", [
    (["--label", "12"], "unknown label 12"),
    (["--label", "3", "--steps", "0"], "steps must be an int >= 1"),
    (["--label", "3", "--n", "0"], "--n must be >= 1"),
    (["--prompt", "  "], "conditioned by 'label'"),
    (["--label", "3", "--cfg", "-1"], "guidance scale"),
])
def test_generate_refuses_bad_input(saved, capsys, flags, message):
    assert main(["generate-flow", "--model", str(saved / "rf"), "--out", str(saved / "bad"), *flags]) == 1
    assert message in capsys.readouterr().err


def test_generate_refuses_nan_embedding_and_empty_prompt(saved, capsys, tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.array([[0.0, np.nan, 1.0]], dtype=np.float32))
    assert main(["generate-flow", "--model", str(saved / "user"), "--out", str(tmp_path / "o"),
                 "--embedding", str(path)]) == 1
    assert "NaN" in capsys.readouterr().err
    text = RectifiedFlowModel(FlowConfig(**SMALL, condition="text", text_d_model=8, text_layers=1))
    text.save_pretrained(str(tmp_path / "text"))
    assert main(["generate-flow", "--model", str(tmp_path / "text"), "--out", str(tmp_path / "o"),
                 "--prompt", ""]) == 1
    assert "empty" in capsys.readouterr().err


def test_reflow_and_distill_report_straightness(saved, capsys, tmp_path):
    assert main(["reflow", "--model", str(saved / "rf"), "--pairs-out", str(tmp_path / "pairs"), "--pairs", "4",
                 "--steps", "2", "--out", str(tmp_path / "rf2"), "--train-steps", "2", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["1rf"]["S"] >= 0 and report["2rf"]["S"] >= 0 and report["train"]["stage"] == "2-rf"
    assert json.loads((tmp_path / "rf2" / "config.json").read_text())["config"]["timestep_sampler"] == "mix_exp"
    assert main(["distill", "--model", str(tmp_path / "rf2"), "--pairs", str(tmp_path / "pairs"),
                 "--out", str(tmp_path / "one"), "--train-steps", "2", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train"]["stage"] == "distilled" and "S" in report["distilled"]
    assert main(["distill", "--model", str(tmp_path / "rf2"), "--pairs", str(tmp_path / "nopairs"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "not a reflow pair folder" in capsys.readouterr().err
