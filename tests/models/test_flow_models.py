"""FlowModel / FlowUNet: shapes, parameter counts, conditions and their errors, guidance with the real network, pairs."""

import math

import pytest
import torch

from sashimi.models import diffwave, rectified_flow
from sashimi.models.flow_config import FlowConfig
from sashimi.models.flow_model import FlowModel
from sashimi.objectives.diffwave import diffwave_objective
from sashimi.objectives.rectified_flow import rectified_flow_objective
from sashimi.pipelines.flow_sampling import sample_diffusion, sample_flow, straightness
from sashimi.pipelines.reflow import ReflowPairs, make_pairs, pair_noise, write_pairs
from sashimi.schedulers.guidance import guided_output

SMALL = dict(d_model=8, n_layers=1, pool=(2, 2), d_state=4, d_embed=16, d_sinusoid=8, sample_len=32,
             text_d_model=16, text_layers=1)


def _perturbed(model):
    """Random output layer (it starts at zero) so that outputs depend on the inputs."""
    torch.manual_seed(1)
    for p in model.net.head[-1].parameters():
        p.data.normal_(0, 0.3)
    return model.eval()


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_preset_sizes():
    # the SaShiMi paper's SC09 DiffWave U-Net (d_model 128, n_layers 6): 23.48M here, 23.0M quoted
    assert abs(_count(diffwave.build("diffwave-sc09")) / 1e6 - 23.48) < 0.01
    assert _count(rectified_flow.build("rf-wave-5m")) <= 6_000_000
    assert all("tiny" in n for n in rectified_flow.PRESETS if _count(rectified_flow.build(n)) < 200_000
               and rectified_flow.PRESETS[n].space == "waveform")


@pytest.mark.parametrize("module, family, other", [(diffwave, "diffwave", rectified_flow),
                                                   (rectified_flow, "rectified_flow", diffwave)])
def test_family_build_presets_dicts_and_errors(module, family, other):
    from sashimi.models.registry import build_model, get_family

    assert get_family(family).model_cls is module.build().__class__ and module.build.__name__ == "build"
    model = module.build({**module.PRESETS[min(module.PRESETS)].to_dict(), **SMALL})  # a saved config.json
    assert type(model) is type(build_model(model.config.to_dict())) and model.config.d_model == 8
    assert module.build(model.config, d_model=4).config.d_model == 4
    with pytest.raises(ValueError, match="unknown .* preset 'nope'; expected one of"):
        module.build("nope")
    with pytest.raises(ValueError, match=f"a {other.PRESETS[min(other.PRESETS)].family!r} config is not a"):
        module.build(other.PRESETS[min(other.PRESETS)])


def test_untrained_network_predicts_zero_and_shapes():
    model = FlowModel(FlowConfig(**SMALL))
    x = torch.randn(3, 32, 1)
    out = model(x, torch.rand(3), model.condition(labels=[1, 2, 3]))
    assert out.shape == x.shape and float(out.detach().abs().max()) == 0.0
    with pytest.raises(ValueError, match="multiple of prod"):
        model(torch.randn(3, 30, 1), torch.rand(3))
    with pytest.raises(ValueError, match="one time per batch"):
        model(x, torch.rand(2))


def test_network_is_non_causal_and_time_dependent():
    model = _perturbed(FlowModel(FlowConfig(**SMALL, condition="none")))
    x = torch.randn(1, 32, 1)
    y = model(x, torch.tensor([0.3]))
    x2 = x.clone()
    x2[0, -1] += 1.0
    assert not torch.allclose(model(x2, torch.tensor([0.3]))[0, 0], y[0, 0])  # the first output sees the last input
    assert not torch.allclose(model(x, torch.tensor([0.7])), y)


def test_condition_errors():
    labels = FlowModel(FlowConfig(**SMALL, n_classes=10))
    with pytest.raises(ValueError, match="unknown label 12"):
        labels.condition(labels=[12])
    with pytest.raises(ValueError, match="unknown label -1"):
        labels.condition(labels=[-1])
    with pytest.raises(ValueError, match="unknown label 10"):  # the null id is not a user label
        labels.condition(labels=[10])
    with pytest.raises(ValueError, match="pass labels="):
        labels.condition(prompts=["x"])
    text = FlowModel(FlowConfig(**SMALL, condition="text"))
    with pytest.raises(ValueError, match="empty"):
        text.condition(prompts=["  "])
    assert text.condition(prompts=["bell motif 3", "pluck"]).shape == (2, 16)
    user = FlowModel(FlowConfig(**SMALL, condition="embedding", d_condition=5))
    with pytest.raises(ValueError, match="NaN"):
        user.condition(embedding=torch.tensor([[0.0, float("nan"), 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"shape \(batch, 5\)"):
        user.condition(embedding=torch.zeros(1, 4))
    none = FlowModel(FlowConfig(**SMALL, condition="none"))
    with pytest.raises(ValueError, match="unconditional"):
        none.condition(labels=[1])
    with pytest.raises(ValueError, match="family"):
        FlowConfig(family="gan")


def test_guidance_limits_with_the_network():
    model = _perturbed(FlowModel(FlowConfig(**SMALL)))
    x, t = torch.randn(2, 32, 1), torch.rand(2)
    cond, null = model.condition(labels=[3, 4]), model.null_condition(2)
    with torch.no_grad():
        torch.testing.assert_close(guided_output(model, x, t, cond, null, 1.0, batched=True), model(x, t, cond))
        torch.testing.assert_close(guided_output(model, x, t, cond, null, 0.0, batched=True), model(x, t, null))


def test_objectives_and_samplers_run_on_batches():
    cfg = FlowConfig(**SMALL)
    model = FlowModel(cfg)
    batch = {"wav": 0.1 * torch.randn(4, 32), "mask": torch.ones(4, 32, dtype=torch.bool),
             "label": torch.tensor([0, -1, 5, 9])}
    loss, count, metrics = rectified_flow_objective(model, batch, immiscible=True)
    loss.backward()
    assert count == 4 * 32 and math.isfinite(float(metrics["mse"]))
    assert model.net.head[-1].weight.grad.abs().sum() > 0
    dmodel = FlowModel(cfg.replace(family="diffwave", T=20))
    loss, count, _ = diffwave_objective(dmodel, batch)
    assert math.isfinite(float(loss))
    noise = torch.randn(2, 32, 1)
    cond, null = dmodel.condition(labels=[1, 2]), dmodel.null_condition(2)
    for method, steps in (("ddpm", None), ("ddim", 10)):
        out = sample_diffusion(_perturbed(dmodel), noise, dmodel.diffusion_schedule(), cond, null, method, steps, cfg=2.0)
        assert out.shape == noise.shape and bool(torch.isfinite(out).all())
    model = _perturbed(model)
    assert sample_flow(model, noise, cond, null, steps=3, method="heun", cfg=3.0).shape == noise.shape
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sample_flow(model, noise, cond, null, steps=0)
    S = straightness(model, noise, cond, steps=4)
    assert S["S"] >= 0


def test_pipeline_generates_and_refuses_bad_requests():
    from sashimi.pipelines.flow_generate import FlowPipeline

    pipe = FlowPipeline(_perturbed(FlowModel(FlowConfig(**SMALL))))
    result = pipe(3, labels=[7], steps=2, cfg=3.0)
    assert result.audio.shape == (3, 32) and result.conditions == [7, 7, 7] and result.real_time_factor > 0
    assert float(result.audio.abs().max()) <= 1.0
    for bad, match in ((dict(labels=[11]), "unknown label 11"), (dict(prompts=["x"]), "pass labels="),
                       (dict(labels=[1], steps=0), "steps must be an int >= 1"),
                       (dict(labels=[1], n=0), "number of samples"), (dict(), "give --label"),
                       (dict(labels=[1], method="ddpm"), "'euler' or 'heun'")):
        with pytest.raises(ValueError, match=match):
            pipe(**{"n": 1, **bad})
    dpipe = FlowPipeline(_perturbed(FlowModel(FlowConfig(**SMALL, family="diffwave"))))
    assert dpipe(2, labels=[1, 2], method="ddim", steps=5).audio.shape == (2, 32)


def test_reflow_pair_folder_round_trip(tmp_path):
    model = _perturbed(FlowModel(FlowConfig(**SMALL)))
    pairs = make_pairs(model, 5, seed=7, steps=3, labels=[2, 3], batch_size=2)
    write_pairs(str(tmp_path), pairs, model.config.to_dict())
    data = ReflowPairs(str(tmp_path))
    assert len(data) == 5
    item = data[3]
    torch.testing.assert_close(item["noise"], pair_noise(10, (32, 1)))
    assert int(item["label"]) == 3
    x1 = sample_flow(model, item["noise"][None], model.condition(labels=[3]), steps=3)
    torch.testing.assert_close(item["x1"], x1[0])
    with pytest.raises(ValueError, match="cfg > 1"):
        make_pairs(model, 2, anchored=True, cfg=1.0)


def test_anchored_pairs_stay_closer_to_the_unguided_trajectory():
    model = _perturbed(FlowModel(FlowConfig(**SMALL)))
    plain = make_pairs(model, 4, seed=0, steps=4, cfg=4.0, labels=[1])
    anchored = make_pairs(model, 4, seed=0, steps=4, cfg=4.0, labels=[1], anchored=True, anchor_steps=20,
                          anchor_lr=0.5)
    reference = make_pairs(model, 4, seed=0, steps=4, cfg=1.0, labels=[1])["samples"]
    d_plain = float((plain["samples"] - reference).square().mean())
    d_anchored = float((anchored["samples"] - reference).square().mean())
    assert d_anchored < d_plain
    assert anchored["info"]["anchor_iterations"] > 0


def test_mel_space_encodes_frames_and_decodes_through_a_vocoder():
    try:
        import sashimi.nn.mel  # noqa: F401
    except ImportError:
        from conftest import skip_unless_ci

        skip_unless_ci("sashimi.nn.mel (LogMel, shipped with the WaveFlow vocoder)")
    from sashimi.pipelines.flow_generate import FlowPipeline

    cfg = FlowConfig(**{**SMALL, "sample_len": 1024}, space="mel", n_mels=16, hop_length=64, n_fft=256)
    model = FlowModel(cfg)
    batch = {"wav": 0.1 * torch.randn(2, 1024), "mask": torch.ones(2, 1024, dtype=torch.bool),
             "label": torch.tensor([1, 2])}
    x1, mask = model.encode_batch(batch)
    assert x1.shape == (2, 16, 16) and mask is None
    loss, count, _ = rectified_flow_objective(model, batch)
    assert int(count) == 2 * 1024 and math.isfinite(float(loss))  # mean error over frames x bins, weighted by samples

    class Vocoder:
        config = type("C", (), {"n_mels": 16})

        def sample(self, mel):
            assert mel.shape == (2, 16, 16)
            return torch.zeros(mel.shape[0], mel.shape[-1] * 64)

    assert FlowPipeline(model, Vocoder())(2, labels=[3], steps=1).audio.shape == (2, 1024)
    with pytest.raises(ValueError, match="vocoder"):
        FlowPipeline(model)
