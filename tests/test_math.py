"""Tests for mipnerf360.math: closed forms, float64 references and numpy.interp."""

import math as pymath

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mipnerf360 import math

F64 = torch.float64


# ---------------------------------------------------------------- safe_sin / safe_cos


def _reduced(x: float, period: float) -> float:
    """x mod period (Python semantics, computed exactly with fmod)."""
    r = pymath.fmod(x, period)
    return r + period if r < 0 else r


def _big_args(dtype) -> torch.Tensor:
    x = 10 ** np.linspace(-30, 10, 4001)
    return torch.tensor(np.concatenate([-x[::-1], [0.0], x]), dtype=dtype)


@pytest.mark.parametrize('name', ['sin', 'cos'])
def test_safe_trig_float64_matches_true_value_up_to_1e10(name):
    x = _big_args(F64)
    y = getattr(math, 'safe_' + name)(x)
    # 100 pi rounded to float64 is off by ~1e-14, so after ~3e7 periods the argument moves by < 1e-6.
    np.testing.assert_allclose(y.numpy(), getattr(np, name)(x.numpy()), atol=1e-5, rtol=0)


@pytest.mark.parametrize('dtype', [torch.float32, F64])
@pytest.mark.parametrize('name', ['sin', 'cos'])
def test_safe_trig_reduces_exactly_modulo_dtype_period(name, dtype):
    x = torch.cat([_big_args(dtype), torch.tensor([3e38 if dtype == torch.float32 else 1e300], dtype=dtype)])
    y = getattr(math, 'safe_' + name)(x)
    assert not torch.isnan(y).any()
    period = float(torch.tensor(100 * pymath.pi, dtype=dtype))  # The period as rounded to x's dtype.
    fn = getattr(pymath, name)
    expected = np.array([fn(v if abs(v) < 100 * pymath.pi else _reduced(v, period)) for v in x.tolist()])
    atol = 2e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(y.numpy(), expected, atol=atol, rtol=0)


def test_safe_trig_is_plain_trig_below_threshold():
    x = torch.linspace(-100 * pymath.pi * 0.999, 100 * pymath.pi * 0.999, 1001)
    assert torch.equal(math.safe_sin(x), torch.sin(x))
    assert torch.equal(math.safe_cos(x), torch.cos(x))


def test_safe_trig_gradient_is_cos():
    x = torch.tensor([0.3, 1e3, -5e4, 1e9], dtype=F64, requires_grad=True)
    math.safe_sin(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), math.safe_cos(x.detach()).numpy(), atol=1e-12)


# ---------------------------------------------------------------- safe_exp


@pytest.mark.parametrize('dtype', [torch.float32, F64])
def test_safe_exp_matches_exp_for_moderate_inputs(dtype):
    x = torch.linspace(-80, 80, 10001, dtype=dtype, requires_grad=True)
    y = math.safe_exp(x)
    y.sum().backward()
    rtol = 1e-6 if dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(y.detach().numpy(), np.exp(x.detach().double().numpy()), rtol=rtol)
    np.testing.assert_allclose(x.grad.numpy(), np.exp(x.detach().double().numpy()), rtol=rtol)


@pytest.mark.parametrize('dtype', [torch.float32, F64])
def test_safe_exp_finite_and_monotonic_for_huge_inputs(dtype):
    x = torch.cat([torch.linspace(-1e5, 1e5, 10001, dtype=dtype), torch.tensor([1e4, 1e30], dtype=dtype)])
    x.requires_grad_(True)
    y = math.safe_exp(x)
    y.sum().backward()
    g = x.grad
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert torch.equal(y.detach(), g)  # d/dx exp = exp, also where clipped.
    assert (y[1:-2] >= y[:-3]).all()
    assert g[-2] > 1e38 if dtype == torch.float32 else g[-2] > 1e300  # Still pushes large inputs down.
    if dtype == torch.float32:
        assert y[-2].item() == pytest.approx(pymath.exp(88.0), rel=1e-6)  # The reference's clip.


def test_safe_exp_gradcheck_and_double_backward():
    x = torch.linspace(-3, 3, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(math.safe_exp, (x,))
    assert torch.autograd.gradgradcheck(math.safe_exp, (x,))
    # Forward-mode derivative too.
    _, jvp = torch.func.jvp(math.safe_exp, (x.detach(),), (torch.ones_like(x),))
    np.testing.assert_allclose(jvp.numpy(), np.exp(x.detach().numpy()), rtol=1e-13)


# ---------------------------------------------------------------- learning-rate schedule


@settings(max_examples=40, deadline=None)
@given(st.floats(-3, 3), st.floats(-3, 3), st.integers(100, 100000))
def test_learning_rate_decay_endpoints_and_midpoint(a, b, max_steps):
    lr_init = pymath.exp(a - 3)
    lr_final = lr_init * pymath.exp(b - 5)
    lr = lambda s: float(math.learning_rate_decay(s, lr_init, lr_final, max_steps))  # noqa: E731
    assert lr(0) == pytest.approx(lr_init, rel=1e-10)
    assert lr(max_steps) == pytest.approx(lr_final, rel=1e-10)
    assert lr(max_steps / 2) == pytest.approx(pymath.sqrt(lr_init * lr_final), rel=1e-10)
    assert lr(max_steps + 100) == pytest.approx(lr_final, rel=1e-10)
    assert lr(-5) == pytest.approx(lr_init, rel=1e-10)
    # Log-linear: constant ratio between equally spaced steps.
    r1 = lr(max_steps * 0.2) / lr(max_steps * 0.1)
    r2 = lr(max_steps * 0.8) / lr(max_steps * 0.7)
    assert r1 == pytest.approx(r2, rel=1e-9)


def test_learning_rate_warmup_matches_360_schedule():
    lr_init, lr_final, max_steps, delay, mult = 2e-3, 2e-5, 250000, 512, 0.01
    lr = lambda s: float(math.learning_rate_decay(s, lr_init, lr_final, max_steps, delay, mult))  # noqa: E731
    base = lambda s: float(math.learning_rate_decay(s, lr_init, lr_final, max_steps))  # noqa: E731
    assert lr(0) == pytest.approx(mult * lr_init, rel=1e-12)
    for s in [1, 100, 256, 511]:
        warm = mult + (1 - mult) * pymath.sin(0.5 * pymath.pi * s / delay)
        assert lr(s) == pytest.approx(warm * lr_init * (lr_final / lr_init) ** (s / max_steps), rel=1e-12)
    for s in [512, 1000, 250000, 300000]:
        assert lr(s) == pytest.approx(base(s), rel=1e-12)
    assert lr(max_steps) == pytest.approx(lr_final, rel=1e-12)
    # Tensor steps give the same values, in the step's dtype.
    steps = torch.tensor([0.0, 256.0, 1000.0], dtype=F64)
    np.testing.assert_allclose(
        math.learning_rate_decay(steps, lr_init, lr_final, max_steps, delay, mult).numpy(),
        [lr(0), lr(256), lr(1000)], rtol=1e-12)


def test_log_lerp_rejects_nonpositive():
    with pytest.raises(ValueError):
        math.log_lerp(0.5, 0.0, 1.0)
    with pytest.raises(ValueError):
        math.log_lerp(0.5, 1.0, -1.0)
    assert float(math.log_lerp(0.25, 1.0, 16.0)) == pytest.approx(2.0, rel=1e-12)
    assert float(math.log_lerp(7.0, 1.0, 16.0)) == pytest.approx(16.0, rel=1e-12)


# ---------------------------------------------------------------- interp / sorted_interp


def _rows(gen, n, d0, d1, dtype=F64):
    x = torch.randn(n, d0, generator=gen, dtype=dtype) * 1.5
    xp = torch.sort(torch.randn(n, d1, generator=gen, dtype=dtype), dim=-1).values
    fp = torch.randn(n, d1, generator=gen, dtype=dtype)
    return x, xp, fp


@pytest.mark.parametrize('sort_fp', [False, True])
def test_interp_matches_numpy(sort_fp):
    gen = torch.Generator().manual_seed(0)
    x, xp, fp = _rows(gen, 100, 10, 20)
    if sort_fp:
        fp = torch.sort(fp, dim=-1).values
    # Include queries exactly on knots and outside the range.
    x[:, 0] = xp[:, 3]
    x[:, 1] = xp[:, 0] - 1
    x[:, 2] = xp[:, -1] + 1
    x[:, 3] = xp[:, -1]
    z = math.interp(x, xp, fp)
    z_true = np.stack([np.interp(x[i], xp[i], fp[i]) for i in range(len(x))])
    np.testing.assert_allclose(z.numpy(), z_true, atol=1e-12)
    if sort_fp:
        np.testing.assert_allclose(math.sorted_interp(x, xp, fp).numpy(), z_true, atol=1e-12)


def test_interp_broadcasts_leading_dims():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 7, generator=gen, dtype=F64)
    xp = torch.linspace(0, 1, 5, dtype=F64)[None, None]  # [1, 1, 5]
    fp = torch.rand(4, 1, 5, generator=gen, dtype=F64).cumsum(-1)
    expected = np.stack([[np.interp(x[i, j], xp[0, 0], fp[i, 0]) for j in range(3)] for i in range(4)])
    for fn in (math.interp, math.sorted_interp):
        out = fn(x, xp, fp)
        assert out.shape == (4, 3, 7)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_sorted_interp_repeated_knots_and_gradients():
    # A CDF with a flat step: the knot 0.5 appears twice. A query on it takes the value at the last copy.
    xp = torch.tensor([[0.0, 0.5, 0.5, 1.0]], dtype=F64)
    fp = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=F64, requires_grad=True)
    x = torch.tensor([[0.25, 0.5, 0.75, 1.0, 2.0, -1.0]], dtype=F64)
    out = math.sorted_interp(x, xp, fp)
    np.testing.assert_allclose(out.detach().numpy(), [[0.5, 2.0, 2.5, 3.0, 3.0, 0.0]], atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(fp.grad).all()
    out_g = math.interp(x, xp, fp)
    np.testing.assert_allclose(out_g.detach().numpy(), [[0.5, 2.0, 2.5, 3.0, 3.0, 0.0]], atol=1e-12)


# ---------------------------------------------------------------- matmul


def test_matmul_full_precision_even_with_reduced_precision_settings():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(64, 3, 3, generator=gen)
    b = torch.randn(64, 3, 5, generator=gen)
    ref = a.double() @ b.double()
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('medium')
        out = math.matmul(a, b)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out_ac = math.matmul(a, b)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert out.dtype == torch.float32 and out_ac.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_ac.double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(math.matmul(a.double(), b.double()).numpy(), ref.numpy(), rtol=1e-14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_matmul_cuda_ignores_tf32():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4096, 3, 3, generator=gen)
    b = torch.randn(3, 21, generator=gen)
    ref = (a.double() @ b.double()).numpy()
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        out = math.matmul(a.cuda(), b.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    x = torch.tensor([1e4, 1e9, -3e7], device='cuda')
    expected = [pymath.sin(_reduced(v, float(torch.tensor(100 * pymath.pi)))) for v in x.tolist()]
    np.testing.assert_allclose(math.safe_sin(x).cpu().numpy(), expected, atol=2e-6)
