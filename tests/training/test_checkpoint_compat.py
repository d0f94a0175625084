"""Training checkpoints written by earlier releases (format 1) still load and give the same outputs."""

import os

import torch

from sashimi.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def test_format1_checkpoint_loads_with_the_same_outputs():
    ckpt = load_checkpoint(os.path.join(FIXTURES, "ar_tiny_format1.pt"))
    assert ckpt["format_version"] == 1 <= CHECKPOINT_FORMAT
    expected = torch.load(os.path.join(FIXTURES, "ar_tiny_format1_outputs.pt"), weights_only=True)
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        logits = model(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_format1_config_describes_the_same_model_as_today():
    """Fields added since (family, block_norm) take their defaults: resuming does not see a different model."""
    from sashimi.models.autoregressive import ModelConfig
    from sashimi.training.checkpoint import config_diff

    saved = load_checkpoint(os.path.join(FIXTURES, "ar_tiny_format1.pt"))["model_config"]
    assert "family" not in saved and "block_norm" not in saved
    today = ModelConfig.from_dict(saved)
    assert today.family == "autoregressive" and today.block_norm == "layer"
    assert config_diff(saved, today.to_dict()) == []
    assert config_diff(saved, today.replace(d_model=8).to_dict()) == ["d_model: checkpoint 4 vs requested 8"]
