"""Visualisations of renderings: colour-mapped depth, accumulated opacity, normals and ray weight profiles.

All functions here work in **numpy** (float64 unless the input is float32): torch tensors are accepted anywhere
and converted to numpy first, and every visualisation is returned as a numpy float image with values in
[0, 1] (images are [H, W, 3]; ``acc`` maps are [H, W]).

Colour maps come from matplotlib when it is installed. Without it, ``turbo`` (the published degree-5
polynomial approximation of Google's Turbo map, Mikhailov 2019; close to the lookup table in the middle, off by
up to ~0.1 in places near the ends) and ``gray`` are built in; other names then raise a ConfigError
(a user error: install matplotlib).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mipnerf360 import configs

Colormap = Callable[[np.ndarray], np.ndarray]

_F32_EPS = float(np.finfo(np.float32).eps)


def _np(x: Any) -> Any:
    """numpy version of a tensor (detached, on the CPU); other values unchanged."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


# Turbo as a degree-5 polynomial in x per channel (coefficients of x^0..x^5), by Ruofei Du (Apache-2.0).
_TURBO_POLY = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def turbo(x: np.ndarray) -> np.ndarray:
    """Turbo colour map (polynomial approximation): [...] values in [0, 1] -> [..., 4] RGBA (alpha = 1)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)
    powers = x[..., None] ** np.arange(6)
    rgb = np.clip(powers @ _TURBO_POLY.T, 0, 1)
    return np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=-1)


def gray(x: np.ndarray) -> np.ndarray:
    """Gray colour map: [...] values in [0, 1] -> [..., 4] RGBA with R = G = B = x."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)[..., None]
    return np.concatenate([x, x, x, np.ones_like(x)], axis=-1)


_BUILTIN_CMAPS = {'turbo': turbo, 'gray': gray, 'grey': gray}


def get_colormap(name: str) -> Colormap:
    """A colour map by name: matplotlib's if matplotlib is installed, else a built-in (turbo, gray)."""
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        if name not in matplotlib.colormaps:
            raise configs.ConfigError(f'Unknown colormap {name!r}; use a matplotlib colormap name (e.g. turbo).')
        return matplotlib.colormaps[name]
    if name not in _BUILTIN_CMAPS:
        raise configs.ConfigError(f'Colormap {name!r} needs matplotlib (pip install matplotlib); without it only '
                                  f'{sorted(_BUILTIN_CMAPS)} are available.')
    return _BUILTIN_CMAPS[name]


def colormap_turbo(x: Any) -> np.ndarray:
    """Turbo colours of [...] values in [0, 1] -> [..., 3] (matplotlib's map if installed, else `turbo`)."""
    return np.asarray(get_colormap('turbo')(np.clip(np.asarray(_np(x), dtype=np.float64), 0, 1)))[..., :3]


def weighted_percentile(x: np.ndarray, w: np.ndarray, ps: Sequence[float], assume_sorted: bool = False
                        ) -> np.ndarray:
    """Weighted percentiles of all elements of ``x``: where the cumulative weight reaches ``p`` percent.

    Args:
        x: [...] values.
        w: [...] non-negative weights of the same size.
        ps: percentiles in [0, 100].
        assume_sorted: skip sorting when ``x`` is already ascending.

    Returns:
        [len(ps)] percentiles (linear interpolation of the cumulative weights).
    """
    x, w = np.reshape(_np(x), [-1]), np.reshape(_np(w), [-1])
    if not assume_sorted:
        order = np.argsort(x)
        x, w = x[order], w[order]
    acc_w = np.cumsum(w)
    return np.interp(np.asarray(ps) * (acc_w[-1] / 100), acc_w, x)


def sinebow(h: np.ndarray) -> np.ndarray:
    """A cyclic colour map with uniform brightness: [...] hues -> [..., 3] (basecase.org "rainbows")."""
    h = np.asarray(_np(h))
    f = lambda z: np.sin(np.pi * z) ** 2  # noqa: E731
    return np.stack([f(3 / 6 - h), f(5 / 6 - h), f(7 / 6 - h)], axis=-1)


def matte(vis: np.ndarray, acc: np.ndarray, dark: float = 0.8, light: float = 1.0, width: int = 8) -> np.ndarray:
    """Composites [H, W, C] ``vis`` with opacity [H, W] ``acc`` over a checkerboard of ``width``-pixel squares."""
    vis, acc = _np(vis), _np(acc)
    rows = (np.arange(acc.shape[0]) % (2 * width) // width)[:, None]
    cols = (np.arange(acc.shape[1]) % (2 * width) // width)[None, :]
    bg = np.where(np.logical_xor(rows, cols), light, dark)
    return vis * acc[:, :, None] + (bg * (1 - acc))[:, :, None]


def visualize_cmap(value: np.ndarray, weight: np.ndarray, colormap: Optional[Colormap],
                   lo: Optional[float] = None, hi: Optional[float] = None, percentile: float = 99.0,
                   curve_fn: Callable[[Any], Any] = lambda x: x, modulus: Optional[float] = None,
                   matte_background: bool = True) -> np.ndarray:
    """Colour-maps a scalar image, normalising it to [0, 1] between robust weighted bounds.

    Args:
        value: [H, W] values (or [H, W, 3] when ``colormap`` is None: each channel is normalised and used as
            a colour directly).
        weight: [H, W] weights in [0, 1]; they weight the percentiles and matte the result.
        colormap: maps [H, W] values in [0, 1] to [H, W, >=3] colours, or None (see ``value``).
        lo, hi: value range shown; None takes the ``50 -/+ percentile / 2`` weighted percentiles, widened by
            float32 eps.
        percentile: the central mass of ``value`` (by ``weight``) spanned when ``lo``/``hi`` are None.
        curve_fn: applied to ``value``, ``lo`` and ``hi`` before normalising (e.g. ``-log(x + eps)`` for depth).
        modulus: if set, show ``(curve_fn(value) mod modulus) / modulus`` instead (``lo``/``hi`` unused).
        matte_background: composite over a checkerboard using ``weight``.

    Returns:
        [H, W, 3] numpy image in [0, 1].
    """
    value, weight = _np(value), _np(weight)
    # A per-pixel weight applies to every channel of a multi-channel value. (The reference pairs the
    # 3 H W sorted values with only H W weights, and JAX's clamped out-of-range gather fills in the rest.)
    pct_weight = np.broadcast_to(weight[..., None], value.shape) if value.ndim == weight.ndim + 1 else weight
    lo_auto, hi_auto = weighted_percentile(value, pct_weight, [50 - percentile / 2, 50 + percentile / 2])
    # The reference writes `lo or ...`, which also discards an explicit 0; an explicit bound is kept here.
    lo = lo_auto - _F32_EPS if lo is None else lo
    hi = hi_auto + _F32_EPS if hi is None else hi

    value, lo, hi = [curve_fn(v) for v in (value, lo, hi)]
    if modulus:
        value = np.mod(value, modulus) / modulus
    else:
        with np.errstate(divide='ignore', invalid='ignore'):
            value = np.nan_to_num(np.clip((value - np.minimum(lo, hi)) / np.abs(hi - lo), 0, 1))

    if colormap:
        colorized = np.asarray(colormap(value))[:, :, :3]
    else:
        if value.ndim != 3:
            raise ValueError(f'value must have 3 dims but has {value.ndim}')
        if value.shape[-1] != 3:
            raise ValueError(f'value must have 3 channels but has {value.shape[-1]}')
        colorized = value
    return matte(colorized, weight) if matte_background else colorized


def visualize_coord_mod(coords: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Shows each [H, W, 3] coordinate's position within its 2-unit cell, ``((x + 1) mod 2) / 2``, matted."""
    return matte(((_np(coords) + 1) % 2) / 2, acc)


def _resample_avg(t: np.ndarray, tp: np.ndarray, vp: np.ndarray, eps: float = _F32_EPS) -> np.ndarray:
    """Width-weighted average of the step function (tp [m+1], vp [..., m]) over intervals t [n+1] -> [..., n].

    Same as the reference's ``stepfun.resample(t, tp, vp, use_avg=True)`` for one ray.
    """
    def integrate(values):
        acc0 = np.concatenate([np.zeros(values.shape[:-1] + (1,)), np.cumsum(values, axis=-1)], axis=-1)
        acc_t = np.stack([np.interp(t, tp, a) for a in acc0.reshape(-1, acc0.shape[-1])])
        return np.diff(acc_t, axis=-1).reshape(values.shape[:-1] + (t.shape[0] - 1,))

    wp = np.diff(tp)
    return integrate(vp * wp) / np.maximum(eps, integrate(wp))


def visualize_rays(dist: Sequence[np.ndarray], dist_range: Tuple[float, float], weights: Sequence[np.ndarray],
                   rgbs: Sequence[np.ndarray], accumulate: bool = False, renormalize: bool = False,
                   resolution: int = 2048, bg_color: float = 0.8) -> Tuple[np.ndarray, np.ndarray]:
    """Draws the colour and weight profiles of a few rays at every sampling level as image rows.

    Each ray's step function is resampled onto ``resolution`` equal bins spanning ``dist_range``. When
    ``resolution`` exceeds the number of rays, each (ray, level) row is repeated so that the image is roughly
    square, and a background strip separates the rays.

    Args:
        dist: per level, [R, S_l + 1] interval endpoints of R rays.
        dist_range: (start, end) of the distance axis.
        weights: per level, [R, S_l] weights.
        rgbs: per level, [R, S_l, 3] colours.
        accumulate: show the running (front-to-back) weight and weight-averaged colour instead.
        renormalize: scale alphas so that the largest is 1.
        resolution: number of bins along the distance axis.
        bg_color: grey level behind transparent parts.

    Returns:
        ``(vis, alpha)``: [rows, resolution, 3] image and [rows, resolution] alpha (numpy).
    """
    dist_vis = np.linspace(*dist_range, resolution + 1)
    vis_rgb, vis_alpha = [], []
    for ds, ws, rs in zip(dist, weights, rgbs):
        ds, ws, rs = _np(ds), _np(ws), _np(rs)
        level_rgb, level_w = [], []
        for d, w, r in zip(ds, ws, rs):
            if accumulate:
                w_csum = np.cumsum(w, axis=0)
                rw_csum = np.cumsum(r * w[:, None], axis=0)
                r, w = (rw_csum + _F32_EPS) / (w_csum[:, None] + 2 * _F32_EPS), w_csum
            level_rgb.append(_resample_avg(dist_vis, d, r.T).T)
            level_w.append(_resample_avg(dist_vis, d, w))
        vis_rgb.append(np.stack(level_rgb))
        vis_alpha.append(np.stack(level_w))
    vis_rgb = np.stack(vis_rgb, axis=1)  # [R, L, resolution, 3]
    vis_alpha = np.stack(vis_alpha, axis=1)  # [R, L, resolution]

    if renormalize:
        vis_alpha = vis_alpha / np.maximum(_F32_EPS, vis_alpha.max())

    if resolution > vis_rgb.shape[0]:
        num_rays, num_levels = vis_rgb.shape[:2]
        rep = resolution // (num_rays * num_levels + 1)
        stride = rep * num_levels
        # Rows ordered (ray, level, repeat), then one empty row after each ray's block.
        vis_rgb = np.repeat(vis_rgb, rep, axis=1).reshape((num_rays, stride) + vis_rgb.shape[2:])
        vis_alpha = np.repeat(vis_alpha, rep, axis=1).reshape((num_rays, stride) + vis_alpha.shape[2:])
        vis_rgb = np.concatenate([vis_rgb, np.zeros_like(vis_rgb[:, :1])], axis=1)
        vis_alpha = np.concatenate([vis_alpha, np.zeros_like(vis_alpha[:, :1])], axis=1)
        vis_rgb = vis_rgb.reshape((-1,) + vis_rgb.shape[2:])
        vis_alpha = vis_alpha.reshape((-1,) + vis_alpha.shape[2:])

    vis = vis_rgb * vis_alpha[..., None] + (bg_color * (1 - vis_alpha))[..., None]
    # Drop the trailing background row.
    return vis[:-1], vis_alpha[:-1]


def visualize_suite(rendering: Mapping[str, Any], rays: Any) -> Dict[str, np.ndarray]:
    """All standard visualisations of one rendered image.

    Args:
        rendering: dict with ``rgb`` [H, W, 3], ``acc`` [H, W], ``distance_mean``, ``distance_median``,
            ``distance_percentile_5``, ``distance_percentile_95`` [H, W], and per-level lists ``ray_sdist``
            [R, S+1], ``ray_weights`` [R, S], ``ray_rgbs`` [R, S, 3]; optionally ``rgb_cc``, ``normals*``
            [H, W, 3] and ``roughness`` [H, W, 1].
        rays: object with ``origins`` and ``directions`` [H, W, 3].

    Returns:
        Dict of numpy images: ``color``, ``acc``, ``color_matte``, ``depth_mean``, ``depth_median``,
        ``depth_triplet``, ``coords_mod``, ``ray_colors``, ``ray_weights``, plus ``color_corrected``, every
        ``normals*`` and ``roughness`` when present.
    """
    depth_curve_fn = lambda x: -np.log(x + _F32_EPS)  # noqa: E731

    rgb = _np(rendering['rgb'])
    acc = _np(rendering['acc'])
    distance_mean = _np(rendering['distance_mean'])
    distance_median = _np(rendering['distance_median'])
    distance_p5 = _np(rendering['distance_percentile_5'])
    distance_p95 = _np(rendering['distance_percentile_95'])
    acc = np.where(np.isnan(distance_mean), np.zeros_like(acc), acc)

    # Where rays terminate (in expectation).
    coords = _np(rays.origins) + _np(rays.directions) * distance_mean[:, :, None]

    turbo_cmap = get_colormap('turbo')
    vis_depth_mean, vis_depth_median = [
        visualize_cmap(x, acc, turbo_cmap, curve_fn=depth_curve_fn) for x in (distance_mean, distance_median)]

    # Three depth percentiles as RGB: grey = sharp surface, purple = thin even density, red = thin then thick,
    # blue = thick then thin.
    vis_depth_triplet = visualize_cmap(
        np.stack([2 * distance_median - distance_p5, distance_median, distance_p95], axis=-1), acc, None,
        curve_fn=lambda x: np.log(x + _F32_EPS))

    dist = [_np(d) for d in rendering['ray_sdist']]
    weights = [_np(w) for w in rendering['ray_weights']]
    rgbs = [np.clip(_np(r), 0, 1) for r in rendering['ray_rgbs']]
    vis_ray_colors, _ = visualize_rays(dist, (0, 1), weights, rgbs)

    sqrt_weights = [np.sqrt(w) for w in weights]
    sqrt_ray_weights, ray_alpha = visualize_rays(
        dist, (0, 1), [np.ones_like(w) for w in sqrt_weights], [w[..., None] for w in sqrt_weights], bg_color=0)
    sqrt_ray_weights = sqrt_ray_weights[..., 0]
    null_color = np.array([1.0, 0.0, 0.0])
    vis_ray_weights = np.where(
        ray_alpha[:, :, None] == 0, null_color[None, None],
        visualize_cmap(sqrt_ray_weights, np.ones_like(sqrt_ray_weights), get_colormap('gray'), lo=0, hi=1,
                       matte_background=False))

    vis = {
        'color': rgb,
        'acc': acc,
        'color_matte': matte(rgb, acc),
        'depth_mean': vis_depth_mean,
        'depth_median': vis_depth_median,
        'depth_triplet': vis_depth_triplet,
        'coords_mod': visualize_coord_mod(coords, acc),
        'ray_colors': vis_ray_colors,
        'ray_weights': vis_ray_weights,
    }
    if 'rgb_cc' in rendering:
        vis['color_corrected'] = _np(rendering['rgb_cc'])
    for key, val in rendering.items():
        if key.startswith('normals'):
            vis[key] = matte(_np(val) / 2.0 + 0.5, acc)
    if 'roughness' in rendering:
        vis['roughness'] = matte(np.tanh(_np(rendering['roughness'])), acc)
    return vis
