"""The speed paths of the model agree with their plain definitions (values, not only shapes)."""

import math as pymath

import pytest
import torch
from torch import nn

from mipnerf360 import coord, math, models, stepfun


def _plain_ipe(mean, var, min_deg, max_deg):
    """Integrated positional encoding written as its definition: concatenate, then expected_sin."""
    scaled_mean = coord._scale_features(mean, min_deg, max_deg, 1)
    scaled_var = coord._scale_features(var, min_deg, max_deg, 2)
    return coord.expected_sin(torch.cat([scaled_mean, scaled_mean + 0.5 * torch.pi], dim=-1),
                              torch.cat([scaled_var, scaled_var], dim=-1))


def _decay_floor_mask(var, min_deg, max_deg):
    """Where exp(-4^k var / 2) >= 2^-100, i.e. where the fast encoding keeps the feature (sines and cosines)."""
    scaled_var = coord._scale_features(var, min_deg, max_deg, 2)
    keep = torch.exp(-0.5 * scaled_var) > 2.0**-100
    return torch.cat([keep, keep], dim=-1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('bound', [None, 2.0])
def test_integrated_pos_enc_equals_definition_bitwise(dtype, bound):
    g = torch.Generator().manual_seed(0)
    n = 3000
    mean = torch.rand(n, 7, generator=g, dtype=dtype) * 4 - 2  # |mean| <= 2, so `bound` holds.
    # Variances over 13 decades: many features underflow past the 2^-100 floor.
    var = torch.rand(n, 7, generator=g, dtype=dtype) * torch.logspace(-12, 1, n, dtype=dtype)[:, None]
    got = coord.integrated_pos_enc(mean, var, 0, 12, mean_bound=bound)
    want = _plain_ipe(mean, var, 0, 12)
    keep = _decay_floor_mask(var, 0, 12)
    assert 0.01 < float((~keep).double().mean()) < 0.9  # Both cases occur.
    assert torch.equal(got[keep], want[keep])
    assert torch.all(got[~keep] == 0)
    assert float(want[~keep].abs().max()) < 2.0**-100
    # No denormals in the output (they slow CPU matrix products down by an order of magnitude).
    tiny = torch.finfo(dtype).tiny
    assert not torch.any((got != 0) & (got.abs() < tiny) & (_plain_ipe(mean, var, 0, 12).abs() >= 2.0**-120))


def test_integrated_pos_enc_large_arguments_are_reduced_like_safe_sin():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(500, 3, generator=g) * 1e4  # Sine arguments far beyond 100 pi.
    var = torch.zeros_like(mean)
    got = coord.integrated_pos_enc(mean, var, 0, 8)
    want = _plain_ipe(mean, var, 0, 8)
    assert torch.equal(got, want)
    # And the reduction matters here: plain sin differs.
    scaled = coord._scale_features(mean, 0, 8, 1)
    assert not torch.equal(got[..., :scaled.shape[-1]], torch.sin(scaled))


def test_integrated_pos_enc_grad_path_matches_no_grad_path_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    mean = torch.rand(2, 5, 3, generator=g, dtype=torch.float64) * 4 - 2
    var = torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    fast = coord.integrated_pos_enc(mean, var, 0, 10, mean_bound=2.0)
    with_grad = coord.integrated_pos_enc(mean.clone().requires_grad_(), var, 0, 10, mean_bound=2.0)
    assert torch.equal(fast, with_grad.detach())
    # Broadcasting of the leading dims.
    bcast = coord.integrated_pos_enc(mean[:1], var, 0, 10)
    assert torch.equal(bcast, coord.integrated_pos_enc(mean[:1].expand_as(var), var, 0, 10))
    m = mean[:, :2].clone().requires_grad_()
    v = (var[:, :2] * 0.1).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: coord.integrated_pos_enc(a, b, 0, 4), (m, v))


def test_lift_and_diagonalize_matches_explicit_projection_in_float64():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(100, 3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2)
    cov[:10] = a[:10]  # Not symmetric: the formula must not assume symmetry.
    basis = torch.randn(3, 21, generator=g, dtype=torch.float64)
    _, var = coord.lift_and_diagonalize(torch.zeros(100, 3, dtype=torch.float64), cov, basis)
    want = torch.diagonal(basis.T @ cov @ basis, dim1=-2, dim2=-1)
    torch.testing.assert_close(var, want, rtol=1e-12, atol=1e-12)


def test_split_linear_equals_linear_of_concatenation():
    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(5 + 7 + 2, 6).double()
    per_sample = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    per_ray = torch.randn(4, 1, 7, generator=g, dtype=torch.float64, requires_grad=True)
    other = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    got = models._split_linear(layer, [per_sample, per_ray, other])
    want = layer(torch.cat([per_sample, per_ray.expand(4, 3, 7), other], dim=-1))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    grads = torch.autograd.grad(got.square().sum(), [per_sample, per_ray, layer.weight, layer.bias])
    grads_want = torch.autograd.grad(want.square().sum(), [per_sample, per_ray, layer.weight, layer.bias])
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('skip_layer,net_depth', [(2, 4), (4, 5), (1, 3)])
def test_mlp_trunk_matches_concatenating_trunk(skip_layer, net_depth):
    torch.manual_seed(0)
    mlp = models.MLP(net_depth=net_depth, net_width=16, skip_layer=skip_layer, bottleneck_width=8,
                     net_width_viewdirs=8, max_deg_point=4, basis_shape='octahedron', basis_subdivisions=1,
                     warp_fn=coord.contract, disable_density_normals=True).double()
    g = torch.Generator().manual_seed(5)
    means = torch.randn(3, 4, 3, generator=g, dtype=torch.float64) * 2
    a = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64) * 0.1
    covs = a @ a.transpose(-1, -2)
    viewdirs = torch.nn.functional.normalize(torch.randn(3, 3, generator=g, dtype=torch.float64), dim=-1)
    out = mlp(None, (means, covs), viewdirs=viewdirs)

    # The plain computation: the encoding concatenated after every skip layer, the view inputs concatenated.
    m, c = coord.track_linearize(coord.contract, means, covs)
    enc = _plain_ipe(*coord.lift_and_diagonalize(m, c, mlp.pos_basis_t), 0, 4)
    x = enc
    for i, layer in enumerate(mlp.trunk):
        x = torch.relu(layer(x))
        if i % skip_layer == 0 and i > 0:
            x = torch.cat([x, enc], dim=-1)
    density = torch.nn.functional.softplus(mlp.density_layer(x)[..., 0] - 1)
    dir_enc = coord.pos_enc(viewdirs, 0, mlp.deg_view, append_identity=True)[..., None, :].expand(3, 4, -1)
    y = torch.cat([mlp.bottleneck_layer(x), dir_enc], dim=-1)
    for layer in mlp.viewdir_layers:
        y = torch.relu(layer(y))
    rgb = torch.sigmoid(mlp.rgb_layer(y)) * 1.002 - 0.001
    torch.testing.assert_close(out['density'], density, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out['rgb'], rgb, rtol=1e-12, atol=1e-12)


def test_domain_clipping_accepts_numbers_and_tensors():
    t = torch.tensor([[0.0, 0.3, 0.6, 1.0]])
    w = torch.tensor([[0.2, 0.5, 0.3]])
    for domain in [(0.1, 0.9), (torch.tensor(0.1), torch.tensor(0.9))]:
        td, _ = stepfun.max_dilate(t, w, 0.05, domain=domain)
        assert float(td.min()) >= 0.1 - 1e-7 and float(td.max()) <= 0.9 + 1e-7
        s = stepfun.sample_intervals(None, t, torch.log(w), 8, domain=domain)
        assert float(s.min()) >= 0.1 - 1e-7 and float(s.max()) <= 0.9 + 1e-7


def test_matmul_full_precision_helper_is_constant_foldable():
    # The precision check must not read settings in a way torch.compile cannot trace; its value is correct.
    assert math._reduced_fp32_matmul('cpu') == (torch.get_float32_matmul_precision() != 'highest')
    a = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(math.matmul(a, a.T), a @ a.T)
    assert pymath.isclose(float(math.SAFE_TRIG_PERIOD), 100 * pymath.pi)


def test_integrated_pos_enc_blocked_cpu_path_equals_single_block(monkeypatch):
    g = torch.Generator().manual_seed(6)
    mean = torch.rand(37, 5, 3, generator=g) * 4 - 2
    var = torch.rand(37, 5, 3, generator=g) * 1e-2
    whole = coord.integrated_pos_enc(mean, var, 0, 12, mean_bound=2.0)
    monkeypatch.setattr(coord, '_IPE_CPU_BLOCK_BYTES', 7 * 2 * 36 * 4)  # 7 rows per block, last one partial.
    blocked = coord.integrated_pos_enc(mean, var, 0, 12, mean_bound=2.0)
    assert torch.equal(whole, blocked)
    assert torch.equal(blocked, coord.integrated_pos_enc(mean.clone().requires_grad_(), var, 0, 12).detach())
