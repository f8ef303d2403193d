"""The U-Net: the paper's sizes, the I/O contract, and properties export relies on."""

from __future__ import annotations

import json

import pytest
import torch

from training.config import PRESETS, ModelConfig, preset
from training.unet import AttnBlock, ResBlock, UNet, count_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = ModelConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), dropout=0.1, num_groups=4)


def _count_on_meta(config: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return count_parameters(UNet(config))


def test_cifar10_has_the_papers_35_7m_parameters():
    assert abs(_count_on_meta(preset("cifar10")[0]) - 35.7e6) <= 0.1e6


def test_celebahq256_has_the_papers_114m_parameters():
    assert abs(_count_on_meta(preset("celebahq256")[0]) - 114e6) <= 0.5e6


def test_presets_build_and_have_the_papers_layout():
    cifar, celeba = preset("cifar10")[0], preset("celebahq256")[0]
    assert (cifar.ch, cifar.ch_mult, cifar.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (cifar.attn_resolutions, cifar.dropout, cifar.num_groups) == ((16,), 0.1, 32)
    assert (celeba.image_size, celeba.ch_mult, celeba.dropout) == (256, (1, 1, 2, 2, 4, 4), 0.0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("imagenet")
    assert set(PRESETS) == {"digits", "cifar10", "celebahq256"}


def test_forward_contract_and_zero_init():
    model = UNet(TINY).eval()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.0, 500.0, 999.0])
    eps = model(x, t)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    # The output conv starts at zero (as the reference), so the untrained net predicts 0.
    assert torch.count_nonzero(eps) == 0
    # Every residual branch starts as the identity: its last layer is zero.
    for m in model.modules():
        if isinstance(m, ResBlock):
            assert torch.count_nonzero(m.conv2.weight) == 0
        if isinstance(m, AttnBlock):
            assert torch.count_nonzero(m.proj_out.weight) == 0


def _trained_like(config: ModelConfig, seed: int = 0) -> UNet:
    """A net with every weight random (zero-init layers too), so outputs depend on all paths."""
    torch.manual_seed(seed)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_output_depends_on_t_and_on_x():
    model = _trained_like(TINY)
    x = torch.randn(2, 1, 8, 8)
    base = model(x, torch.tensor([10.0, 10.0]))
    assert not torch.allclose(base, model(x, torch.tensor([900.0, 900.0])))
    assert not torch.allclose(base, model(x + 0.1, torch.tensor([10.0, 10.0])))
    # Float (non-integer) t is accepted: the embedding is computed from the float input.
    assert torch.isfinite(model(x, torch.tensor([10.5, 3.25]))).all()


def test_samples_do_not_see_each_other():
    # GroupNorm and attention act per sample, so image k's eps is the same in any batch.
    model = _trained_like(TINY)
    x = torch.randn(5, 1, 8, 8)
    t = torch.tensor([1.0, 200.0, 400.0, 600.0, 999.0])
    together = model(x, t)
    alone = torch.cat([model(x[k:k + 1], t[k:k + 1]) for k in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    model = _trained_like(TINY).train()
    loss = model(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_config_round_trips_through_json():
    for model_config, train_config in PRESETS.values():
        d = json.loads(json.dumps(model_config.to_dict()))
        assert isinstance(d["ch_mult"], list)
        assert ModelConfig.from_dict(d) == model_config
        assert type(train_config).from_dict(json.loads(json.dumps(train_config.to_dict()))) \
            == train_config


@pytest.mark.parametrize("changes,match", [
    ({"num_groups": 5}, "num_groups"),
    ({"image_size": 6, "ch_mult": (1, 2, 2)}, "halved"),
    ({"dropout": 1.0}, "dropout"),
    ({"ch": 0}, "ch"),
    ({"ch_mult": ()}, "ch_mult"),
])
def test_invalid_model_configs_are_refused(changes, match):
    d = TINY.to_dict() | changes
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(d)


def test_unknown_config_fields_are_refused():
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.from_dict(TINY.to_dict() | {"channels": 3})
