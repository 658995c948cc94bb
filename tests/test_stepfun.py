"""Tests for mipnerf360.stepfun: float64 brute force, quadrature, sampling statistics and properties."""

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mipnerf360 import stepfun

F64 = torch.float64


def _sorted_t(gen, batch, n, lo=0.0, hi=1.0):
    """[*batch, n] sorted endpoints in [lo, hi]."""
    return lo + (hi - lo) * torch.sort(torch.rand(*batch, n, generator=gen, dtype=F64), dim=-1).values


def _weights(gen, batch, n, zero_frac=0.0):
    w = torch.rand(*batch, n, generator=gen, dtype=F64) ** 3
    if zero_frac > 0:
        w = torch.where(torch.rand(*batch, n, generator=gen, dtype=F64) < zero_frac, torch.zeros_like(w), w)
        w[..., 0] += 1e-3
    return w / w.sum(-1, keepdim=True)


def _step_cdf(x, t, w):
    """Exact CDF at x of the piecewise-uniform density with endpoints t and bin masses w (numpy, 1D)."""
    x = np.asarray(x, dtype=np.float64)[..., None]
    frac = np.clip((x - t[:-1]) / np.maximum(t[1:] - t[:-1], 1e-300), 0, 1)
    return np.sum(w * frac, axis=-1)


def _overlap(a0, a1, b0, b1):
    return np.maximum(0.0, np.minimum(a1, b1) - np.maximum(a0, b0))


# ---------------------------------------------------------------- searchsorted / query


def test_searchsorted_matches_brute_force_and_broadcasts():
    gen = torch.Generator().manual_seed(0)
    a = _sorted_t(gen, (5,), 12)
    a[:, 4] = a[:, 3]  # A repeated value.
    v = torch.rand(5, 40, generator=gen, dtype=F64) * 1.4 - 0.2
    v[:, :12] = a  # Queries exactly on the points.
    lo, hi = stepfun.searchsorted(a, v)
    for i in range(5):
        for j in range(40):
            ge = [k for k in range(12) if v[i, j] >= a[i, k]]
            gt = [k for k in range(12) if v[i, j] < a[i, k]]
            assert lo[i, j] == (max(ge) if ge else 0)
            assert hi[i, j] == (min(gt) if gt else 11)
    # A single row of points broadcast against many query rows.
    lo1, hi1 = stepfun.searchsorted(a[:1], v)
    lo2, hi2 = stepfun.searchsorted(a[:1].expand(5, 12), v)
    assert torch.equal(lo1, lo2) and torch.equal(hi1, hi2)


def test_query_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    t = _sorted_t(gen, (3,), 9)
    y = torch.randn(3, 8, generator=gen, dtype=F64)
    tq = torch.rand(3, 100, generator=gen, dtype=F64) * 1.4 - 0.2
    yq = stepfun.query(tq, t, y, outside_value=-5.0)
    for i in range(3):
        for j in range(100):
            k = np.searchsorted(t[i].numpy(), tq[i, j].item(), side='right') - 1
            expected = y[i, k].item() if 0 <= k < 8 else -5.0
            assert yq[i, j].item() == expected


# ---------------------------------------------------------------- inner_outer / lossfun_outer


def test_inner_outer_matches_brute_force():
    gen = torch.Generator().manual_seed(2)
    t0 = _sorted_t(gen, (6,), 11, -0.1, 1.1)
    t1 = _sorted_t(gen, (6,), 17)
    y1 = torch.rand(6, 16, generator=gen, dtype=F64)
    inner, outer = stepfun.inner_outer(t0, t1, y1)
    for b in range(6):
        a, c, y = t0[b].numpy(), t1[b].numpy(), y1[b].numpy()
        for i in range(10):
            touches = (c[:-1] < a[i + 1]) & (c[1:] > a[i])
            inside = (c[:-1] >= a[i]) & (c[1:] <= a[i + 1])
            assert outer[b, i].item() == pytest.approx(y[touches].sum(), abs=1e-12)
            assert inner[b, i].item() == pytest.approx(y[inside].sum(), abs=1e-12)
    assert (inner <= outer + 1e-12).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10000), st.integers(2, 20), st.integers(2, 20))
def test_lossfun_outer_properties(seed, n, m):
    gen = torch.Generator().manual_seed(seed)
    t = _sorted_t(gen, (4,), n + 1)
    w = _weights(gen, (4,), n, zero_frac=0.3)
    t_env = _sorted_t(gen, (4,), m + 1)
    w_env = _weights(gen, (4,), m)
    loss = stepfun.lossfun_outer(t, w, t_env, w_env)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    # The step function against itself, and against any coarsening of itself, costs nothing.
    # (Up to cumulative-sum rounding, so the check is on the excess w - w_outer recovered from the loss.)
    excess = lambda loss: torch.sqrt(loss * (w + torch.finfo(F64).eps))  # noqa: E731
    assert (excess(stepfun.lossfun_outer(t, w, t, w)) <= 1e-14).all()
    keep = torch.sort(torch.randperm(n - 1, generator=gen)[: max(1, (n - 1) // 2)] + 1).values
    idx = torch.cat([torch.tensor([0]), keep, torch.tensor([n])])
    cw = torch.cat([torch.zeros(4, 1, dtype=F64), w.cumsum(-1)], -1)
    w_coarse = torch.diff(cw[:, idx], dim=-1)
    assert (excess(stepfun.lossfun_outer(t, w, t[:, idx], w_coarse)) <= 1e-14).all()
    # Enlarging the envelope never increases the loss.
    assert (stepfun.lossfun_outer(t, w, t_env, 2 * w_env) <= loss + 1e-15).all()


def test_lossfun_outer_closed_form():
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    w = torch.tensor([0.8, 0.2], dtype=F64)
    t_env = torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=F64)
    w_env = torch.tensor([0.1, 0.3, 0.05], dtype=F64)
    # Outer measure of [0, 1] is 0.1 + 0.3, of [1, 2] is 0.3 + 0.05.
    expected = [(0.8 - 0.4) ** 2 / 0.8, 0.0]
    np.testing.assert_allclose(stepfun.lossfun_outer(t, w, t_env, w_env, eps=0).numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------- pdf <-> weight, max_dilate


def test_weight_pdf_round_trip():
    gen = torch.Generator().manual_seed(3)
    t = _sorted_t(gen, (4,), 10)
    w = _weights(gen, (4,), 9)
    p = stepfun.weight_to_pdf(t, w)
    np.testing.assert_allclose(p.numpy(), (w / torch.diff(t)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stepfun.pdf_to_weight(t, p).numpy(), w.numpy(), rtol=1e-12)
    # Empty intervals do not divide by zero.
    t[:, 3] = t[:, 2]
    assert torch.isfinite(stepfun.weight_to_pdf(t, w)).all()


def _max_dilate_brute(t, w, dilation):
    """The reference's O(n^2) definition: max over all bins of w[j] if bin j is within `dilation`, else 0."""
    t0 = t[..., :-1] - dilation
    t1 = t[..., 1:] + dilation
    td = torch.sort(torch.cat([t, t0, t1], -1), -1).values
    inside = (t0[..., None, :] <= td[..., None]) & (t1[..., None, :] > td[..., None])
    return td, torch.where(inside, w[..., None, :], torch.zeros_like(w[..., None, :])).max(-1).values[..., :-1]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10000), st.integers(1, 70), st.floats(0.0, 0.3))
def test_max_dilate_matches_definition(seed, n, dilation):
    gen = torch.Generator().manual_seed(seed)
    t = _sorted_t(gen, (3,), n + 1)
    w = torch.randn(3, n, generator=gen, dtype=F64)  # Signed values exercise the implicit zeros too.
    w[0] = w[0].abs()
    td, wd = stepfun.max_dilate(t, w, dilation)
    td_ref, wd_ref = _max_dilate_brute(t, w, dilation)
    assert torch.equal(td, td_ref)
    assert torch.equal(wd, wd_ref)


def test_max_dilate_properties():
    gen = torch.Generator().manual_seed(4)
    t = _sorted_t(gen, (8,), 33)
    w = torch.rand(8, 32, generator=gen, dtype=F64)
    x = torch.rand(8, 2000, generator=gen, dtype=F64) * 1.2 - 0.1
    # Zero dilation leaves the step function unchanged (as a function).
    td, wd = stepfun.max_dilate(t, w, 0.0)
    assert torch.equal(stepfun.query(x, td, wd), stepfun.query(x, t, w))
    # Positive dilation: pointwise max of the original over [x - d, x + d] (checked on a dense grid).
    d = 0.05
    td, wd = stepfun.max_dilate(t, w, d)
    got = stepfun.query(x, td, wd)
    offsets = torch.linspace(-d, d, 401, dtype=F64)
    shifted = stepfun.query((x[..., None] + offsets).reshape(8, -1), t, w).reshape(8, 2000, 401)
    dense = shifted.max(-1).values
    # The dense grid can only under-estimate the window maximum, and it misses it only near a bin edge.
    assert (got >= dense).all()
    assert (got == dense).float().mean() > 0.97
    assert (got >= stepfun.query(x, t, w)).all()
    # Clipping to a domain.
    td, _ = stepfun.max_dilate(t, w, d, domain=(0.1, 0.9))
    assert td.min() >= 0.1 and td.max() <= 0.9 and (torch.diff(td) >= 0).all()


def test_max_dilate_weights_renormalizes_and_covers():
    gen = torch.Generator().manual_seed(5)
    t = _sorted_t(gen, (6,), 21)
    w = _weights(gen, (6,), 20, zero_frac=0.5)
    td, wd = stepfun.max_dilate_weights(t, w, 0.02, domain=(0.0, 1.0), renormalize=True)
    np.testing.assert_allclose(wd.sum(-1).numpy(), 1.0, rtol=1e-12)
    td, wd = stepfun.max_dilate_weights(t, w, 0.02)
    # Dilated density dominates the original density everywhere.
    x = torch.rand(6, 1000, generator=gen, dtype=F64)
    p = stepfun.query(x, t, stepfun.weight_to_pdf(t, w))
    pd = stepfun.query(x, td, stepfun.weight_to_pdf(td, wd))
    assert (pd >= p * (1 - 1e-12)).all()
    assert (wd.sum(-1) >= 1 - 1e-12).all()


# ---------------------------------------------------------------- CDF, inversion and sampling


def test_integrate_weights_and_invert_cdf_round_trip():
    gen = torch.Generator().manual_seed(6)
    t = _sorted_t(gen, (5, 3), 17)
    logits = torch.randn(5, 3, 16, generator=gen, dtype=F64)
    w = torch.softmax(logits, -1)
    cw = stepfun.integrate_weights(w)
    assert (cw[..., 0] == 0).all() and (cw[..., -1] == 1).all() and (torch.diff(cw) >= 0).all()
    np.testing.assert_allclose(cw[..., 1:-1].numpy(), w.cumsum(-1)[..., :-1].numpy(), atol=1e-15)
    # Inverting the CDF at its own knots gives back the endpoints.
    for gpu in (False, True):
        t_back = stepfun.invert_cdf(cw[..., :-1], t, logits, use_gpu_resampling=gpu)
        np.testing.assert_allclose(t_back.numpy(), t[..., :-1].numpy(), atol=1e-12)
    # And F(F^-1(u)) = u for the exact CDF.
    u = torch.rand(5, 3, 50, generator=gen, dtype=F64)
    x = stepfun.invert_cdf(u, t, logits)
    for i in range(5):
        for j in range(3):
            np.testing.assert_allclose(_step_cdf(x[i, j].numpy(), t[i, j].numpy(), w[i, j].numpy()),
                                       u[i, j].numpy(), atol=1e-12)


@pytest.mark.parametrize('single_jitter', [False, True])
def test_sample_histogram_matches_pdf(single_jitter):
    gen = torch.Generator().manual_seed(7)
    t = torch.tensor([0.0, 0.1, 0.15, 0.4, 0.5, 0.55, 0.8, 1.0], dtype=F64)
    w = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.25, 0.2, 0.05], dtype=F64)
    logits = torch.log(w).expand(4000, 7)
    tt = t.expand(4000, 8)
    s = stepfun.sample(gen, tt, logits, 16, single_jitter=single_jitter)
    assert (torch.diff(s) >= 0).all() and s.min() >= 0 and s.max() < 1
    counts = np.histogram(s.numpy().ravel(), bins=t.numpy())[0]
    n = s.numel()
    assert counts[2] == 0  # Zero-weight bins never get samples.
    nz = w.numpy() > 0
    expected = n * w.numpy()[nz]
    chi2 = np.sum((counts[nz] - expected) ** 2 / expected)
    assert chi2 < scipy.stats.chi2.ppf(0.9999, df=nz.sum() - 1)
    # Within a bin the samples are uniform.
    inside = s[(s >= 0.15 + 0.25) & (s < 0.5)].numpy()
    assert scipy.stats.kstest((inside - 0.4) / 0.1, 'uniform').pvalue > 1e-4


def test_sample_stratification_and_determinism():
    gen = torch.Generator().manual_seed(8)
    t = torch.linspace(0, 1, 11, dtype=F64).expand(300, 11)
    logits = torch.zeros(300, 10, dtype=F64)
    k = 8
    s = stepfun.sample(gen, t, logits, k)
    # Under a uniform pdf the samples are u itself: sample i lies in its own stratum of width ~1/k.
    eps = torch.finfo(F64).eps  # The float32 epsilon of the reference, or the dtype's when smaller.
    u_max = eps + (1 - eps) / k
    step = (1 - u_max) / (k - 1)
    lo = torch.arange(k, dtype=F64) * step
    assert ((s >= lo - 1e-12) & (s <= lo + step + 1e-12)).all()
    # single_jitter: one offset per ray.
    s1 = stepfun.sample(gen, t, logits, k, single_jitter=True)
    np.testing.assert_allclose(torch.diff(s1).numpy(), step, atol=1e-12)
    # Same seed, same draws; no generator, deterministic.
    a = stepfun.sample(torch.Generator().manual_seed(3), t, logits, k)
    b = stepfun.sample(torch.Generator().manual_seed(3), t, logits, k)
    assert torch.equal(a, b)
    c = stepfun.sample(None, t, logits, k)
    np.testing.assert_allclose(c[0].numpy(), np.linspace(0, 1 - eps, k), atol=1e-12)


def test_sample_deterministic_center():
    gen = torch.Generator().manual_seed(9)
    k = 10
    # Uniform pdf on [0, 1]: the centres of k equal strata.
    t = torch.linspace(0, 1, 5, dtype=F64)[None]
    s = stepfun.sample(None, t, torch.zeros(1, 4, dtype=F64), k, deterministic_center=True)
    eps = torch.finfo(F64).eps  # The float32 epsilon of the reference, or the dtype's when smaller.
    np.testing.assert_allclose(s[0].numpy(), np.linspace(0.5 / k, 1 - 0.5 / k - eps, k), atol=1e-12)
    # A general pdf: the inverse CDF at those u.
    t = _sorted_t(gen, (3,), 9)
    w = _weights(gen, (3,), 8)
    s = stepfun.sample(None, t, torch.log(w), k, deterministic_center=True)
    u = np.linspace(0.5 / k, 1 - 0.5 / k - eps, k)
    for i in range(3):
        np.testing.assert_allclose(_step_cdf(s[i].numpy(), t[i].numpy(), w[i].numpy()), u, atol=1e-12)


def test_sample_intervals():
    gen = torch.Generator().manual_seed(10)
    t = _sorted_t(gen, (2, 5), 13)
    w = _weights(gen, (2, 5), 12, zero_frac=0.3)
    logits = torch.where(torch.diff(t) > 0, torch.log(w + 1e-3), -torch.inf)
    for rng in (None, gen):
        ts = stepfun.sample_intervals(rng, t, logits, 16, single_jitter=True, domain=(0.0, 1.0))
        assert ts.shape == (2, 5, 17)
        assert (torch.diff(ts) >= 0).all() and ts.min() >= 0 and ts.max() <= 1
    centers = stepfun.sample(None, t, logits, 16, deterministic_center=True)
    ts = stepfun.sample_intervals(None, t, logits, 16)
    np.testing.assert_allclose(ts[..., 1:-1].numpy(), ((centers[..., 1:] + centers[..., :-1]) / 2).numpy())
    np.testing.assert_allclose(ts[..., 0].numpy(), (2 * centers[..., 0] - ts[..., 1]).numpy())
    np.testing.assert_allclose(ts[..., -1].numpy(), (2 * centers[..., -1] - ts[..., -2]).numpy())
    with pytest.raises(ValueError):
        stepfun.sample_intervals(None, t, logits, 1)


# ---------------------------------------------------------------- distortion


def _quadrature_distortion(t, w, k=300):
    """Double integral of w(x) w(y) |x - y| by the midpoint rule with k nodes per bin (numpy, 1D)."""
    h = (t[1:] - t[:-1]) / k
    x = (t[:-1, None] + (np.arange(k) + 0.5) * h[:, None]).ravel()
    m = np.repeat(w / k, k)  # Mass of each node.
    total = np.sum(m[:, None] * m[None, :] * np.abs(x[:, None] - x[None, :]))
    # Each node's mass against itself: the midpoint rule gives 0, the true value is mass^2 * h / 3.
    return total + np.sum(m**2 * np.repeat(h, k)) / 3


def test_lossfun_distortion_matches_double_integral():
    gen = torch.Generator().manual_seed(11)
    t = _sorted_t(gen, (4,), 9)
    w = torch.rand(4, 8, generator=gen, dtype=F64)  # Need not sum to 1.
    loss = stepfun.lossfun_distortion(t, w)
    for i in range(4):
        expected = _quadrature_distortion(t[i].numpy(), w[i].numpy())
        assert loss[i].item() == pytest.approx(expected, rel=1e-5)
    # ... and equals the sum of pairwise interval distortions.
    t0, t1 = t[..., :-1], t[..., 1:]
    pair = stepfun.interval_distortion(t0[..., :, None], t1[..., :, None], t0[..., None, :], t1[..., None, :])
    np.testing.assert_allclose(loss.numpy(), torch.einsum('bi,bj,bij->b', w, w, pair).numpy(), rtol=1e-12)


def test_lossfun_distortion_gradients():
    gen = torch.Generator().manual_seed(12)
    t = _sorted_t(gen, (3,), 7).requires_grad_()
    w = torch.rand(3, 6, generator=gen, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(stepfun.lossfun_distortion, (t, w))


def test_interval_distortion_matches_quadrature():
    gen = torch.Generator().manual_seed(13)
    k = 1500
    for _ in range(6):
        a = torch.sort(torch.rand(2, generator=gen, dtype=F64)).values
        b = torch.sort(torch.rand(2, generator=gen, dtype=F64)).values
        xa = a[0].item() + (np.arange(k) + 0.5) / k * (a[1] - a[0]).item()
        xb = b[0].item() + (np.arange(k) + 0.5) / k * (b[1] - b[0]).item()
        expected = np.mean(np.abs(xa[:, None] - xb[None, :]))
        got = stepfun.interval_distortion(a[0], a[1], b[0], b[1]).item()
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # An interval against itself: width / 3.
    lo, hi = torch.tensor(0.2, dtype=F64), torch.tensor(0.7, dtype=F64)
    assert stepfun.interval_distortion(lo, hi, lo, hi).item() == pytest.approx(0.5 / 3, rel=1e-12)
    # A single interval's distortion loss is w^2 width / 3.
    assert stepfun.lossfun_distortion(torch.stack([lo, hi])[None], torch.tensor([[0.6]], dtype=F64)).item() == \
        pytest.approx(0.36 * stepfun.interval_distortion(lo, hi, lo, hi).item(), rel=1e-12)


# ---------------------------------------------------------------- weighted_percentile, resample


def test_weighted_percentile_matches_brute_force():
    gen = torch.Generator().manual_seed(14)
    t = _sorted_t(gen, (5,), 11)
    w = _weights(gen, (5,), 10)
    ps = [0.0, 2.5, 25.0, 50.0, 75.0, 97.5, 100.0]
    out = stepfun.weighted_percentile(t, w, ps)
    for i in range(5):
        np.testing.assert_allclose(_step_cdf(out[i].numpy(), t[i].numpy(), w[i].numpy()), np.array(ps) / 100,
                                   atol=1e-12)
        # Brute force: bisection on the exact CDF.
        for j, p in enumerate(ps[1:-1], 1):
            lo, hi = t[i, 0].item(), t[i, -1].item()
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _step_cdf(mid, t[i].numpy(), w[i].numpy()) < p / 100 else (lo, mid)
            assert out[i, j].item() == pytest.approx(lo, abs=1e-10)
    # Median of a uniform distribution.
    tu = torch.tensor([[2.0, 3.0, 4.0]], dtype=F64)
    assert stepfun.weighted_percentile(tu, torch.tensor([[0.5, 0.5]], dtype=F64), [50]).item() == 3.0


def test_resample_conserves_mass_and_matches_integral():
    gen = torch.Generator().manual_seed(15)
    tp = _sorted_t(gen, (4,), 13)
    vp = torch.rand(4, 12, generator=gen, dtype=F64)
    t = _sorted_t(gen, (4,), 8, -0.1, 1.1)
    t[:, 0], t[:, -1] = -0.2, 1.2  # Covers the whole support.
    v = stepfun.resample(t, tp, vp)
    np.testing.assert_allclose(v.sum(-1).numpy(), vp.sum(-1).numpy(), rtol=1e-12)
    v_avg = stepfun.resample(t, tp, vp, use_avg=True)
    for b in range(4):
        a0, a1, c0, c1 = t[b, :-1, None], t[b, 1:, None], tp[b, None, :-1], tp[b, None, 1:]
        ov = _overlap(a0.numpy(), a1.numpy(), c0.numpy(), c1.numpy())  # [n, m]
        frac = ov / (c1 - c0).numpy()
        np.testing.assert_allclose(v[b].numpy(), (frac * vp[b].numpy()).sum(-1), atol=1e-12)
        expected_avg = (ov * vp[b].numpy()).sum(-1) / np.maximum(ov.sum(-1), np.finfo(np.float32).eps)
        np.testing.assert_allclose(v_avg[b].numpy(), expected_avg, atol=1e-12)
    # Averaging a constant function gives that constant wherever there is support.
    const = stepfun.resample(tp[:, ::3], tp, torch.full_like(vp, 2.5), use_avg=True)
    np.testing.assert_allclose(const.numpy(), 2.5, rtol=1e-12)


# ---------------------------------------------------------------- dtype and device


def test_float32_matches_float64():
    gen = torch.Generator().manual_seed(16)
    t = _sorted_t(gen, (64,), 33)
    w = _weights(gen, (64,), 32, zero_frac=0.2)
    logits = torch.log(w + 1e-2)
    f64 = stepfun.sample_intervals(None, t, logits, 24, domain=(0.0, 1.0))
    f32 = stepfun.sample_intervals(None, t.float(), logits.float(), 24, domain=(0.0, 1.0))
    assert f32.dtype == torch.float32
    np.testing.assert_allclose(f32.double().numpy(), f64.numpy(), atol=1e-4)
    d64 = stepfun.lossfun_distortion(t, w)
    d32 = stepfun.lossfun_distortion(t.float(), w.float())
    np.testing.assert_allclose(d32.double().numpy(), d64.numpy(), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(17)
    t = _sorted_t(gen, (256,), 65).float()
    w = _weights(gen, (256,), 64, zero_frac=0.3).float()
    td, wd = stepfun.max_dilate_weights(t, w, 0.01, domain=(0.0, 1.0), renormalize=True)
    tdc, wdc = stepfun.max_dilate_weights(t.cuda(), w.cuda(), 0.01, domain=(0.0, 1.0), renormalize=True)
    np.testing.assert_allclose(tdc.cpu().numpy(), td.numpy(), atol=1e-6)
    np.testing.assert_allclose(wdc.cpu().numpy(), wd.numpy(), atol=1e-5)
    s = stepfun.sample_intervals(torch.Generator('cuda').manual_seed(0), t.cuda(), torch.log(w.cuda() + 1e-3),
                                 32, single_jitter=True, domain=(0.0, 1.0))
    assert s.is_cuda and (torch.diff(s) >= 0).all()
    np.testing.assert_allclose(stepfun.lossfun_distortion(t.cuda(), w.cuda()).cpu().numpy(),
                               stepfun.lossfun_distortion(t, w).numpy(), rtol=1e-5)


def test_stepfun_sample_with_predrawn_jitter_matches_generator():
    t = torch.sort(torch.rand(4, 9, generator=torch.Generator().manual_seed(1)), dim=-1)[0]
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    for single in (True, False):
        drawn = stepfun.sample(torch.Generator().manual_seed(3), t, logits, 6, single_jitter=single)
        jitter = stepfun.draw_jitter(torch.Generator().manual_seed(3), (4,), 6, single)
        assert jitter.shape == (4, 1 if single else 6)
        assert torch.equal(stepfun.sample(None, t, logits, 6, single_jitter=single, jitter=jitter), drawn)
        intervals = stepfun.sample_intervals(torch.Generator().manual_seed(3), t, logits, 6, single, (0., 1.))
        assert torch.equal(stepfun.sample_intervals(None, t, logits, 6, single, (0., 1.), jitter=jitter), intervals)
    with pytest.raises(ValueError, match='either rng or'):
        stepfun.sample(torch.Generator(), t, logits, 6, jitter=jitter)
