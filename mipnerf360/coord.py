"""Coordinate-space warps, ray-distance warps and sinusoidal encodings (mip-NeRF / mip-NeRF 360).

Symbols used throughout:
  x     [..., d]      points in world space.
  z     [..., d]      points after the scene contraction (Eq. 10 of arXiv:2111.12077), inside a ball of radius 2.
  t     [...]         metric distances along a ray; `s` in [0, 1] are the normalised distances (Eq. 11).
  mean  [..., d]      Gaussian means; `cov` [..., d, d] full covariances, `var` [..., d] diagonal variances.

Every function here is pure, differentiable and takes its device and dtype from its inputs.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

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
    if fn is None:
        fn_fwd = lambda x: x  # noqa: E731
        fn_inv = lambda x: x  # noqa: E731
    elif isinstance(fn, str) and fn == 'piecewise':
        fn_fwd = lambda x: torch.where(x < 1, 0.5 * x, 1 - 0.5 / x)  # noqa: E731
        fn_inv = lambda x: torch.where(x < 0.5, 2 * x, 0.5 / (1 - x))  # noqa: E731
    else:
        name = fn if isinstance(fn, str) else getattr(fn, '__name__', None)
        if name not in _RAYDIST_INVERSES:
            raise ValueError(f'Unsupported ray distance function {fn!r}; expected None, \'piecewise\' or one of '
                             f'{sorted(_RAYDIST_INVERSES)} (e.g. torch.reciprocal).')
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


def integrated_pos_enc(mean: torch.Tensor, var: torch.Tensor, min_deg: int, max_deg: int) -> torch.Tensor:
    """Integrated positional encoding (Eq. 14 of arXiv:2103.13415) with scales 2^min_deg .. 2^(max_deg - 1).

    Args:
        mean: [..., d] means.
        var: [..., d] variances (the diagonal of the covariance).
        min_deg: smallest scale exponent (inclusive).
        max_deg: largest scale exponent (exclusive).

    Returns:
        [..., 2 * (max_deg - min_deg) * d]: first E[sin] of every scaled coordinate (scale-major,
        dimension-minor), then the same for the coordinates shifted by pi/2 (the cosines).
    """
    scaled_mean = _scale_features(mean, min_deg, max_deg, 1)
    scaled_var = _scale_features(var, min_deg, max_deg, 2)
    return expected_sin(
        torch.cat([scaled_mean, scaled_mean + 0.5 * torch.pi], dim=-1),
        torch.cat([scaled_var, scaled_var], dim=-1))


def lift_and_diagonalize(mean: torch.Tensor, cov: torch.Tensor,
                         basis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Project Gaussians onto the directions of `basis` and keep only the projected variances.

    Args:
        mean: [..., d] means.
        cov: [..., d, d] covariances.
        basis: [d, n] directions, one per column.

    Returns:
        fn_mean: [..., n] = mean @ basis.
        fn_cov_diag: [..., n], the diagonal of basis^T cov basis.
    """
    fn_mean = math.matmul(mean, basis)
    fn_cov_diag = torch.sum(basis * math.matmul(cov, basis), dim=-2)
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
