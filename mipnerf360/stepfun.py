"""Piecewise-constant 1D functions ("step functions") along rays (port of multinerf's `internal/stepfun.py`).

Symbols, all aligned along the last axis:
  t  [..., n+1]  sorted endpoints (fenceposts) of n bins; bin i is [t[i], t[i+1]).
  y  [..., n]    arbitrary values on the bins.
  w  [..., n]    non-negative bin weights summing to (at most) 1, e.g. volume-rendering weights.
  p  [..., n]    non-negative bin densities integrating to (at most) 1: p = w / diff(t).
Equation numbers refer to mip-NeRF 360 (Barron et al., CVPR 2022, arXiv:2111.12077).

All functions are pure, differentiable where the reference is, batched over leading dimensions and free of
host syncs; they take their device and dtype from their inputs. Randomness comes only from an explicit
`torch.Generator` (None means deterministic), or from values drawn from one beforehand (`draw_jitter`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from mipnerf360 import math

Domain = Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]]


def _default_eps(dtype: torch.dtype) -> float:
    """The reference's float32 machine epsilon, or the dtype's own epsilon when the dtype is more precise."""
    return min(torch.finfo(torch.float32).eps, torch.finfo(dtype).eps)


def _expand_leading(a: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Broadcast the leading (all but last) dims of a and v against each other; return contiguous tensors."""
    lead = torch.broadcast_shapes(a.shape[:-1], v.shape[:-1])
    return a.expand(*lead, a.shape[-1]).contiguous(), v.expand(*lead, v.shape[-1]).contiguous()


def _clip_to_domain(x: torch.Tensor, domain: Tuple[Union[None, float, torch.Tensor],
                                                  Union[None, float, torch.Tensor]]) -> torch.Tensor:
    """x clipped to [domain[0], domain[1]] (None: unbounded on that side); bounds may be numbers or tensors.

    Numbers are applied as scalars, so nothing is copied from the host to the device. NaNs propagate.
    """
    lo, hi = domain
    if isinstance(lo, torch.Tensor):
        x = torch.maximum(x, lo.to(x.dtype))
    elif lo is not None:
        x = torch.clamp_min(x, lo)
    if isinstance(hi, torch.Tensor):
        x = torch.minimum(x, hi.to(x.dtype))
    elif hi is not None:
        x = torch.clamp_max(x, hi)
    return x


def searchsorted(a: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bracketing indices of each query v in the sorted sequence a.

    Args:
        a: [..., m] sorted reference points.
        v: [..., q] query points (need not be sorted); leading dims broadcast with a's.

    Returns:
        (idx_lo, idx_hi), [..., q] int64 each, with a[idx_lo] <= v < a[idx_hi] when a[0] <= v < a[-1].
        Below a[0] both are 0; at or above a[-1] both are m - 1.
    """
    a, v = _expand_leading(a, v)
    m = a.shape[-1]
    k = torch.searchsorted(a, v, right=True)  # How many a's are <= v.
    return torch.clamp_min(k - 1, 0), torch.clamp_max(k, m - 1)


def query(tq: torch.Tensor, t: torch.Tensor, y: torch.Tensor, outside_value: float = 0) -> torch.Tensor:
    """Evaluate the step function (t, y) at points tq.

    Args:
        tq: [..., q] query points.
        t: [..., n+1] endpoints.
        y: [..., n] bin values.
        outside_value: value returned outside [t[0], t[-1]).

    Returns:
        [..., q] values.
    """
    idx_lo, idx_hi = searchsorted(t, tq)
    y = y.expand(*idx_lo.shape[:-1], y.shape[-1])
    yq = torch.gather(y, -1, torch.clamp_max(idx_lo, y.shape[-1] - 1))
    # A Python scalar in torch.where needs no host-to-device copy.
    return torch.where(idx_lo == idx_hi, outside_value, yq)


def inner_outer(t0: torch.Tensor, t1: torch.Tensor, y1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inner and outer measures of the step function (t1, y1) on the bins of t0 (Eq. 14 of the paper).

    The outer measure of bin [t0[i], t0[i+1]) is the summed y1 of every t1 bin that overlaps it; the inner
    measure is the summed y1 of the t1 bins that lie entirely inside it.

    Args:
        t0: [..., n+1] endpoints to measure on.
        t1: [..., m+1] endpoints of the step function.
        y1: [..., m] its bin masses.

    Returns:
        (y0_inner, y0_outer), [..., n] each.
    """
    cy1 = torch.cat([torch.zeros_like(y1[..., :1]), torch.cumsum(y1, dim=-1)], dim=-1)
    idx_lo, idx_hi = searchsorted(t1, t0)
    cy1 = cy1.expand(*idx_lo.shape[:-1], cy1.shape[-1])
    cy1_lo = torch.gather(cy1, -1, idx_lo)
    cy1_hi = torch.gather(cy1, -1, idx_hi)
    y0_outer = cy1_hi[..., 1:] - cy1_lo[..., :-1]
    y0_inner = torch.where(idx_hi[..., :-1] <= idx_lo[..., 1:], cy1_lo[..., 1:] - cy1_hi[..., :-1],
                           torch.zeros_like(y0_outer))
    return y0_inner, y0_outer


def lossfun_outer(t: torch.Tensor,
                  w: torch.Tensor,
                  t_env: torch.Tensor,
                  w_env: torch.Tensor,
                  eps: Optional[float] = None) -> torch.Tensor:
    """Proposal loss (Eq. 13): penalises w wherever it exceeds the outer measure of (t_env, w_env).

    Args:
        t: [..., n+1] endpoints of the (NeRF) weights.
        w: [..., n] weights that should be bounded from above.
        t_env: [..., m+1] endpoints of the (proposal) envelope.
        w_env: [..., m] envelope weights.
        eps: guards the division; float32 epsilon (or the dtype's, if smaller) by default.

    Returns:
        [..., n] max(0, w - w_outer)^2 / (w + eps).
    """
    if eps is None:
        eps = _default_eps(w.dtype)
    _, w_outer = inner_outer(t, t_env, w_env)
    # Only the excess over the outer measure is penalised: raising the envelope is what we want.
    return torch.clamp_min(w - w_outer, 0) ** 2 / (w + eps)


def weight_to_pdf(t: torch.Tensor, w: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
    """Bin weights [..., n] to densities [..., n] by dividing by the bin widths (floored at eps)."""
    if eps is None:
        eps = _default_eps(w.dtype) ** 2
    return w / torch.clamp_min(t[..., 1:] - t[..., :-1], eps)


def pdf_to_weight(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Bin densities [..., n] to weights [..., n] by multiplying by the bin widths."""
    return p * (t[..., 1:] - t[..., :-1])


def _floor_log2_table(n: int, device: torch.device) -> torch.Tensor:
    """[n+1] int64 table with entry i = floor(log2(i)) for i >= 1 (entry 0 is 0)."""
    i = torch.arange(n + 1, device=device)
    out = torch.zeros_like(i)
    for k in range(1, max(n, 1).bit_length()):
        out = out + (i >= (1 << k)).long()
    return out


def _range_max(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max(w[..., lo:hi]) for every pair of query bounds, via a sparse table (O(n log n) memory per row).

    Args:
        w: [..., n] values.
        lo, hi: [..., q] int64 bounds with 0 <= lo, hi <= n and matching leading dims.

    Returns:
        [..., q] maxima; entries with hi <= lo are meaningless and must be masked by the caller.
    """
    n = w.shape[-1]
    levels = [w]
    span = 1
    while 2 * span <= n:
        prev = levels[-1]
        nxt = torch.maximum(prev[..., :-span], prev[..., span:])
        levels.append(torch.cat([nxt, prev[..., nxt.shape[-1]:]], dim=-1))  # Pad back to length n.
        span *= 2
    table = torch.stack(levels, dim=-2).reshape(*w.shape[:-1], len(levels) * n)
    length = torch.clamp_min(hi - lo, 1)
    k = _floor_log2_table(n, w.device)[torch.clamp_max(length, n)]
    i0 = k * n + torch.clamp(lo, 0, n - 1)
    i1 = k * n + torch.clamp(hi - (1 << k), 0, n - 1)
    return torch.maximum(torch.gather(table, -1, i0), torch.gather(table, -1, i1))


def max_dilate(t: torch.Tensor,
               w: torch.Tensor,
               dilation: Union[float, torch.Tensor],
               domain: Domain = (-float('inf'), float('inf'))) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dilate a non-negative step function by max-pooling over a window of half-width `dilation`.

    The result at a point x is the largest w[j] among the bins j that come within `dilation` of x, i.e.
    t[j] - dilation <= x < t[j+1] + dilation (0 if there is none). Its endpoints are the union of t,
    t - dilation and t + dilation, sorted and clipped to `domain`.

    Args:
        t: [..., n+1] sorted endpoints.
        w: [..., n] non-negative bin values.
        dilation: the half-width of the max-pooling window (number, or tensor broadcasting to [..., 1]).
        domain: (min, max) to which the new endpoints are clipped.

    Returns:
        (t_dilate, w_dilate): [..., 3n+1] endpoints and [..., 3n] values.
    """
    n = w.shape[-1]
    t0 = t[..., :-1] - dilation
    t1 = t[..., 1:] + dilation
    t_dilate, _ = torch.sort(torch.cat([t, t0, t1], dim=-1), dim=-1)
    t_dilate = _clip_to_domain(t_dilate, domain)
    # Bins with t0[j] <= x are j < a; bins with t1[j] > x are j >= b (t0 and t1 are both sorted).
    lead = torch.broadcast_shapes(t_dilate.shape[:-1], w.shape[:-1])
    t_q = t_dilate[..., :-1].expand(*lead, t_dilate.shape[-1] - 1).contiguous()
    t0 = t0.expand(*lead, n).contiguous()
    t1 = t1.expand(*lead, n).contiguous()
    a = torch.searchsorted(t0, t_q, right=True)
    b = torch.searchsorted(t1, t_q, right=True)
    w = w.expand(*lead, n)
    rmax = torch.where(a > b, _range_max(w, b, a), torch.zeros_like(t_q, dtype=w.dtype))
    # Bins outside the window count as 0 in the max, unless every bin is inside it.
    w_dilate = torch.where((b == 0) & (a == n), rmax, torch.clamp_min(rmax, 0))
    return t_dilate, w_dilate


def max_dilate_weights(t: torch.Tensor,
                       w: torch.Tensor,
                       dilation: Union[float, torch.Tensor],
                       domain: Domain = (-float('inf'), float('inf')),
                       renormalize: bool = False,
                       eps: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dilate a set of bin weights: max-dilate their density (`max_dilate`) and turn it back into weights.

    Args:
        t: [..., n+1] sorted endpoints.
        w: [..., n] weights.
        dilation: half-width of the dilation.
        domain: (min, max) to which the new endpoints are clipped.
        renormalize: if True, rescale the dilated weights to sum to 1.
        eps: floor of the normaliser; float32 epsilon squared (or the dtype's, if smaller) by default.

    Returns:
        (t_dilate, w_dilate): [..., 3n+1] endpoints and [..., 3n] weights.
    """
    if eps is None:
        eps = _default_eps(w.dtype) ** 2
    p = weight_to_pdf(t, w)
    t_dilate, p_dilate = max_dilate(t, p, dilation, domain=domain)
    w_dilate = pdf_to_weight(t_dilate, p_dilate)
    if renormalize:
        w_dilate = w_dilate / torch.clamp_min(torch.sum(w_dilate, dim=-1, keepdim=True), eps)
    return t_dilate, w_dilate


def integrate_weights(w: torch.Tensor) -> torch.Tensor:
    """CDF at the endpoints of weights w that sum to 1.

    Args:
        w: [..., n] weights, assumed to sum to 1 (not checked).

    Returns:
        [..., n+1] cumulative sums, exactly 0 first and exactly 1 last, and capped at 1 in between.
    """
    cw = torch.clamp_max(torch.cumsum(w[..., :-1], dim=-1), 1)
    return torch.cat([torch.zeros_like(w[..., :1]), cw, torch.ones_like(w[..., :1])], dim=-1)


def invert_cdf(u: torch.Tensor,
               t: torch.Tensor,
               w_logits: torch.Tensor,
               use_gpu_resampling: bool = False) -> torch.Tensor:
    """Inverse CDF of the step function with endpoints t and weights softmax(w_logits), evaluated at u.

    Args:
        u: [..., k] points in [0, 1).
        t: [..., n+1] sorted endpoints.
        w_logits: [..., n] logits of the bin weights.
        use_gpu_resampling: use the gather-based `math.interp` instead of `math.sorted_interp` (the two agree
            except where the CDF has flat steps).

    Returns:
        [..., k] samples.
    """
    w = torch.softmax(w_logits, dim=-1)
    cw = integrate_weights(w)
    interp_fn = math.interp if use_gpu_resampling else math.sorted_interp
    return interp_fn(u, cw, t)


def draw_jitter(rng: torch.Generator,
                batch_shape: Sequence[int],
                num_samples: int,
                single_jitter: bool = False,
                dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """The U[0, 1) draws that `sample` makes from `rng`: [*batch_shape, 1] if `single_jitter`, else
    [*batch_shape, num_samples]. Drawing them ahead (e.g. outside a compiled region) and passing them to
    `sample(None, ..., jitter=...)` gives the same samples as `sample(rng, ...)`."""
    d = 1 if single_jitter else num_samples
    return torch.rand(*batch_shape, d, generator=rng, dtype=dtype, device=device)


def sample(rng: Optional[torch.Generator],
           t: torch.Tensor,
           w_logits: torch.Tensor,
           num_samples: int,
           single_jitter: bool = False,
           deterministic_center: bool = False,
           use_gpu_resampling: bool = False,
           jitter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw points from the piecewise-constant PDF with endpoints t and weights softmax(w_logits).

    With a generator (or pre-drawn `jitter`), u = linspace(0, 1 - u_max, k) + U(0, max_jitter) (stratified, one
    jitter per sample or one per ray), where u_max = eps + (1 - eps) / k and max_jitter = (1 - u_max) / (k - 1)
    - eps, so u stays in [0, 1). Without either, u = linspace(0, 1 - eps, k), or the k stratum centres when
    `deterministic_center`. The samples are the inverse CDF at u.

    Args:
        rng: torch.Generator on t's device, or None for deterministic samples (or to use `jitter`).
        t: [..., n+1] sorted endpoints.
        w_logits: [..., n] logits of the bin weights.
        num_samples: k, the number of samples.
        single_jitter: jitter all samples of a ray by the same amount.
        deterministic_center: (no randomness only) return the centres of k equal-mass strata.
        use_gpu_resampling: see `invert_cdf`.
        jitter: U[0, 1) draws [..., 1] or [..., k] (see `draw_jitter`) used instead of drawing from rng, so
            that the sampling itself needs no generator (e.g. inside torch.compile).

    Returns:
        [..., k] sorted samples.
    """
    eps = _default_eps(t.dtype)
    if rng is not None and jitter is not None:
        raise ValueError('sample: pass either rng or pre-drawn jitter, not both.')
    if rng is not None:
        jitter = draw_jitter(rng, t.shape[:-1], num_samples, single_jitter, dtype=t.dtype, device=t.device)
    if jitter is None:
        if deterministic_center:
            pad = 1 / (2 * num_samples)
            u = torch.linspace(pad, 1.0 - pad - eps, num_samples, dtype=t.dtype, device=t.device)
        else:
            u = torch.linspace(0, 1.0 - eps, num_samples, dtype=t.dtype, device=t.device)
        u = u.expand(*t.shape[:-1], num_samples)
    else:
        u_max = eps + (1 - eps) / num_samples
        max_jitter = (1 - u_max) / (num_samples - 1) - eps
        u = torch.linspace(0, 1 - u_max, num_samples, dtype=t.dtype, device=t.device) + jitter * max_jitter
    return invert_cdf(u, t, w_logits, use_gpu_resampling=use_gpu_resampling)


def sample_intervals(rng: Optional[torch.Generator],
                     t: torch.Tensor,
                     w_logits: torch.Tensor,
                     num_samples: int,
                     single_jitter: bool = False,
                     domain: Domain = (-float('inf'), float('inf')),
                     use_gpu_resampling: bool = False,
                     jitter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw intervals (rather than points) from a step function.

    Draws `num_samples` centres with `sample(..., deterministic_center=True)`, puts the new endpoints at
    the midpoints between consecutive centres, and makes the first / last endpoint the reflection of the
    first / last midpoint about the first / last centre, clipped to `domain`.

    Args:
        rng: torch.Generator, or None for deterministic intervals.
        t: [..., n+1] sorted endpoints.
        w_logits: [..., n] logits of the bin weights.
        num_samples: the number of intervals (> 1).
        single_jitter: jitter all centres of a ray by the same amount.
        domain: (min, max) valid range of the endpoints.
        use_gpu_resampling: see `invert_cdf`.
        jitter: pre-drawn U[0, 1) values instead of rng (see `sample`).

    Returns:
        [..., num_samples + 1] endpoints.
    """
    if num_samples <= 1:
        raise ValueError(f'num_samples must be > 1, is {num_samples}.')
    centers = sample(rng, t, w_logits, num_samples, single_jitter, deterministic_center=True,
                     use_gpu_resampling=use_gpu_resampling, jitter=jitter)
    mid = (centers[..., 1:] + centers[..., :-1]) / 2
    first = _clip_to_domain(2 * centers[..., :1] - mid[..., :1], (domain[0], None))
    last = _clip_to_domain(2 * centers[..., -1:] - mid[..., -1:], (None, domain[1]))
    return torch.cat([first, mid, last], dim=-1)


def lossfun_distortion(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Distortion loss (Eq. 15): the double integral of w(x) w(y) |x - y| for the step function (t, w).

    Computed in closed form as sum_ij w_i w_j |m_i - m_j| (m = bin midpoints) + (1/3) sum_i w_i^2 (t_{i+1} - t_i).

    Args:
        t: [..., n+1] endpoints.
        w: [..., n] weights.

    Returns:
        [...] loss.
    """
    ut = (t[..., 1:] + t[..., :-1]) / 2
    dut = torch.abs(ut[..., :, None] - ut[..., None, :])
    loss_inter = torch.sum(w * torch.sum(w[..., None, :] * dut, dim=-1), dim=-1)
    loss_intra = torch.sum(w**2 * (t[..., 1:] - t[..., :-1]), dim=-1) / 3
    return loss_inter + loss_intra


def interval_distortion(t0_lo: torch.Tensor, t0_hi: torch.Tensor, t1_lo: torch.Tensor,
                        t1_hi: torch.Tensor) -> torch.Tensor:
    """Mean of |x - y| for x uniform on [t0_lo, t0_hi] and y uniform on [t1_lo, t1_hi] (all [...] tensors)."""
    # Disjoint intervals: the distance between the centres.
    d_disjoint = torch.abs((t1_lo + t1_hi) / 2 - (t0_lo + t0_hi) / 2)
    # Overlapping intervals: the closed-form double integral divided by the two widths.
    d_overlap = (2 * (torch.minimum(t0_hi, t1_hi)**3 - torch.maximum(t0_lo, t1_lo)**3)
                 + 3 * (t1_hi * t0_hi * torch.abs(t1_hi - t0_hi)
                        + t1_lo * t0_lo * torch.abs(t1_lo - t0_lo)
                        + t1_hi * t0_lo * (t0_lo - t1_hi)
                        + t1_lo * t0_hi * (t1_lo - t0_hi))) / (6 * (t0_hi - t0_lo) * (t1_hi - t1_lo))
    are_disjoint = (t0_lo > t1_hi) | (t1_lo > t0_hi)
    return torch.where(are_disjoint, d_disjoint, d_overlap)


def weighted_percentile(t: torch.Tensor, w: torch.Tensor, ps: Sequence[float]) -> torch.Tensor:
    """Weighted percentiles of the step function (t, w), whose weights sum to 1.

    Args:
        t: [..., n+1] endpoints.
        w: [..., n] weights.
        ps: percentiles in [0, 100].

    Returns:
        [..., len(ps)] the points where the piecewise-linear CDF reaches each ps / 100.
    """
    cw = integrate_weights(w)
    # Filled entry by entry from Python numbers: no host-to-device copy (which would synchronise a GPU).
    x = torch.empty(len(ps), dtype=cw.dtype, device=cw.device)
    for i, p in enumerate(ps):
        x[i] = p
    x = x / 100
    return math.interp(x.expand(*cw.shape[:-1], x.shape[-1]), cw, t)


def resample(t: torch.Tensor,
             tp: torch.Tensor,
             vp: torch.Tensor,
             use_avg: bool = False,
             eps: Optional[float] = None) -> torch.Tensor:
    """Resample the step function (tp, vp) onto the bins of t.

    Args:
        t: [..., n+1] endpoints to resample onto.
        tp: [..., m+1] endpoints of the step function.
        vp: [..., m] its bin values.
        use_avg: if False, each output bin gets the total of vp over it (vp treated as mass spread uniformly
            over each input bin); if True, the width-weighted average of vp over it.
        eps: floor of the averaging denominator; float32 epsilon (or the dtype's, if smaller) by default.

    Returns:
        [..., n] resampled values.
    """
    if use_avg:
        if eps is None:
            eps = _default_eps(vp.dtype)
        wp = torch.diff(tp, dim=-1)
        v_numer = resample(t, tp, vp * wp, use_avg=False)
        v_denom = resample(t, tp, wp, use_avg=False)
        return v_numer / torch.clamp_min(v_denom, eps)
    acc = torch.cumsum(vp, dim=-1)
    acc0 = torch.cat([torch.zeros_like(acc[..., :1]), acc], dim=-1)
    return torch.diff(math.interp(t, tp, acc0), dim=-1)
