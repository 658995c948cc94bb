"""Reflection directions and (integrated) directional encodings for Ref-NeRF.

Ref-NeRF (Verbin et al., CVPR 2022, arXiv:2112.03907) encodes a reflected view direction ``ω_r`` with the
integrated directional encoding (IDE, Eqs. 6-8): the expected value of the spherical harmonics ``Y_l^m`` under
a von Mises-Fisher lobe centred on ``ω_r`` with concentration ``κ``, which in closed form is
``exp(-l (l + 1) / (2 κ)) Y_l^m(ω_r)``. Only degrees ``l = 1, 2, 4, ..., 2^(deg_view - 1)`` and orders
``m >= 0`` are used; the complex harmonics are returned as their real parts followed by their imaginary parts.

The harmonics are evaluated as ``(x + i y)^m * P(z)`` where ``P`` is a polynomial in ``z`` whose coefficients
(the product of the normalisation constant and the associated Legendre coefficients) are precomputed in float64
with numpy. The complex power is carried out with real arithmetic, so no complex tensors are involved.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

MAX_IDE_DEG_VIEW = 5  # The largest `deg_view` of `generate_ide_fn`: its coefficients lose precision beyond.


def reflect(viewdirs: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Reflects directions about unit normals: ``u = 2 (n·v) n - v`` (Ref-NeRF Eq. 4).

    ``u`` has the same angle to ``n`` as ``v`` and the same length as ``v`` (when ``n`` is unit length).

    Args:
        viewdirs: [..., 3] directions to reflect (pointing away from the surface, towards the camera).
        normals: [..., 3] unit normal vectors.

    Returns:
        [..., 3] reflected directions.
    """
    return 2.0 * (normals * viewdirs).sum(dim=-1, keepdim=True) * normals - viewdirs


def l2_normalize(x: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
    """Scales ``x`` to unit length along its last axis.

    The squared norm is clamped from below by ``eps`` before the square root, so a zero vector maps to zero
    and the gradient stays finite (``1 / sqrt(eps)``) there instead of becoming NaN.

    Args:
        x: [..., d] vectors.
        eps: lower bound on the squared norm; defaults to the machine epsilon of ``x.dtype`` (the reference
            uses float32's, which is what this gives for float32 input).

    Returns:
        [..., d] normalised vectors.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    sq_norm = (x * x).sum(dim=-1, keepdim=True)
    return x / torch.sqrt(torch.clamp_min(sq_norm, eps))


def compute_weighted_mae(weights: torch.Tensor, normals: torch.Tensor, normals_gt: torch.Tensor) -> torch.Tensor:
    """Weighted mean angular error in degrees between two sets of unit normals.

    Args:
        weights: [...] non-negative weights (e.g. accumulated opacity).
        normals: [..., 3] predicted unit normals.
        normals_gt: [..., 3] ground-truth unit normals.

    Returns:
        Scalar tensor, ``sum(w * angle) / sum(w)`` in degrees.
    """
    one_eps = 1.0 - torch.finfo(normals.dtype).eps
    cos = torch.clamp((normals * normals_gt).sum(dim=-1), -one_eps, one_eps)
    return (weights * torch.arccos(cos)).sum() / weights.sum() * (180.0 / math.pi)


def generalized_binomial_coeff(a: float, k: int) -> float:
    """Binomial coefficient ``a choose k`` for real ``a`` and integer ``k >= 0``: ``prod_{j<k}(a - j) / k!``."""
    return float(np.prod(a - np.arange(k))) / math.factorial(k)


def assoc_legendre_coeff(l: int, m: int, k: int) -> float:  # noqa: E741 (l is the standard name)
    """Coefficient of ``cos(θ)^k sin(θ)^m`` in the associated Legendre function ``P_l^m(cos θ)``.

    Uses the explicit expansion ``P_l^m(x) = (-1)^m 2^l (1 - x^2)^(m/2) sum_k k!/(k-m)! x^(k-m)
    C(l, k) C((l + k - 1)/2, l)`` re-indexed so that ``k`` is the power of ``x`` (Condon-Shortley phase
    included).

    Args:
        l: degree.
        m: order, ``0 <= m <= l``.
        k: power of ``cos θ``, ``0 <= k <= l - m``.

    Returns:
        The coefficient, a Python float.
    """
    return ((-1) ** m * 2 ** l * math.factorial(l) / math.factorial(k) / math.factorial(l - k - m)
            * generalized_binomial_coeff(0.5 * (l + k + m - 1.0), l))


def sph_harm_coeff(l: int, m: int, k: int) -> float:  # noqa: E741
    """Coefficient of ``cos(θ)^k sin(θ)^m e^{i m φ}`` in the orthonormal spherical harmonic ``Y_l^m``."""
    norm = math.sqrt((2.0 * l + 1.0) * math.factorial(l - m) / (4.0 * math.pi * math.factorial(l + m)))
    return norm * assoc_legendre_coeff(l, m, k)


def get_ml_array(deg_view: int) -> np.ndarray:
    """The (m, l) pairs used by the encoding.

    Degrees are ``l = 2^i`` for ``i < deg_view`` and orders ``m = 0..l`` (negative orders are covered by the
    imaginary parts).

    Returns:
        [2, n] int array; row 0 holds ``m`` and row 1 holds ``l``, ordered by ``l`` then ``m``.
    """
    pairs = [(m, 2 ** i) for i in range(deg_view) for m in range(2 ** i + 1)]
    return np.array(pairs).T


def _cached_constants(cache: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, ...]],
                      arrays: Tuple[np.ndarray, ...], ref: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The numpy constants as tensors on ``ref``'s device (float ones in its dtype), built once per key."""
    key = (ref.device, ref.dtype)
    if key not in cache:
        cache[key] = tuple(
            torch.as_tensor(a, device=ref.device, dtype=ref.dtype if a.dtype.kind == 'f' else torch.long)
            for a in arrays)
    return cache[key]


def generate_ide_fn(deg_view: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Builds the integrated directional encoding of Ref-NeRF (Eqs. 6-8).

    Args:
        deg_view: number of degrees ``l = 1, 2, 4, ..., 2^(deg_view - 1)``; at most ``MAX_IDE_DEG_VIEW`` (5).

    Returns:
        ``fn(xyz, kappa_inv)`` with ``xyz`` [..., 3] unit directions and ``kappa_inv`` [..., 1] the reciprocal
        vMF concentration, returning [..., 2 n] (real parts of the n attenuated harmonics, then imaginary
        parts), n = ``get_ml_array(deg_view).shape[1]``.

    Raises:
        ValueError: if ``deg_view > MAX_IDE_DEG_VIEW`` (the polynomial coefficients lose precision beyond that).
    """
    if deg_view > MAX_IDE_DEG_VIEW:
        raise ValueError(f'deg_view must be at most {MAX_IDE_DEG_VIEW} for a numerically stable encoding, got '
                         f'{deg_view}.')

    ml_array = get_ml_array(deg_view)
    l_max = 2 ** (deg_view - 1)
    m_max = int(ml_array[0].max())

    # Column j holds the coefficients of z^0..z^l_max of the z-polynomial of harmonic j.
    coeffs = np.zeros((l_max + 1, ml_array.shape[1]))
    for j, (m, l) in enumerate(ml_array.T):
        for k in range(l - m + 1):
            coeffs[k, j] = sph_harm_coeff(int(l), int(m), k)
    # vMF attenuation exponent l (l + 1) / 2 for each harmonic.
    sigma = 0.5 * ml_array[1] * (ml_array[1] + 1.0)
    m_index = ml_array[0].astype(np.int64)
    cache: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, ...]] = {}

    def integrated_dir_enc_fn(xyz: torch.Tensor, kappa_inv: torch.Tensor) -> torch.Tensor:
        coeffs_t, sigma_t, m_index_t = _cached_constants(cache, (coeffs, sigma, m_index), xyz)
        x, y, z = xyz[..., 0:1], xyz[..., 1:2], xyz[..., 2:3]


        # Real and imaginary parts of (x + i y)^m for m = 0 .. m_max.
        re_pows, im_pows = [torch.ones_like(x)], [torch.zeros_like(x)]
        for _ in range(m_max):
            re, im = re_pows[-1], im_pows[-1]
            re_pows.append(re * x - im * y)
            im_pows.append(re * y + im * x)
        re_xy = torch.cat(re_pows, dim=-1).index_select(-1, m_index_t)
        im_xy = torch.cat(im_pows, dim=-1).index_select(-1, m_index_t)

        # Polynomial in z (sum_k coeffs[k] z^k, accumulated elementwise rather than by a matmul so that TF32
        # or autocast never touch these large, cancelling coefficients), times the vMF attenuation.
        poly = coeffs_t[0].expand(z.shape[:-1] + coeffs_t.shape[1:])
        z_pow = z
        for k in range(1, l_max + 1):
            poly = poly + z_pow * coeffs_t[k]
            z_pow = z_pow * z
        radial = poly * torch.exp(-sigma_t * kappa_inv)
        return torch.cat([re_xy * radial, im_xy * radial], dim=-1)

    return integrated_dir_enc_fn


def generate_dir_enc_fn(deg_view: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain directional encoding: the IDE with ``kappa_inv = 0``.

    Returns:
        ``fn(xyz)`` mapping [..., 3] unit directions to [..., 2 n] encodings (see `generate_ide_fn`).
    """
    ide_fn = generate_ide_fn(deg_view)

    def dir_enc_fn(xyz: torch.Tensor) -> torch.Tensor:
        return ide_fn(xyz, torch.zeros_like(xyz[..., :1]))

    return dir_enc_fn
