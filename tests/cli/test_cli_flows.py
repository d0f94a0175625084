"""`sashimi train|reflow|distill|generate` for the flow families: routing by family, the shared loop (init_from,
stages, resume), the listening page, and clear errors for bad input."""

import json

import numpy as np
import pytest
import torch

from sashimi.cli import main
from sashimi.models.flow_config import FlowConfig
from sashimi.models.flow_model import FlowModel
from sashimi.models.rectified_flow import RectifiedFlowModel
from sashimi.training.checkpoint import load_checkpoint
from sashimi.training.loop import TrainConfig, train
from sashimi.training.runtime import read_metrics

SMALL = dict(d_model=8, n_layers=1, pool=(2, 2), d_state=4, d_embed=16, d_sinusoid=8, sample_len=32, sample_rate=8000)
LOOP = ["--batch-size", "2", "--warmup-steps", "1", "--val-every", "2", "--val-batches", "1", "--ckpt-every", "2",
        "--lr", "1e-3", "--no-progress", "--threads", "1"]


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


def test_generate_routes_a_flow_model_to_the_listening_page(saved, capsys):
    out = saved / "samples"
    assert main(["generate", "--ckpt", str(saved / "rf"), "--out", str(out), "--n", "3", "--steps", "2",
                 "--label", "7", "--cfg", "3"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["n_samples"] == 3 and record["real_time_factor"] > 0 and record["settings"]["cfg"] == 3.0
    assert record["throughput"]["real_time_factor"] == record["real_time_factor"]
    assert [s["condition"] for s in record["samples"]] == [7, 7, 7]
    assert (out / "index.html").exists() and (out / "sample_002.wav").exists()
    assert "real time" in capsys.readouterr().out
    loaded = FlowModel.from_pretrained(str(saved / "rf"))
    assert type(loaded).__name__ == "RectifiedFlowModel"


@pytest.mark.parametrize("flags, message", [
    (["--label", "12"], "unknown label 12"),
    (["--label", "3", "--steps", "0"], "steps must be an int >= 1"),
    (["--label", "3", "--n", "0"], "n must be an int >= 1"),
    (["--prompt", "  "], "conditioned by 'label'"),
    (["--label", "3", "--cfg", "-1"], "guidance scale"),
    (["--label", "3", "--top-k", "5"], "apply to autoregressive models"),
    (["--label", "3", "--seconds", "1"], "training length"),
    (["--label", "3", "--method", "ddpm"], "'euler' or 'heun'"),
])
def test_generate_refuses_bad_input(saved, capsys, flags, message):
    assert main(["generate", "--ckpt", str(saved / "rf"), "--out", str(saved / "bad"), *flags]) == 1
    assert message in capsys.readouterr().err


def test_generate_refuses_nan_embedding_and_empty_prompt(saved, capsys, tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.array([[0.0, np.nan, 1.0]], dtype=np.float32))
    assert main(["generate", "--ckpt", str(saved / "user"), "--out", str(tmp_path / "o"),
                 "--embedding", str(path)]) == 1
    assert "NaN" in capsys.readouterr().err
    text = RectifiedFlowModel(FlowConfig(**SMALL, condition="text", text_d_model=8, text_layers=1))
    text.save_pretrained(str(tmp_path / "text"))
    assert main(["generate", "--ckpt", str(tmp_path / "text"), "--out", str(tmp_path / "o"), "--prompt", ""]) == 1
    assert "empty" in capsys.readouterr().err


def test_flow_flags_are_refused_for_other_families(capsys, tmp_path):
    from sashimi.models.registry import build_model

    build_model("tiny").save_pretrained(str(tmp_path / "ar"))
    assert main(["generate", "--ckpt", str(tmp_path / "ar"), "--steps", "4"]) == 1
    assert "--steps apply to rectified-flow and DiffWave models" in capsys.readouterr().err


def test_train_a_flow_preset_then_generate_from_the_run(capsys, tmp_path):
    run = tmp_path / "rf1"
    assert main(["train", "--preset", "rf-tiny", "--data", "builtin", "--out", str(run), "--sample-len", "256",
                 "--max-steps", "2", "--n-train-items", "4", "--n-val-items", "2", *LOOP]) == 0
    assert "MSE/element" in capsys.readouterr().out
    out = tmp_path / "g"
    assert main(["generate", "--ckpt", str(run), "--out", str(out), "--n", "2", "--steps", "1", "--label", "1", "2"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["info"]["step"] == 2 and record["info"]["stage"] == "1-rf"
    assert [s["condition"] for s in record["samples"]] == [1, 2]


def test_reflow_and_distill_train_through_the_loop_and_resume(saved, capsys, tmp_path):
    pairs, rf2 = tmp_path / "pairs", tmp_path / "rf2"
    assert main(["reflow", "--model", str(saved / "rf"), "--pairs-out", str(pairs), "--pairs", "6", "--steps", "2",
                 "--out", str(rf2), "--max-steps", "2", *LOOP]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["1rf"]["S"] >= 0 and report["2rf"]["S"] >= 0 and report["train"]["step"] == 2
    state = load_checkpoint(str(rf2 / "last.pt"))
    assert state["model_config"]["stage"] == "2-rf" and state["model_config"]["timestep_sampler"] == "mix_exp"
    assert state["train_config"]["init_from"] == str(saved / "rf") and state["train_config"]["data"] == str(pairs)
    # the run resumes like any other (its saved settings name the weights, stage and pairs)
    assert main(["train", "--out", str(rf2), "--resume", "--max-steps", "4"]) == 0
    assert load_checkpoint(str(rf2 / "last.pt"))["step"] == 4
    assert [r["step"] for r in read_metrics(str(rf2 / "metrics.jsonl")) if "val_mse" in r] == [2, 4]
    # the same reflow command again reuses its pairs and resumes its run
    assert main(["reflow", "--model", str(saved / "rf"), "--pairs-out", str(pairs), "--pairs", "6", "--steps", "2",
                 "--out", str(rf2), "--max-steps", "6", "--resume", *LOOP]) == 0
    captured = capsys.readouterr()
    assert "reusing the 6 pairs" in captured.err and json.loads(captured.out.splitlines()[-1])["train"]["step"] == 6
    assert main(["reflow", "--model", str(saved / "rf"), "--pairs-out", str(pairs), "--pairs", "5",
                 "--pairs-only"]) == 1
    assert "holds other pairs" in capsys.readouterr().err

    one = tmp_path / "one"
    assert main(["distill", "--model", str(rf2), "--pairs", str(pairs), "--out", str(one), "--max-steps", "2",
                 *LOOP]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train"]["step"] == 2 and "S" in report["distilled"] and "S" in report["teacher"]
    assert load_checkpoint(str(one / "last.pt"))["model_config"]["stage"] == "distilled"
    assert main(["generate", "--ckpt", str(one), "--out", str(tmp_path / "g1"), "--n", "2", "--steps", "1",
                 "--label", "3"]) == 0
    assert main(["distill", "--model", str(rf2), "--pairs", str(tmp_path / "nopairs"), "--out", str(tmp_path / "x")]) == 1
    assert "not a reflow pair folder" in capsys.readouterr().err


def test_init_from_starts_from_the_given_weights(saved, tmp_path):
    """Step 0 of a run with init_from holds exactly the source model's weights, at the requested stage."""
    from sashimi.pipelines.reflow import make_pairs, write_pairs

    source = FlowModel.from_pretrained(str(saved / "rf"))
    write_pairs(str(tmp_path / "pairs"), make_pairs(source, 4, steps=2), source.config.to_dict())
    cfg = TrainConfig(data=str(tmp_path / "pairs"), init_from=str(saved / "rf"), stage="2-rf", out=str(tmp_path / "r"),
                      max_steps=1, batch_size=2, val_batches=1, progress=False, ckpt_every=1, val_every=1)
    state_before = {k: v.clone() for k, v in source.state_dict().items()}
    train(cfg)
    state = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    assert state["preset"] == source.config.name and state["step"] == 1
    moved = [k for k, v in state["model"].items() if not torch.equal(v, state_before[k])]
    assert moved  # trained one step from the source, not from a fresh initialisation
    fresh = RectifiedFlowModel(source.config)
    far = sum(float((state["model"][k] - fresh.state_dict()[k]).abs().sum()) for k in state_before)
    near = sum(float((state["model"][k] - state_before[k]).abs().sum()) for k in state_before)
    assert near < far


@pytest.mark.parametrize("changes, message", [
    (dict(stage="2-rf"), "stage needs init_from"),
    (dict(init_from="/nonexistent/model"), "does not exist"),
])
def test_train_config_refuses_bad_init(changes, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(preset="rf-tiny", out=str(tmp_path / "r"), progress=False, **changes))


def test_stages_need_pairs_and_a_rectified_flow(saved, tmp_path):
    with pytest.raises(ValueError, match="trains on reflow pairs"):
        train(TrainConfig(data="builtin", init_from=str(saved / "rf"), stage="2-rf", out=str(tmp_path / "a"),
                          max_steps=1, progress=False))
    from sashimi.models.diffwave import DiffWaveModel

    DiffWaveModel(FlowConfig(**SMALL, family="diffwave")).save_pretrained(str(tmp_path / "dw"))
    with pytest.raises(ValueError, match="no training stages"):
        train(TrainConfig(data="builtin", init_from=str(tmp_path / "dw"), stage="2-rf", out=str(tmp_path / "b"),
                          max_steps=1, progress=False))
