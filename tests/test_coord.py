"""Tests for mipnerf360.coord: closed forms, float64 brute force, Monte Carlo and properties."""

import functools

import gin
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mipnerf360 import coord

F64 = torch.float64


def _points(gen: torch.Generator, n: int, dtype=F64) -> torch.Tensor:
    """Points whose norms span many orders of magnitude (inside and far outside the unit ball)."""
    direction = torch.randn(n, 3, generator=gen, dtype=dtype)
    log_scale = 3 * torch.randn(n, 1, generator=gen, dtype=dtype)
    return direction * torch.exp(log_scale)


def _random_cov(gen: torch.Generator, batch, d: int = 3) -> torch.Tensor:
    a = torch.randn(*batch, d, d, generator=gen, dtype=F64)
    return a @ a.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=F64)


_finite_points = hnp.arrays(
    np.float64, (5, 3), elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


# ---------------------------------------------------------------- contract / inv_contract


@settings(max_examples=60, deadline=None)
@given(_finite_points)
def test_contract_matches_eq10(x_np):
    x = torch.from_numpy(x_np)
    norm = torch.linalg.norm(x, dim=-1, keepdim=True)
    outside = (2 - 1 / norm) * x / norm
    expected = torch.where(norm <= 1, x, outside)
    torch.testing.assert_close(coord.contract(x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(_finite_points)
def test_contract_is_bounded_and_preserves_direction(x_np):
    x = torch.from_numpy(x_np)
    z = coord.contract(x)
    z_norm = torch.linalg.norm(z, dim=-1)
    assert torch.all(z_norm <= 2)
    # Direction is kept: z is a non-negative multiple of x.
    cross = torch.linalg.cross(x, z)
    assert torch.all(cross.abs() <= 1e-9 * (1 + x.abs().amax(-1, keepdim=True)))
    assert torch.all((x * z).sum(-1) >= 0)


def test_contract_is_identity_inside_unit_ball():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, generator=gen, dtype=F64)
    x = x / torch.linalg.norm(x, dim=-1, keepdim=True) * torch.rand(1000, 1, generator=gen, dtype=F64)
    assert torch.equal(coord.contract(x), x)
    assert torch.equal(coord.inv_contract(x), x)


def test_contract_radial_profile():
    # Along any direction, |contract(r u)| = 2 - 1/r for r >= 1.
    r = torch.tensor([1.0, 1.5, 2.0, 10.0, 1e3, 1e8], dtype=F64)
    u = torch.tensor([0.6, 0.0, -0.8], dtype=F64)
    z = coord.contract(r[:, None] * u)
    torch.testing.assert_close(torch.linalg.norm(z, dim=-1), 2 - 1 / r)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_inv_contract_inverts_contract(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _points(gen, 2000, dtype)
    x = x[torch.linalg.norm(x, dim=-1) < 1e3]  # Beyond that |z| ~ 2 in float32 and the inverse is ill-posed.
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(coord.inv_contract(coord.contract(x)), x, rtol=rtol, atol=1e-6)
    z = coord.contract(x)
    torch.testing.assert_close(coord.contract(coord.inv_contract(z)), z, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize('fn', [coord.contract, coord.inv_contract])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_gradients_finite_at_origin(fn, dtype):
    x = torch.zeros(4, 3, dtype=dtype, requires_grad=True)
    y = fn(x)
    assert torch.equal(y, torch.zeros_like(y))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.all(torch.isfinite(grad))
    torch.testing.assert_close(grad, torch.ones_like(grad))  # Identity near the origin.


def test_contract_jacobian_matches_autograd():
    gen = torch.Generator().manual_seed(2)
    x = _points(gen, 200)
    x = x[(torch.linalg.norm(x, dim=-1) - 1).abs() > 1e-6]  # Avoid the kink at |x| = 1.
    jac_autograd = torch.func.vmap(torch.func.jacrev(coord.contract))(x)
    torch.testing.assert_close(coord.contract_jacobian(x), jac_autograd, rtol=1e-10, atol=1e-14)
    # Closed form outside: J = s I + 2 (1 - r) / r^4 x x^T, s = (2r - 1) / r^2.
    x_out = torch.tensor([[3.0, -4.0, 12.0]], dtype=F64)  # r = 13
    r = 13.0
    expected = (2 * r - 1) / r**2 * torch.eye(3, dtype=F64) + 2 * (1 - r) / r**4 * x_out.T @ x_out
    torch.testing.assert_close(coord.contract_jacobian(x_out)[0], expected)


# ---------------------------------------------------------------- track_linearize


def test_track_linearize_exact_for_affine_maps():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, generator=gen, dtype=F64)  # Non-square: R^3 -> R^2.
    b = torch.randn(2, generator=gen, dtype=F64)
    mean = torch.randn(4, 5, 3, generator=gen, dtype=F64)
    cov = _random_cov(gen, (4, 5))
    fn_mean, fn_cov = coord.track_linearize(lambda x: x @ a.T + b, mean, cov)
    torch.testing.assert_close(fn_mean, mean @ a.T + b)
    torch.testing.assert_close(fn_cov, a @ cov @ a.T)
    assert fn_cov.shape == (4, 5, 2, 2)


def test_track_linearize_contract_fast_path_matches_generic_path():
    gen = torch.Generator().manual_seed(4)
    mean = _points(gen, 300).reshape(10, 30, 3)
    cov = _random_cov(gen, (10, 30))
    fast = coord.track_linearize(coord.contract, mean, cov)
    generic = coord.track_linearize(lambda x: coord.contract(x), mean, cov)  # A lambda hides `contract`.
    for f, g in zip(fast, generic):
        torch.testing.assert_close(f, g, rtol=1e-10, atol=1e-14)
    # And against an explicit per-point Jacobian.
    jac = torch.func.vmap(torch.func.jacrev(coord.contract))(mean.reshape(-1, 3)).reshape(10, 30, 3, 3)
    torch.testing.assert_close(fast[1], jac @ cov @ jac.transpose(-1, -2), rtol=1e-10, atol=1e-14)


def test_track_linearize_nonlinear_matches_monte_carlo_for_small_cov():
    # For a tiny covariance the linearisation is accurate: compare with the sample covariance of fn(samples).
    gen = torch.Generator().manual_seed(5)
    mean = torch.tensor([[2.0, -1.0, 0.5]], dtype=F64)
    cov = 1e-6 * _random_cov(gen, (1,))
    samples = mean + torch.randn(200000, 3, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov[0]).T
    z = coord.contract(samples)
    mc_cov = torch.cov(z.T)
    _, fn_cov = coord.track_linearize(coord.contract, mean, cov)
    torch.testing.assert_close(fn_cov[0], mc_cov, rtol=0.02, atol=0.02 * mc_cov.abs().max().item())


def test_track_linearize_rejects_diagonal_cov():
    with pytest.raises(ValueError, match='full covariance'):
        coord.track_linearize(coord.contract, torch.zeros(4, 3), torch.ones(4, 3))


# ---------------------------------------------------------------- construct_ray_warps

_WARP_FNS = [None, 'piecewise', torch.reciprocal, torch.log, torch.exp, torch.sqrt, torch.square]


@pytest.mark.parametrize('fn', _WARP_FNS, ids=lambda f: getattr(f, '__name__', str(f)))
def test_construct_ray_warps_extents_and_round_trip(fn):
    gen = torch.Generator().manual_seed(6)
    scale = 0.1 if fn is torch.exp else 1.0  # exp of large distances overflows.
    t_near = scale * (0.1 + torch.rand(50, 1, generator=gen, dtype=F64))
    t_far = t_near + scale * 50 * (0.1 + torch.rand(50, 1, generator=gen, dtype=F64))
    t_to_s, s_to_t = coord.construct_ray_warps(fn, t_near, t_far)
    torch.testing.assert_close(t_to_s(t_near), torch.zeros_like(t_near), atol=1e-12, rtol=0)
    torch.testing.assert_close(t_to_s(t_far), torch.ones_like(t_far), atol=1e-12, rtol=0)
    torch.testing.assert_close(s_to_t(torch.zeros_like(t_near)), t_near)
    torch.testing.assert_close(s_to_t(torch.ones_like(t_far)), t_far)
    s = torch.sort(torch.rand(50, 64, generator=gen, dtype=F64), dim=-1).values
    t = s_to_t(s)
    assert torch.all((t >= t_near * (1 - 1e-12)) & (t <= t_far * (1 + 1e-12)))
    assert torch.all(torch.diff(t, dim=-1) >= 0)  # Monotonic.
    torch.testing.assert_close(t_to_s(t), s, rtol=1e-9, atol=1e-9)


def test_construct_ray_warps_closed_forms():
    t_near = torch.tensor([[0.5], [2.0]], dtype=F64)
    t_far = torch.tensor([[10.0], [1e4]], dtype=F64)
    t = torch.tensor([[0.5, 1.0, 3.0, 10.0], [2.0, 5.0, 100.0, 1e4]], dtype=F64)
    t_to_s, _ = coord.construct_ray_warps(None, t_near, t_far)
    torch.testing.assert_close(t_to_s(t), (t - t_near) / (t_far - t_near))
    t_to_s, s_to_t = coord.construct_ray_warps(torch.reciprocal, t_near, t_far)
    torch.testing.assert_close(t_to_s(t), (1 / t - 1 / t_near) / (1 / t_far - 1 / t_near))
    # Reciprocal spacing: s = 1/2 lands on the harmonic mean-like point 1 / ((1/n + 1/f) / 2).
    torch.testing.assert_close(s_to_t(torch.full_like(t_near, 0.5)), 2 / (1 / t_near + 1 / t_far))
    # Piecewise with t_near = 0: identity-like below 1, reciprocal-like above.
    t_to_s, _ = coord.construct_ray_warps('piecewise', torch.zeros(1, 1, dtype=F64), torch.full((1, 1), 1e10,
                                                                                             dtype=F64))
    torch.testing.assert_close(t_to_s(torch.tensor([[0.0, 0.5, 1.0, 4.0]], dtype=F64)),
                               torch.tensor([[0.0, 0.25, 0.5, 0.875]], dtype=F64), atol=1e-9, rtol=0)


def test_construct_ray_warps_accepts_names_and_wrappers_and_rejects_others():
    t_near, t_far = torch.tensor([1.0], dtype=F64), torch.tensor([7.0], dtype=F64)
    t = torch.tensor([1.0, 2.0, 7.0], dtype=F64)
    expected = (torch.sqrt(t) - 1) / (7**0.5 - 1)
    torch.testing.assert_close(coord.construct_ray_warps(torch.sqrt, t_near, t_far)[0](t), expected)
    torch.testing.assert_close(coord.construct_ray_warps('sqrt', t_near, t_far)[0](t), expected)
    # gin hands out functools.wraps-style wrappers; the inverse is found through the wrapper's __name__.
    wrapped = functools.wraps(torch.sqrt)(lambda x: torch.sqrt(x))
    t_to_s, s_to_t = coord.construct_ray_warps(wrapped, t_near, t_far)
    torch.testing.assert_close(s_to_t(t_to_s(t)), t)
    with pytest.raises(ValueError, match='Unsupported ray distance function'):
        coord.construct_ray_warps(torch.sin, t_near, t_far)


# ---------------------------------------------------------------- encodings


def test_expected_sin_matches_monte_carlo():
    gen = torch.Generator().manual_seed(7)
    mean = torch.tensor([-3.0, 0.3, 1.0, 2.5], dtype=F64)
    var = torch.tensor([0.01, 0.5, 2.0, 0.2], dtype=F64)
    samples = mean + var.sqrt() * torch.randn(400000, 4, generator=gen, dtype=F64)
    mc = torch.sin(samples).mean(0)
    stderr = torch.sin(samples).std(0) / 400000**0.5
    assert torch.all((coord.expected_sin(mean, var) - mc).abs() < 5 * stderr)


def test_pos_enc_layout_matches_hand_built_features():
    x = torch.tensor([[0.3, -1.2, 2.0], [0.1, 0.2, -0.7]], dtype=F64)
    min_deg, max_deg = 1, 4
    for row in range(2):
        sines = [np.sin(2.0**k * x[row, i].item()) for k in range(min_deg, max_deg) for i in range(3)]
        cosines = [np.cos(2.0**k * x[row, i].item()) for k in range(min_deg, max_deg) for i in range(3)]
        expected = torch.tensor(x[row].tolist() + sines + cosines, dtype=F64)
        got = coord.pos_enc(x, min_deg, max_deg, append_identity=True)[row]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        got = coord.pos_enc(x, min_deg, max_deg, append_identity=False)[row]
        torch.testing.assert_close(got, expected[3:], rtol=1e-12, atol=1e-12)


def test_integrated_pos_enc_with_zero_variance_is_pos_enc():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 5, 3, generator=gen, dtype=F64)
    ipe = coord.integrated_pos_enc(x, torch.zeros_like(x), 0, 8)
    assert ipe.shape == (7, 5, 2 * 8 * 3)
    torch.testing.assert_close(ipe, coord.pos_enc(x, 0, 8, append_identity=False), rtol=1e-12, atol=1e-12)


def test_integrated_pos_enc_matches_monte_carlo():
    gen = torch.Generator().manual_seed(9)
    mean = torch.tensor([[0.2, -0.5, 1.1], [1.5, 0.0, -0.3]], dtype=F64)
    var = torch.tensor([[0.001, 0.01, 0.05], [0.02, 0.003, 0.0]], dtype=F64)
    n = 200000
    samples = mean + var.sqrt() * torch.randn(n, 2, 3, generator=gen, dtype=F64)
    feats = coord.pos_enc(samples, 0, 4, append_identity=False)
    mc, stderr = feats.mean(0), feats.std(0) / n**0.5
    ipe = coord.integrated_pos_enc(mean, var, 0, 4)
    assert torch.all((ipe - mc).abs() <= 5 * stderr + 1e-12)
    # High frequencies with large variance are attenuated towards zero.
    big = coord.integrated_pos_enc(mean, torch.full_like(var, 10.0), 0, 4)
    assert torch.all(big.abs() <= torch.exp(torch.tensor(-5.0, dtype=F64)))


def test_lift_and_diagonalize_matches_explicit_projection():
    gen = torch.Generator().manual_seed(10)
    mean = torch.randn(6, 4, 3, generator=gen, dtype=F64)
    cov = _random_cov(gen, (6, 4))
    basis = torch.randn(3, 21, generator=gen, dtype=F64)
    fn_mean, fn_var = coord.lift_and_diagonalize(mean, cov, basis)
    torch.testing.assert_close(fn_mean, mean @ basis)
    full = basis.T @ cov @ basis
    torch.testing.assert_close(fn_var, torch.diagonal(full, dim1=-2, dim2=-1))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_outputs_keep_input_dtype(dtype):
    x = torch.randn(3, 3, dtype=dtype) * 3
    cov = torch.eye(3, dtype=dtype).expand(3, 3, 3)
    assert coord.contract(x).dtype == dtype
    assert coord.track_linearize(coord.contract, x, cov)[1].dtype == dtype
    assert coord.integrated_pos_enc(x, x.abs(), 0, 4).dtype == dtype
    assert coord.pos_enc(x, 0, 4).dtype == dtype


# ---------------------------------------------------------------- gin


@gin.configurable(module='test_coord')
def _gin_probe(warp_fn=None):
    return warp_fn


def test_gin_resolves_coord_contract():
    coord._register_gin()  # Registering twice (e.g. a re-import) must not fail.
    try:
        gin.parse_config('test_coord._gin_probe.warp_fn = @coord.contract')
        fn = _gin_probe()
        x = torch.tensor([[3.0, 0.0, 4.0]], dtype=F64)
        torch.testing.assert_close(fn(x), coord.contract(x))
        # track_linearize still recognises gin's wrapper of contract and takes the closed-form path.
        assert coord._is_contract(fn)
    finally:
        gin.clear_config()


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(11)
    mean = _points(gen, 4096, torch.float32).reshape(64, 64, 3)
    cov = _random_cov(gen, (64, 64)).float()
    cpu = coord.track_linearize(coord.contract, mean, cov)
    gpu = coord.track_linearize(coord.contract, mean.cuda(), cov.cuda())
    for c, g in zip(cpu, gpu):
        assert g.device.type == 'cuda'
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-5)
    ipe_cpu = coord.integrated_pos_enc(mean, cov.diagonal(dim1=-2, dim2=-1), 0, 12)
    ipe_gpu = coord.integrated_pos_enc(mean.cuda(), cov.cuda().diagonal(dim1=-2, dim2=-1), 0, 12)
    torch.testing.assert_close(ipe_gpu.cpu(), ipe_cpu, rtol=1e-4, atol=1e-4)
