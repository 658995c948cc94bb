"""Coordinate-space warps, ray-distance warps and sinusoidal encodings (mip-NeRF / mip-NeRF 360).

Symbols used throughout:
  x     [..., d]      points in world space.
  z     [..., d]      points after the scene contraction (Eq. 10 of arXiv:2111.12077), inside a ball of radius 2.
  t     [...]         metric distances along a ray; `s` in [0, 1] are the normalised distances (Eq. 11).
  mean  [..., d]      Gaussian means; `cov` [..., d, d] full covariances, `var` [..., d] diagonal variances.

Every function here is pure, differentiable and takes its device and dtype from its inputs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import gin
import torch

from mipnerf360 import math


def contract(x: torch.Tensor) -> torch.Tensor:
    """Scene contraction of mip-NeRF 360 (Eq. 10): identity on the unit ball, (2 - 1/|x|) x/|x| outside it.

    Args:
        x: [..., d] points.

    Returns:
        [..., d] contracted points, all with norm < 2.
    """
    eps = torch.finfo(x.dtype).eps
    # The squared norm is floored at eps so that the (unused) outer branch has a finite gradient at x == 0.
    sq_norm = torch.clamp_min(torch.sum(x**2, dim=-1, keepdim=True), eps)
    scale = (2 * torch.sqrt(sq_norm) - 1) / sq_norm  # (2 - 1/|x|) / |x|, written with |x|^2 only.
    return torch.where(sq_norm <= 1, x, scale * x)


def inv_contract(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `contract`: maps [..., d] points with norm < 2 back to world space."""
    eps = torch.finfo(z.dtype).eps
    sq_norm = torch.clamp_min(torch.sum(z**2, dim=-1, keepdim=True), eps)
    # Outside the unit ball |z| = 2 - 1/|x|, so |x| = 1 / (2 - |z|) and x = z / (|z| (2 - |z|)).
    return torch.where(sq_norm <= 1, z, z / (2 * torch.sqrt(sq_norm) - sq_norm))


def contract_jacobian(x: torch.Tensor) -> torch.Tensor:
    """Closed-form Jacobian of `contract` at x.

    Outside the unit ball contract(x) = s(r) x with r = |x| and s(r) = (2r - 1) / r^2, so
    J = s(r) I + s'(r) x x^T / r = s(r) I + 2 (1 - r) / r^4 x x^T. Inside it J = I.

    Args:
        x: [..., d] points.

    Returns:
        [..., d, d] Jacobians d contract(x) / dx.
    """
    eps = torch.finfo(x.dtype).eps
    sq_norm = torch.clamp_min(torch.sum(x**2, dim=-1, keepdim=True), eps)[..., None]  # [..., 1, 1]
    norm = torch.sqrt(sq_norm)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    outer = x[..., :, None] * x[..., None, :]
    jac_out = ((2 * norm - 1) / sq_norm) * eye + (2 * (1 - norm) / sq_norm**2) * outer
    return torch.where(sq_norm <= 1, eye.expand_as(jac_out), jac_out)


def _is_contract(fn: Callable) -> bool:
    """True for `contract` itself or a wrapper of it (gin hands out wrappers that keep `__wrapped__`)."""
    while fn is not None:
        if fn is contract:
            return True
        fn = getattr(fn, '__wrapped__', None)
    return False


def track_linearize(fn: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor,
                    cov: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Push a Gaussian through `fn` by linearising `fn` at the mean (as an extended Kalman filter does).

    With J the Jacobian of fn at `mean`, the result is (fn(mean), J cov J^T) (Sec. 2 of arXiv:2111.12077); it
    is exact when fn is affine. Like the reference, fn is linearised as a function of the whole `mean` tensor,
    so any fn that is differentiable and traceable by torch.func works; `contract` uses its closed-form
    Jacobian instead, which gives the same numbers faster.

    Args:
        fn: maps a [..., d] tensor to a [..., d_out] tensor.
        mean: [..., d] means.
        cov: [..., d, d] full covariances.

    Returns:
        fn_mean: [..., d_out] transformed means.
        fn_cov: [..., d_out, d_out] transformed covariances.
    """
    if mean.dim() + 1 != cov.dim():
        raise ValueError(f'cov must be a full covariance of shape [..., d, d] for mean of shape [..., d]; got '
                         f'mean {tuple(mean.shape)} and cov {tuple(cov.shape)}')
    if _is_contract(fn):
        jac = contract_jacobian(mean)
        fn_cov = math.matmul(math.matmul(jac, cov), jac.transpose(-1, -2))
        return contract(mean), fn_cov

    fn_mean = fn(mean)

    def lin_fn(tangent: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(fn, (mean,), (tangent,))[1]

    # Applying J to every column of cov and stacking the results as rows gives (J cov)^T; doing it twice gives
    # (J (J cov)^T)^T = J cov J^T.
    lin_cols = torch.func.vmap(lin_fn, in_dims=-1, out_dims=-2)
    fn_cov = lin_cols(lin_cols(cov))
    return fn_mean, fn_cov


_RAYDIST_INVERSES = {
    'reciprocal': torch.reciprocal,
    'log': torch.exp,
    'exp': torch.log,
    'sqrt': torch.square,
    'square': torch.sqrt,
}

_RAYDIST_FORWARDS = {
    'reciprocal': torch.reciprocal,
    'log': torch.log,
    'exp': torch.exp,
    'sqrt': torch.sqrt,
    'square': torch.square,
}
RAYDIST_FN_NAMES = "'piecewise' or one of " + ', '.join(sorted(_RAYDIST_INVERSES)) + ' (e.g. torch.reciprocal)'


def raydist_fn_supported(fn: Any) -> bool:
    """Whether `construct_ray_warps` takes `fn`: None, 'piecewise', or a function (or the name of one) whose
    inverse it knows."""
    if fn is None or (isinstance(fn, str) and fn == 'piecewise'):
        return True
    name = fn if isinstance(fn, str) else getattr(fn, '__name__', None)
    return isinstance(name, str) and name in _RAYDIST_INVERSES


def construct_ray_warps(
    fn: Union[None, str, Callable[[torch.Tensor], torch.Tensor]],
    t_near: torch.Tensor,
    t_far: torch.Tensor,
) -> Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Build the bijection between metric distance t and normalised distance s in [0, 1] (Eq. 11).

    s = (g(t) - g(t_near)) / (g(t_far) - g(t_near)) for a monotonic g, and t = g^-1(s g(t_far) + (1-s) g(t_near)).

    Args:
        fn: g. None (linear in t), 'piecewise' (t/2 below 1, 1 - 1/(2t) above, which allows t_near = 0), or one of
            torch.reciprocal / log / exp / sqrt / square (a function with that `__name__`, or the name itself).
        t_near: [...] near-plane distances (broadcastable against the t passed to t_to_s).
        t_far: [...] far-plane distances.

    Returns:
        (t_to_s, s_to_t): the warp and its inverse.
    """
    if not raydist_fn_supported(fn):
        raise ValueError(f'Unsupported ray distance function {fn!r}; expected None, {RAYDIST_FN_NAMES}.')
    if fn is None:
        fn_fwd = lambda x: x  # noqa: E731
        fn_inv = lambda x: x  # noqa: E731
    elif isinstance(fn, str) and fn == 'piecewise':
        fn_fwd = lambda x: torch.where(x < 1, 0.5 * x, 1 - 0.5 / x)  # noqa: E731
        fn_inv = lambda x: torch.where(x < 0.5, 2 * x, 0.5 / (1 - x))  # noqa: E731
    else:
        name = fn if isinstance(fn, str) else fn.__name__
        fn_fwd = _RAYDIST_FORWARDS[name] if isinstance(fn, str) else fn
        fn_inv = _RAYDIST_INVERSES[name]

    s_near, s_far = fn_fwd(t_near), fn_fwd(t_far)

    def t_to_s(t: torch.Tensor) -> torch.Tensor:
        return (fn_fwd(t) - s_near) / (s_far - s_near)

    def s_to_t(s: torch.Tensor) -> torch.Tensor:
        return fn_inv(s * s_far + (1 - s) * s_near)

    return t_to_s, s_to_t


def expected_sin(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[sin(x)] for x ~ N(mean, var), which is exp(-var / 2) sin(mean) (Eq. 13 of arXiv:2103.13415)."""
    return torch.exp(-0.5 * var) * math.safe_sin(mean)


def _scale_features(x: torch.Tensor, min_deg: int, max_deg: int, power: int) -> torch.Tensor:
    """[..., d] -> [..., (max_deg - min_deg) * d]: x * (2^k)^power, k scale-major and dimension-minor."""
    scales = 2.0**torch.arange(min_deg, max_deg, dtype=x.dtype, device=x.device)
    return (x[..., None, :] * scales[:, None]**power).reshape(*x.shape[:-1], -1)


def _first_reduced_degree(min_deg: int, max_deg: int, mean_bound: Optional[float], period: float) -> int:
    """The smallest k in [min_deg, max_deg] such that the sine arguments 2^k mean (+ pi/2) may reach `period`
    when |mean| <= mean_bound; max_deg if none can, min_deg if the bound is unknown."""
    if mean_bound is None:
        return min_deg
    for k in range(min_deg, max_deg):
        # A relative margin far larger than any rounding of the bound or of the products.
        if 2.0**k * mean_bound * (1 + 1e-3) + 0.5 * torch.pi >= period:
            return k
    return max_deg


# Below this, exp(-var / 2) is set to zero in `integrated_pos_enc` (see there).
_IPE_DECAY_FLOOR = 2.0**-100
# exp(_IPE_LOG_DECAY_FLOOR) < _IPE_DECAY_FLOOR. Arguments are clamped to it before exp(): CPU exp() is an order of
# magnitude slower on arguments whose result underflows, and the result is zeroed anyway.
_IPE_LOG_DECAY_FLOOR = -70.0


def integrated_pos_enc(mean: torch.Tensor, var: torch.Tensor, min_deg: int, max_deg: int,
                       mean_bound: Optional[float] = None) -> torch.Tensor:
    """Integrated positional encoding (Eq. 14 of arXiv:2103.13415) with scales 2^min_deg .. 2^(max_deg - 1).

    The features are expected_sin([2^k mean, 2^k mean + pi/2], 4^k var), the sines' arguments reduced as by
    `math.safe_sin`, with one deliberate difference: a damping factor exp(-4^k var / 2) below 2^-100 is set to
    0, so a feature of magnitude below 2^-100 (8e-31) becomes exactly 0. Without this, large-variance features
    underflow into denormal floats, which slow every CPU matrix product that reads them (the first MLP layer,
    forward and backward) down by an order of magnitude; flush-to-zero hardware would zero most of them anyway.

    The sine and cosine halves share one evaluation of exp(-var / 2), nothing is concatenated, only the scales
    whose arguments can reach the reduction period are reduced, and in eager mode, when neither input requires a
    gradient, the work is done in place in the output buffer.

    Args:
        mean: [..., d] means.
        var: [..., d] variances (the diagonal of the covariance).
        min_deg: smallest scale exponent (inclusive).
        max_deg: largest scale exponent (exclusive).
        mean_bound: optional promise that |mean| <= mean_bound everywhere (e.g. 2 after `contract` and a
            projection onto unit directions); it only lets the argument reduction skip the scales that can
            never need it, and never changes the result when it holds.

    Returns:
        [..., 2 * (max_deg - min_deg) * d]: first E[sin] of every scaled coordinate (scale-major,
        dimension-minor), then the same for the coordinates shifted by pi/2 (the cosines).
    """
    dtype, device = mean.dtype, mean.device
    num_deg, d = max_deg - min_deg, mean.shape[-1]
    width = num_deg * d
    batch_shape = torch.broadcast_shapes(mean.shape[:-1], var.shape[:-1])
    period = math.SAFE_TRIG_PERIOD
    scales = 2.0**torch.arange(min_deg, max_deg, dtype=dtype, device=device)
    # Multiplying by the power of two -0.5 * 4^k is exact: var * (-0.5 * 4^k) is bitwise -0.5 * (var * 4^k).
    neg_half_sq_scales = -0.5 * scales**2
    # Columns from c0 on may hold sine arguments of magnitude >= period.
    c0 = (_first_reduced_degree(min_deg, max_deg, mean_bound, period) - min_deg) * d

    if not (mean.requires_grad or var.requires_grad or torch.compiler.is_compiling()):
        # Eager and no gradient: computed in place in the output buffer. (Under torch.compile the functional
        # version below fuses anyway.)
        out = torch.empty(*batch_shape, 2, num_deg, d, dtype=dtype, device=device)
        mean_rows = mean.expand(*batch_shape, d).reshape(-1, d)
        var_rows = var.expand(*batch_shape, d).reshape(-1, d)
        out_rows = out.view(-1, 2, num_deg, d)
        num_rows = out_rows.shape[0]
        # On a CPU the dozen passes over the output run block by block, each block small enough to stay in
        # the cache; a GPU takes all rows at once.
        block = num_rows if device.type != 'cpu' else _IPE_CPU_BLOCK_BYTES // (2 * width * out.itemsize)
        block = max(block, 1)
        for r0 in range(0, num_rows, block):
            r1 = min(r0 + block, num_rows)
            _ipe_rows_(out_rows[r0:r1], mean_rows[r0:r1], var_rows[r0:r1], scales, neg_half_sq_scales, c0)
        return out.view(*batch_shape, 2 * width)

    scaled = (mean[..., None, :] * scales[:, None]).reshape(*mean.shape[:-1], 1, width)
    args = torch.cat([scaled, scaled + 0.5 * torch.pi], dim=-2)
    if c0 < width:
        args = torch.cat([args[..., :c0], math.reduce_trig_arg(args[..., c0:], period)], dim=-1)
    log_decay = (var[..., None, :] * neg_half_sq_scales[:, None]).reshape(*var.shape[:-1], 1, width)
    decay = torch.threshold(torch.exp(torch.clamp_min(log_decay, _IPE_LOG_DECAY_FLOOR)), _IPE_DECAY_FLOOR, 0.0)
    out = torch.sin(args) * decay
    return out.reshape(*batch_shape, 2 * width)


# Bytes of `integrated_pos_enc` output computed at a time on a CPU, so that its passes run from the cache rather
# than from memory (4 MiB measured fastest on a 2-core Xeon: ~25% less time than one block for 32k samples).
_IPE_CPU_BLOCK_BYTES = 1 << 22


def _ipe_rows_(out: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, scales: torch.Tensor,
               neg_half_sq_scales: torch.Tensor, c0: int) -> None:
    """The in-place body of `integrated_pos_enc` for rows: out [r, 2, k, d] <- encoding of mean, var [r, d]."""
    rows, _, num_deg, d = out.shape
    width = num_deg * d
    # Sine arguments: 2^k mean, then 2^k mean + pi/2.
    torch.mul(mean[:, None, :], scales[:, None], out=out[:, 0])
    torch.add(out[:, 0], 0.5 * torch.pi, out=out[:, 1])
    out = out.view(rows, 2, width)
    if c0 < width:
        hi = out[..., c0:]
        period = math.SAFE_TRIG_PERIOD
        torch.where(torch.abs(hi) < period, hi, torch.remainder(hi, period), out=hi)
    log_decay = (var[:, None, :] * neg_half_sq_scales[:, None]).view(rows, 1, width)
    decay = torch.threshold_(log_decay.clamp_min_(_IPE_LOG_DECAY_FLOOR).exp_(), _IPE_DECAY_FLOOR, 0.0)
    out.sin_().mul_(decay)


def lift_and_diagonalize(mean: torch.Tensor, cov: torch.Tensor,
                         basis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Project Gaussians onto the directions of `basis` and keep only the projected variances.

    The variance along a direction b is b^T cov b = sum_ij cov_ij b_i b_j, computed as one [..., d*d] x [d*d, n]
    product (so neither cov @ basis nor any other [..., d, n] intermediate is formed).

    Args:
        mean: [..., d] means.
        cov: [..., d, d] covariances.
        basis: [d, n] directions, one per column.

    Returns:
        fn_mean: [..., n] = mean @ basis.
        fn_cov_diag: [..., n], the diagonal of basis^T cov basis.
    """
    d, n = basis.shape
    fn_mean = math.matmul(mean, basis)
    basis_outer = (basis[:, None, :] * basis[None, :, :]).reshape(d * d, n)  # [(i, j), n] = b_in b_jn.
    fn_cov_diag = math.matmul(cov.reshape(*cov.shape[:-2], d * d), basis_outer)
    return fn_mean, fn_cov_diag


def pos_enc(x: torch.Tensor, min_deg: int, max_deg: int, append_identity: bool = True) -> torch.Tensor:
    """NeRF's positional encoding, in the same layout as `integrated_pos_enc` (plain sin, not safe_sin).

    Args:
        x: [..., d] inputs.
        min_deg: smallest scale exponent (inclusive).
        max_deg: largest scale exponent (exclusive).
        append_identity: if True, x itself is put in front of the features.

    Returns:
        [..., d * append_identity + 2 * (max_deg - min_deg) * d].
    """
    scaled_x = _scale_features(x, min_deg, max_deg, 1)
    four_feat = torch.sin(torch.cat([scaled_x, scaled_x + 0.5 * torch.pi], dim=-1))
    if append_identity:
        return torch.cat([x, four_feat], dim=-1)
    return four_feat


def _register_gin() -> None:
    """Makes `@coord.contract` in gin files resolve to `contract` (a no-op if it is registered already)."""
    try:
        gin.external_configurable(contract, module='coord')
    except ValueError:
        pass


_register_gin()
