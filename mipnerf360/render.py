"""Casting cones / cylinders along rays as Gaussians, alpha compositing, and volumetric rendering.

Symbols used throughout:
  d, directions  [..., 3]     ray directions, NOT normalised (distances t are measured in units of |d|).
  origins        [..., 3]     ray origins.
  tdist          [..., n+1]   fencepost distances along each ray; interval i is [tdist[i], tdist[i+1]).
  t0, t1         [..., n]     interval starts and ends.
  radii          [..., 1]     base radius of each cone at t = 1 (or the radius of each cylinder).
  density        [..., n]     volume density of each interval; weights [..., n] its compositing weight.

Functions are pure and take their device and dtype from their inputs.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from mipnerf360 import stepfun


def lift_gaussian(d: torch.Tensor, t_mean: torch.Tensor, t_var: torch.Tensor, r_var: torch.Tensor,
                  diag: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Turn a Gaussian along a ray (variance t_var along d, r_var across it) into a 3D Gaussian.

    The covariance is t_var d d^T + r_var (I - d d^T / |d|^2) (Eq. 8 of arXiv:2103.13415).

    Args:
        d: [..., 3] ray directions.
        t_mean, t_var, r_var: [..., n] per-interval mean distance, variance along the ray and radial variance.
        diag: whether to return only the diagonal of the covariance.

    Returns:
        mean: [..., n, 3] = d * t_mean (relative to the ray origin).
        cov: [..., n, 3] diagonals if diag, else [..., n, 3, 3] full covariances.
    """
    mean = d[..., None, :] * t_mean[..., None]
    # 1e-10 is the reference's fixed floor on |d|^2 (guards a zero direction).
    d_mag_sq = torch.clamp_min(torch.sum(d**2, dim=-1, keepdim=True), 1e-10)

    if diag:
        d_outer_diag = d**2
        null_outer_diag = 1 - d_outer_diag / d_mag_sq
        cov_diag = t_var[..., None] * d_outer_diag[..., None, :] + r_var[..., None] * null_outer_diag[..., None, :]
        return mean, cov_diag

    d_outer = d[..., :, None] * d[..., None, :]
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    null_outer = eye - d[..., :, None] * (d / d_mag_sq)[..., None, :]
    cov = t_var[..., None, None] * d_outer[..., None, :, :] + r_var[..., None, None] * null_outer[..., None, :, :]
    return mean, cov


def conical_frustum_to_gaussian(d: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, base_radius: torch.Tensor,
                                diag: bool, stable: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Moment-match a conical frustum with a Gaussian (mip-NeRF, arXiv:2103.13415).

    The cone has its apex at the origin, axis d (not necessarily unit) and radius base_radius at t = 1; the
    frustum is the part between t0 and t1, with points weighted uniformly in volume.

    Args:
        d: [..., 3] cone axes.
        t0, t1: [..., n] interval starts and ends.
        base_radius: [..., 1] (or broadcastable to [..., n]) cone radius at t = 1.
        diag: whether the covariance is returned as its diagonal [..., n, 3] or in full [..., n, 3, 3].
        stable: use the re-parameterisation by midpoint and half-width (Eq. 7), which stays accurate for thin
            intervals far from the origin; False uses the textbook moments (Eqs. 37-39), which lose all
            precision there.

    Returns:
        (mean [..., n, 3], cov) of the frustum, relative to the cone's apex.
    """
    if stable:
        eps = torch.finfo(t0.dtype).eps
        mu = (t0 + t1) / 2
        hw = (t1 - t0) / 2
        denom = torch.clamp_min(3 * mu**2 + hw**2, eps)
        t_mean = mu + (2 * mu * hw**2) / denom
        t_var = hw**2 / 3 - (4 / 15) * hw**4 * (12 * mu**2 - hw**2) / denom**2
        r_var = mu**2 / 4 + (5 / 12) * hw**2 - (4 / 15) * hw**4 / denom
    else:
        t_mean = (3 * (t1**4 - t0**4)) / (4 * (t1**3 - t0**3))
        r_var = 3 / 20 * (t1**5 - t0**5) / (t1**3 - t0**3)
        t_mean_sq = 3 / 5 * (t1**5 - t0**5) / (t1**3 - t0**3)
        t_var = t_mean_sq - t_mean**2
    r_var = r_var * base_radius**2
    return lift_gaussian(d, t_mean, t_var, r_var, diag)


def cylinder_to_gaussian(d: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, radius: torch.Tensor,
                         diag: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Moment-match a cylinder of the given radius around axis d, between t0 and t1, with a Gaussian.

    Shapes as in `conical_frustum_to_gaussian`; the axial variance is (t1 - t0)^2 / 12, the radial one r^2 / 4.
    """
    t_mean = (t0 + t1) / 2
    r_var = radius**2 / 4
    t_var = (t1 - t0)**2 / 12
    return lift_gaussian(d, t_mean, t_var, r_var, diag)


def cast_rays(tdist: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor, radii: torch.Tensor,
              ray_shape: str, diag: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussians for every interval between consecutive fenceposts of cone- or cylinder-shaped rays.

    Args:
        tdist: [..., n+1] fencepost distances.
        origins: [..., 3] ray origins.
        directions: [..., 3] ray directions (not normalised).
        radii: [..., 1] cone base radii or cylinder radii.
        ray_shape: 'cone' or 'cylinder'.
        diag: whether covariances are diagonal [..., n, 3] or full [..., n, 3, 3].

    Returns:
        (means [..., n, 3] in world space, covs).
    """
    t0 = tdist[..., :-1]
    t1 = tdist[..., 1:]
    if ray_shape == 'cone':
        gaussian_fn = conical_frustum_to_gaussian
    elif ray_shape == 'cylinder':
        gaussian_fn = cylinder_to_gaussian
    else:
        raise ValueError(f'ray_shape must be \'cone\' or \'cylinder\', got {ray_shape!r}')
    means, covs = gaussian_fn(directions, t0, t1, radii, diag)
    return means + origins[..., None, :], covs


def compute_alpha_weights(density: torch.Tensor, tdist: torch.Tensor, dirs: torch.Tensor,
                          opaque_background: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alpha-compositing weights of the volume rendering quadrature (Eq. 1 of arXiv:2111.12077).

    alpha_i = 1 - exp(-density_i delta_i) with delta_i = (t_{i+1} - t_i) |d| the metric interval length,
    trans_i = exp(-sum_{j<i} density_j delta_j), weights_i = alpha_i trans_i.

    Args:
        density: [..., n] densities.
        tdist: [..., n+1] fencepost distances.
        dirs: [..., 3] ray directions (not normalised).
        opaque_background: if True the last interval is treated as infinitely long, so the weights sum to 1.

    Returns:
        (weights, alpha, trans), each [..., n].
    """
    t_delta = tdist[..., 1:] - tdist[..., :-1]
    delta = t_delta * torch.linalg.norm(dirs[..., None, :], dim=-1)
    density_delta = density * delta

    if opaque_background:
        density_delta = torch.cat(
            [density_delta[..., :-1], torch.full_like(density_delta[..., -1:], torch.inf)], dim=-1)

    alpha = 1 - torch.exp(-density_delta)
    optical_depth = torch.cat(
        [torch.zeros_like(density_delta[..., :1]), torch.cumsum(density_delta[..., :-1], dim=-1)], dim=-1)
    trans = torch.exp(-optical_depth)
    weights = alpha * trans
    return weights, alpha, trans


def volumetric_rendering(rgbs: torch.Tensor, weights: torch.Tensor, tdist: torch.Tensor, bg_rgbs: torch.Tensor,
                         t_far: torch.Tensor, compute_extras: bool,
                         extras: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
    """Composite per-sample colours (and extra quantities) along rays, over a background.

    Args:
        rgbs: [..., n, 3] colours.
        weights: [..., n] compositing weights (summing to <= 1).
        tdist: [..., n+1] fencepost distances.
        bg_rgbs: background colour(s), broadcastable to [..., 3]; it gets weight max(0, 1 - sum(weights)).
        t_far: [..., 1] far-plane distances (where the background's weight is placed for the percentiles).
        compute_extras: if False only 'rgb' is returned.
        extras: optional {name: [..., n, c] or None}; each non-None entry is composited (without background).

    Returns:
        {'rgb': [..., 3]} and, with compute_extras, 'acc' [...], the composited extras [..., c],
        'distance_mean' [...] (weighted mean of log interval-midpoint distances, exponentiated, clipped to
        [tdist[..., 0], tdist[..., -1]]), and 'distance_percentile_5', 'distance_median',
        'distance_percentile_95' [...] (percentiles of the weights with the background weight at t_far).
    """
    eps = torch.finfo(weights.dtype).eps
    rendering = {}

    acc = weights.sum(dim=-1)
    bg_w = torch.clamp_min(1 - acc[..., None], 0)
    rendering['rgb'] = (weights[..., None] * rgbs).sum(dim=-2) + bg_w * bg_rgbs

    if compute_extras:
        rendering['acc'] = acc

        if extras is not None:
            for k, v in extras.items():
                if v is not None:
                    rendering[k] = (weights[..., None] * v).sum(dim=-2)

        t_mids = 0.5 * (tdist[..., :-1] + tdist[..., 1:])
        # Averaging log-distances and exponentiating is better behaved than averaging distances directly.
        mean_log_t = (weights * torch.log(t_mids)).sum(dim=-1) / torch.clamp_min(acc, eps)
        rendering['distance_mean'] = torch.clamp(
            torch.nan_to_num(torch.exp(mean_log_t)), tdist[..., 0], tdist[..., -1])

        # Append the far plane as a last fencepost, carrying the background weight, so weights sum to 1.
        t_aug = torch.cat([tdist, t_far], dim=-1)
        weights_aug = torch.cat([weights, bg_w], dim=-1)

        ps = [5, 50, 95]
        distance_percentiles = stepfun.weighted_percentile(t_aug, weights_aug, ps)
        for i, p in enumerate(ps):
            key = 'distance_median' if p == 50 else f'distance_percentile_{p}'
            rendering[key] = distance_percentiles[..., i]

    return rendering
