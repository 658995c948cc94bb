"""Tests for mipnerf360.ref_utils: reflections, normalisation, and the (integrated) directional encoding."""

import math

import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mipnerf360 import ref_utils


def _scipy_sph_harm(m, l, theta, phi):  # noqa: E741
    """Complex Y_l^m at polar angle theta and azimuth phi (scipy's API changed names across versions)."""
    if hasattr(scipy.special, 'sph_harm_y'):
        return scipy.special.sph_harm_y(l, m, theta, phi)
    return scipy.special.sph_harm(m, l, phi, theta)


def _random_sphere(n, seed):
    rng = np.random.default_rng(seed)
    theta = np.arccos(rng.uniform(-1, 1, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    xyz = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    return theta, phi, xyz


def _scipy_encoding(deg_view, theta, phi):
    ml = ref_utils.get_ml_array(deg_view)
    y = np.stack([_scipy_sph_harm(m, l, theta, phi) for m, l in ml.T], -1)
    return np.concatenate([y.real, y.imag], -1)


def test_get_ml_array_layout():
    ml = ref_utils.get_ml_array(3)
    expected_l = [1, 1, 2, 2, 2, 4, 4, 4, 4, 4]
    expected_m = [0, 1, 0, 1, 2, 0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ml, np.array([expected_m, expected_l]))
    # Encoding widths used by Ref-NeRF configs (2 * number of harmonics).
    assert [2 * ref_utils.get_ml_array(d).shape[1] for d in range(1, 6)] == [4, 10, 20, 38, 72]


@pytest.mark.parametrize('l,m', [(1, 0), (1, 1), (2, 1), (4, 2), (8, 3), (16, 5), (16, 16)])
def test_assoc_legendre_coeff_matches_lpmv(l, m):  # noqa: E741
    """sum_k c_k cos^k(θ) sin^m(θ) must equal scipy's P_l^m(cos θ) (Condon-Shortley phase included)."""
    theta = np.linspace(0.05, np.pi - 0.05, 17)
    x = np.cos(theta)
    ours = sum(ref_utils.assoc_legendre_coeff(l, m, k) * x ** k for k in range(l - m + 1)) * np.sin(theta) ** m
    ref = scipy.special.lpmv(m, l, x)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_generalized_binomial_coeff():
    assert ref_utils.generalized_binomial_coeff(5, 2) == pytest.approx(10.0)
    assert ref_utils.generalized_binomial_coeff(0.5, 3) == pytest.approx(0.5 * -0.5 * -1.5 / 6)
    assert ref_utils.generalized_binomial_coeff(3.7, 0) == pytest.approx(1.0)


@pytest.mark.parametrize('deg_view', [1, 2, 3, 4, 5])
def test_dir_enc_matches_scipy_float64(deg_view):
    theta, phi, xyz = _random_sphere(500, deg_view)
    de = ref_utils.generate_dir_enc_fn(deg_view)(torch.tensor(xyz, dtype=torch.float64))
    assert de.dtype == torch.float64
    np.testing.assert_allclose(de.numpy(), _scipy_encoding(deg_view, theta, phi), atol=1e-8)


def test_dir_enc_float32_accuracy():
    """float32 loses digits to cancellation at l = 16 (the reference's own test uses atol 0.02)."""
    theta, phi, xyz = _random_sphere(500, 7)
    de = ref_utils.generate_dir_enc_fn(4)(torch.tensor(xyz, dtype=torch.float32))
    np.testing.assert_allclose(de.numpy(), _scipy_encoding(4, theta, phi), atol=1e-4)
    de5 = ref_utils.generate_dir_enc_fn(5)(torch.tensor(xyz, dtype=torch.float32))
    np.testing.assert_allclose(de5.numpy(), _scipy_encoding(5, theta, phi), atol=2e-2)


def test_ide_at_zero_kappa_inv_is_dir_enc_and_attenuates_in_closed_form():
    _, _, xyz = _random_sphere(300, 3)
    xyz = torch.tensor(xyz, dtype=torch.float64)
    ide = ref_utils.generate_ide_fn(4)
    de = ref_utils.generate_dir_enc_fn(4)(xyz)
    torch.testing.assert_close(ide(xyz, torch.zeros_like(xyz[..., :1])), de, rtol=0, atol=0)

    kappa_inv = torch.rand(300, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    l = torch.tensor(ref_utils.get_ml_array(4)[1], dtype=torch.float64)  # noqa: E741
    atten = torch.exp(-0.5 * l * (l + 1) * kappa_inv)  # Ref-NeRF Eq. 8.
    torch.testing.assert_close(ide(xyz, kappa_inv), de * torch.cat([atten, atten], -1), rtol=1e-12, atol=1e-12)


def test_ide_rejects_large_degree():
    with pytest.raises(ValueError, match='at most 5'):
        ref_utils.generate_ide_fn(6)


def test_dir_enc_gradients_finite_at_poles_and_equator():
    xyz = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], requires_grad=True)
    ki = torch.zeros(4, 1, requires_grad=True)
    out = ref_utils.generate_ide_fn(5)(xyz, ki)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xyz.grad).all() and torch.isfinite(ki.grad).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31 - 1))
def test_reflect_is_involution_and_preserves_angle_and_length(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(64, 3, dtype=torch.float64, generator=g)
    n = torch.nn.functional.normalize(torch.randn(64, 3, dtype=torch.float64, generator=g), dim=-1)
    r = ref_utils.reflect(v, n)
    torch.testing.assert_close(ref_utils.reflect(r, n), v)
    torch.testing.assert_close((r * n).sum(-1), (v * n).sum(-1))
    torch.testing.assert_close(r.norm(dim=-1), v.norm(dim=-1))
    # The reflection lies in the plane spanned by v and n.
    det = torch.linalg.det(torch.stack([v, n, r], -2))
    torch.testing.assert_close(det, torch.zeros_like(det), atol=1e-10, rtol=0)


def test_reflect_known_value():
    v = torch.tensor([1.0, 1.0, 0.0])
    n = torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(ref_utils.reflect(v, n), torch.tensor([-1.0, 1.0, 0.0]))


def test_l2_normalize_values_and_finite_gradient_at_zero():
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-30, 0.0, 0.0]], requires_grad=True)
    y = ref_utils.l2_normalize(x)
    torch.testing.assert_close(y[0], torch.tensor([0.6, 0.8, 0.0]))
    assert torch.equal(y[1], torch.zeros(3))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Below the clamp the map is linear, x / sqrt(eps), so the gradient is 1 / sqrt(eps) per component.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(x.grad[1], torch.full((3,), eps ** -0.5))
    # Dtype-aware default epsilon.
    x64 = torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(ref_utils.l2_normalize(x64).norm(dim=-1), torch.ones(10, dtype=torch.float64))


def test_compute_weighted_mae_closed_form():
    n = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    theta = math.radians(30.0)
    gt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [math.sin(theta), 0.0, math.cos(theta)]])
    w = torch.tensor([1.0, 2.0, 1.0])
    mae = ref_utils.compute_weighted_mae(w, n, gt)
    # Identical normals contribute the clamp's tiny angle, acos(1 - eps).
    assert float(mae) == pytest.approx((0.0 + 2 * 90.0 + 30.0) / 4.0, abs=1e-2)
