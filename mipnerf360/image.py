"""Image helpers: PSNR/SSIM conversions, sRGB curves, resampling, colour correction and evaluation metrics.

The conversions, sRGB curves, resampling and colour correction take numpy arrays or torch tensors and return
the same kind they were given (Python scalars are treated as numpy); `ssim` works on torch tensors, and
`MetricHarness` takes either. Images are [H, W, C] (colour last), values nominally in [0, 1].

SSIM follows Wang et al. 2004 as implemented by dm_pix (which the reference uses): an 11-tap Gaussian window
with sigma 1.5 applied separably with VALID padding, k1 = 0.01, k2 = 0.03, and the SSIM map averaged over the
valid region and the channels.
"""

from __future__ import annotations

import logging
import math
import os
import types
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from mipnerf360 import configs

Array = Union[np.ndarray, torch.Tensor]


def _is_torch(x, xnp: Optional[types.ModuleType] = None) -> bool:
    """Whether to compute with torch: an explicit ``xnp`` module wins, else the type of ``x`` decides."""
    if xnp is not None:
        return xnp is torch
    return isinstance(x, torch.Tensor)


def mse_to_psnr(mse):
    """PSNR in dB of a mean squared error, for a peak value of 1: ``-10 log10(mse)``."""
    if isinstance(mse, torch.Tensor):
        return -10.0 / math.log(10.0) * torch.log(mse)
    return -10.0 / np.log(10.0) * np.log(mse)


def psnr_to_mse(psnr):
    """Inverse of `mse_to_psnr`: ``10^(-psnr / 10)``."""
    if isinstance(psnr, torch.Tensor):
        return torch.exp(-0.1 * math.log(10.0) * psnr)
    return np.exp(-0.1 * np.log(10.0) * psnr)


def ssim_to_dssim(ssim):
    """Structural dissimilarity ``(1 - ssim) / 2``."""
    return (1 - ssim) / 2


def dssim_to_ssim(dssim):
    """Inverse of `ssim_to_dssim`: ``1 - 2 dssim``."""
    return 1 - 2 * dssim


def linear_to_srgb(linear: Array, eps: Optional[float] = None, xnp: Optional[types.ModuleType] = None) -> Array:
    """The sRGB transfer curve (IEC 61966-2-1), linear -> sRGB, for values in [0, 1].

    ``12.92 x`` up to ``x = 0.0031308``, ``1.055 x^(1/2.4) - 0.055`` above. The power branch's input is clamped
    from below by ``eps`` so that its value and gradient stay finite where it is not selected.

    Args:
        linear: [...] linear intensities.
        eps: the clamp; defaults to the machine epsilon of the input's dtype (float32's for non-float input).
        xnp: ``numpy`` or ``torch`` to force a backend; by default the input's type decides.

    Returns:
        [...] sRGB values, same kind as the input.
    """
    if _is_torch(linear, xnp):
        linear = torch.as_tensor(linear)
        if eps is None:
            eps = torch.finfo(linear.dtype if linear.is_floating_point() else torch.float32).eps
        srgb0 = 323 / 25 * linear
        srgb1 = (211 * torch.clamp_min(linear, eps) ** (5 / 12) - 11) / 200
        return torch.where(linear <= 0.0031308, srgb0, srgb1)
    linear = np.asarray(linear)
    if eps is None:
        eps = np.finfo(linear.dtype if np.issubdtype(linear.dtype, np.floating) else np.float32).eps
    srgb0 = 323 / 25 * linear
    srgb1 = (211 * np.maximum(eps, linear) ** (5 / 12) - 11) / 200
    return np.where(linear <= 0.0031308, srgb0, srgb1)


def srgb_to_linear(srgb: Array, eps: Optional[float] = None, xnp: Optional[types.ModuleType] = None) -> Array:
    """Inverse of `linear_to_srgb`: ``x / 12.92`` up to ``x = 0.04045``, ``((x + 0.055) / 1.055)^2.4`` above.

    Args:
        srgb: [...] sRGB values.
        eps: lower clamp of the power branch's base; defaults to the machine epsilon of the input's dtype.
        xnp: ``numpy`` or ``torch`` to force a backend; by default the input's type decides.

    Returns:
        [...] linear intensities, same kind as the input.
    """
    if _is_torch(srgb, xnp):
        srgb = torch.as_tensor(srgb)
        if eps is None:
            eps = torch.finfo(srgb.dtype if srgb.is_floating_point() else torch.float32).eps
        linear0 = 25 / 323 * srgb
        linear1 = torch.clamp_min((200 * srgb + 11) / 211, eps) ** (12 / 5)
        return torch.where(srgb <= 0.04045, linear0, linear1)
    srgb = np.asarray(srgb)
    if eps is None:
        eps = np.finfo(srgb.dtype if np.issubdtype(srgb.dtype, np.floating) else np.float32).eps
    linear0 = 25 / 323 * srgb
    linear1 = np.maximum(eps, (200 * srgb + 11) / 211) ** (12 / 5)
    return np.where(srgb <= 0.04045, linear0, linear1)


def downsample(img: Array, factor: int) -> Array:
    """Box-filter downsampling by an integer factor that divides both H and W.

    Args:
        img: [H, W, ...] image.
        factor: downsampling factor.

    Returns:
        [H / factor, W / factor, ...] image where each pixel is the mean of a factor x factor block.
    """
    sh = tuple(img.shape)
    if sh[0] % factor != 0 or sh[1] % factor != 0:
        raise ValueError(f'Downsampling factor {factor} does not evenly divide image shape {sh[:2]}')
    blocks = img.reshape((sh[0] // factor, factor, sh[1] // factor, factor) + sh[2:])
    if isinstance(blocks, torch.Tensor):
        return blocks.mean(dim=(1, 3))
    return blocks.mean(axis=(1, 3))


def upsample(img: Array, factor: int) -> Array:
    """Nearest-neighbour upsampling by an integer factor (not in the reference; added for convenience).

    Every pixel becomes a factor x factor block, so ``downsample(upsample(img, f), f) == img``.

    Args:
        img: [H, W, ...] image.
        factor: upsampling factor.

    Returns:
        [H * factor, W * factor, ...] image.
    """
    if isinstance(img, torch.Tensor):
        return img.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def color_correct(img: Array, ref: Array, num_iters: int = 5, eps: float = 0.5 / 255) -> Array:
    """Warps the colours of ``img`` to match ``ref`` with a robust per-channel quadratic fit.

    Each output channel is fitted by least squares as a function of all input channels' quadratic terms
    (``x_i x_j`` for ``i <= j``), linear terms and a bias. Pixels that are clipped (outside
    ``[eps, 1 - eps]``) in the input, in the reference, or in the current corrected estimate are left out, and
    the fit is repeated ``num_iters`` times as that set changes. The solve runs in float64 on the CPU
    (LAPACK's SVD-based least squares, as ``numpy.linalg.lstsq``).

    Args:
        img: [..., C] image to correct.
        ref: [..., C] reference image with the same number of channels.
        num_iters: number of fit / re-mask rounds.
        eps: margin defining clipped values.

    Returns:
        [..., C] corrected image, same kind, dtype and device as ``img``.
    """
    if img.shape[-1] != ref.shape[-1]:
        raise ValueError(f"img's {img.shape[-1]} and ref's {ref.shape[-1]} channels must match")
    as_torch = isinstance(img, torch.Tensor)
    img_t = torch.as_tensor(img)
    out_dtype, out_device = img_t.dtype, img_t.device
    num_channels = img.shape[-1]
    img_mat = img_t.detach().to('cpu', torch.float64).reshape(-1, num_channels)
    ref_mat = torch.as_tensor(ref).detach().to('cpu', torch.float64).reshape(-1, num_channels)

    def is_unclipped(z):
        return (z >= eps) & (z <= 1 - eps)

    mask0 = is_unclipped(img_mat)
    rcond = torch.finfo(torch.float64).eps
    for _ in range(num_iters):
        cols = [img_mat[:, c:c + 1] * img_mat[:, c:] for c in range(num_channels)]
        a_mat = torch.cat(cols + [img_mat, torch.ones_like(img_mat[:, :1])], dim=-1)
        warp = []
        for c in range(num_channels):
            b = ref_mat[:, c]
            mask = mask0[:, c] & is_unclipped(img_mat[:, c]) & is_unclipped(b)
            ma_mat = torch.where(mask[:, None], a_mat, torch.zeros_like(a_mat))
            mb = torch.where(mask, b, torch.zeros_like(b))
            w = torch.linalg.lstsq(ma_mat, mb[:, None], rcond=rcond, driver='gelsd').solution[:, 0]
            if not torch.isfinite(w).all():
                raise RuntimeError('color_correct: the least-squares colour fit produced non-finite weights.')
            warp.append(w)
        img_mat = torch.clamp(a_mat @ torch.stack(warp, dim=-1), 0, 1)
    corrected = img_mat.reshape(img.shape).to(out_device, out_dtype)
    return corrected if as_torch else corrected.numpy()


def _gaussian_filter_1d(filter_size: int, filter_sigma: float, like: torch.Tensor) -> torch.Tensor:
    """Normalised 1D Gaussian taps, [filter_size], centred (half-integer centre for even sizes)."""
    half = filter_size // 2
    shift = (2 * half - filter_size + 1) / 2
    offsets = torch.arange(filter_size, device=like.device, dtype=like.dtype) - half + shift
    taps = torch.exp(-0.5 * (offsets / filter_sigma) ** 2)
    return taps / taps.sum()


SSIM_FILTER_SIZE = 11  # dm_pix's (and the reference's) SSIM window.


def ssim(img0: torch.Tensor, img1: torch.Tensor, max_val: float = 1.0, filter_size: int = SSIM_FILTER_SIZE,
         filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, return_map: bool = False) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of image pairs, as dm_pix.ssim computes it.

    Local means, variances and covariance come from a separable Gaussian window applied with VALID padding;
    variances are clamped to at least float32 eps^2 and the covariance magnitude to at most
    ``sqrt(var0 var1)``. The SSIM map ``(2 mu0 mu1 + c1)(2 cov + c2) / ((mu0^2 + mu1^2 + c1)(var0 + var1 + c2))``
    with ``c = (k max_val)^2`` is averaged over the valid region and the channels.

    Args:
        img0: [..., H, W, C] images.
        img1: [..., H, W, C] images, same shape.
        max_val: the dynamic range of the images.
        filter_size: Gaussian window width (H and W must be at least this).
        filter_sigma: Gaussian standard deviation in pixels.
        k1, k2: SSIM stabilising constants.
        return_map: return the [..., H - filter_size + 1, W - filter_size + 1, C] map instead of the mean.

    Returns:
        [...] mean SSIM per image (or the map).
    """
    if img0.shape != img1.shape:
        raise ValueError(f'ssim: image shapes differ, {tuple(img0.shape)} vs {tuple(img1.shape)}')
    if img0.ndim < 3:
        raise ValueError(f'ssim: expected [..., H, W, C] images, got shape {tuple(img0.shape)}')
    batch_shape, (h, w, c) = img0.shape[:-3], img0.shape[-3:]
    if h < filter_size or w < filter_size:
        raise ValueError(f'ssim: image size {h}x{w} is smaller than the {filter_size}-pixel window')

    taps = _gaussian_filter_1d(filter_size, filter_sigma, img0)
    # Filter a, b, a^2, b^2, ab together: [5 * batch * C, 1, H, W].
    stack = torch.stack([img0, img1, img0 * img0, img1 * img1, img0 * img1], dim=0)
    planes = stack.reshape((-1, h, w, c)).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    planes = F.conv2d(planes, taps.view(1, 1, 1, -1))
    planes = F.conv2d(planes, taps.view(1, 1, -1, 1))
    hv, wv = planes.shape[-2:]
    planes = planes.reshape((5, -1, c, hv, wv)).permute(0, 1, 3, 4, 2).reshape((5,) + batch_shape + (hv, wv, c))
    mu0, mu1, m00, m11, m01 = planes.unbind(0)

    mu00, mu11, mu01 = mu0 * mu0, mu1 * mu1, mu0 * mu1
    floor = torch.finfo(torch.float32).eps ** 2
    sigma00 = torch.clamp_min(m00 - mu00, floor)
    sigma11 = torch.clamp_min(m11 - mu11, floor)
    sigma01 = m01 - mu01
    sigma01 = torch.sign(sigma01) * torch.minimum(torch.sqrt(sigma00 * sigma11), sigma01.abs())

    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    ssim_map = ((2 * mu01 + c1) * (2 * sigma01 + c2)) / ((mu00 + mu11 + c1) * (sigma00 + sigma11 + c2))
    return ssim_map if return_map else ssim_map.mean(dim=(-3, -2, -1))


# Backbone weight files torchvision caches under <torch hub dir>/checkpoints for each LPIPS network.
_LPIPS_BACKBONE_FILES = {
    'alex': 'alexnet-owt-7be5be79.pth',
    'vgg': 'vgg16-397923af.pth',
    'squeeze': 'squeezenet1_1-b8a52dc0.pth',
}
_LPIPS_WARNED = set()


def load_lpips(net: str = 'alex') -> Tuple[Optional[torch.nn.Module], str]:
    """Builds an LPIPS model if that needs no download, else explains why not.

    LPIPS needs the ``lpips`` package and its backbone's ImageNet weights in the torch hub cache
    (``torch.hub.get_dir()/checkpoints``). Nothing is downloaded.

    Returns:
        ``(model, '')`` when available, else ``(None, reason)``.
    """
    if net not in _LPIPS_BACKBONE_FILES:
        return None, (f'LPIPS unavailable: unknown network {net!r}, expected one of '
                      f'{sorted(_LPIPS_BACKBONE_FILES)}.')
    try:
        import lpips  # noqa: F401 (optional dependency)
    except ImportError:
        return None, 'LPIPS unavailable: the `lpips` package is not installed (pip install lpips).'
    weights = os.path.join(torch.hub.get_dir(), 'checkpoints', _LPIPS_BACKBONE_FILES[net])
    if not os.path.isfile(weights):
        return None, (f'LPIPS unavailable: backbone weights {weights} are not in the torch hub cache and will '
                      'not be downloaded; fetch them once (e.g. construct lpips.LPIPS(net=...) online).')
    try:
        model = lpips.LPIPS(net=net, verbose=False).eval()
    except Exception as e:  # pragma: no cover - depends on the local installation
        return None, f'LPIPS unavailable: building lpips.LPIPS(net={net!r}) failed: {e}'
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ''


def _to_image_tensor(img: Array) -> torch.Tensor:
    """A float64 torch [H, W, C] copy of a numpy or torch image (on the tensor's own device)."""
    t = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img.detach()
    return t.to(torch.float64)


class MetricHarness:
    """Evaluates PSNR, SSIM and (when available locally) LPIPS between a predicted and a true image.

    Inputs are numpy arrays or torch tensors, [H, W, 3] with values in [0, 1]; metrics are computed in float64
    on the input's device. The returned dict maps ``name_fn('psnr')``, ``name_fn('ssim')`` (and
    ``name_fn('lpips')`` when LPIPS is available) to Python floats. If LPIPS is requested but unavailable, one
    warning per process says why and the key is left out; ``lpips_message`` holds the reason.
    """

    def __init__(self, compute_lpips: bool = True, lpips_net: str = 'alex'):
        self.ssim_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ssim
        self.lpips_model: Optional[torch.nn.Module] = None
        self.lpips_message = 'LPIPS not requested.'
        if compute_lpips:
            self.lpips_model, self.lpips_message = load_lpips(lpips_net)
            if self.lpips_model is None and self.lpips_message not in _LPIPS_WARNED:
                _LPIPS_WARNED.add(self.lpips_message)
                logging.warning(self.lpips_message)

    @property
    def lpips_available(self) -> bool:
        return self.lpips_model is not None

    def __call__(self, rgb_pred: Array, rgb_gt: Array, name_fn: Callable[[str], str] = lambda s: s
                 ) -> Dict[str, float]:
        pred, gt = _to_image_tensor(rgb_pred), _to_image_tensor(rgb_gt)
        if pred.shape != gt.shape:
            raise ValueError(f'MetricHarness: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} '
                             'shapes differ.')
        if min(pred.shape[-3:-1]) < SSIM_FILTER_SIZE:
            raise configs.ConfigError(
                    f'The evaluated images are {pred.shape[-2]}x{pred.shape[-3]} pixels, smaller than the '
                    f'{SSIM_FILTER_SIZE}-pixel SSIM window; use a smaller Config.factor (or a smaller '
                    'Config.eval_crop_borders) so that the test images are at least that large.')
        gt = gt.to(pred.device)
        metrics = {
            name_fn('psnr'): float(mse_to_psnr(((pred - gt) ** 2).mean())),
            name_fn('ssim'): float(self.ssim_fn(pred, gt)),
        }
        if self.lpips_model is not None:
            metrics[name_fn('lpips')] = self.lpips(pred, gt)
        return metrics

    def lpips(self, pred: torch.Tensor, gt: torch.Tensor) -> float:
        """LPIPS distance of two [H, W, 3] images in [0, 1] (requires `lpips_available`)."""
        if self.lpips_model is None:
            raise RuntimeError(self.lpips_message)
        model = self.lpips_model.to(pred.device)
        to_nchw = lambda x: (x.to(torch.float32).permute(2, 0, 1)[None] * 2 - 1)  # noqa: E731
        with torch.no_grad():
            return float(model(to_nchw(pred), to_nchw(gt)).mean())
