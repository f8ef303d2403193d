"""Export-time rewrites are exact: the rewritten module computes the original's function."""

from __future__ import annotations

import onnx
import pytest
import torch

from export.rewrites import BatchNormAffineGroupNorm, TransposedUpsample, deploy_form
from tests.conftest import randomized_unet, tiny_model_config
from training.unet import Upsample


@pytest.mark.parametrize("channels, size", [(3, 1), (4, 2), (8, 5), (16, 8)])
def test_transposed_upsample_equals_nearest_then_conv(channels, size):
    """In float64 the two forms differ only by summation order: ~1e-15, not ~1e-7."""
    torch.manual_seed(size)
    up = Upsample(channels).double()
    with torch.no_grad():
        up.conv.weight.normal_()
        up.conv.bias.normal_()
    x = torch.randn(3, channels, size, size, dtype=torch.float64)
    rewritten = TransposedUpsample(up.float()).double()
    want = up.double()(x)
    got = rewritten(x)
    assert got.shape == want.shape == (3, channels, 2 * size, 2 * size)
    # The kernel is rounded to float32 once: bound the error by that rounding, not 0.
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-6 * scale


def test_rewrite_refuses_another_conv():
    up = Upsample(4)
    up.conv = torch.nn.Conv2d(4, 4, 3, padding=2)
    with pytest.raises(ValueError, match="padding-1"):
        TransposedUpsample(up)


@pytest.mark.parametrize("groups, channels", [(1, 4), (4, 8), (8, 8)])
def test_batchnorm_affine_groupnorm_equals_groupnorm(groups, channels):
    torch.manual_seed(channels)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, channels, 5, 5, dtype=torch.float64) * 3 + 1
    got = BatchNormAffineGroupNorm(norm).double()(x)
    # Only the order of float64 operations can differ.
    torch.testing.assert_close(got, norm(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="affine"):
        BatchNormAffineGroupNorm(torch.nn.GroupNorm(2, 4, affine=False))


def test_deploy_form_copies_and_the_file_carries_the_rewrites(trained_onnx):
    model = randomized_unet(tiny_model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = deploy_form(model)
    kinds = (Upsample, torch.nn.GroupNorm)
    assert any(isinstance(m, kinds) for m in model.modules())
    assert not any(isinstance(m, kinds) for m in deployed.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    ops = [n.op_type for n in onnx.load(str(trained_onnx)).graph.node]
    assert "ConvTranspose" in ops and "Resize" not in ops
    assert ops.count("BatchNormalization") == ops.count("InstanceNormalization") == norms
