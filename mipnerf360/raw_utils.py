"""RawNeRF helpers: Bayer masks and demosaicking, raw -> sRGB post-processing, EXIF metadata and raw loading.

Functions that take an ``xnp`` argument run on numpy arrays (``xnp=np``) or torch tensors (``xnp=torch``); with
``xnp=None`` the input's type decides. Reading DNG files needs the optional ``rawpy`` package, imported only
when a raw file is actually read.
"""

from __future__ import annotations

import glob
import json
import os
import types
from typing import Any, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mipnerf360 import image as lib_image
from mipnerf360 import utils
from mipnerf360.datasets.scene import DatasetError, DatasetNotFoundError

Array = Union[np.ndarray, torch.Tensor]
Axis = Optional[Union[int, Tuple[int, ...]]]


def _use_torch(x, xnp: Optional[types.ModuleType]) -> bool:
    if xnp is not None:
        return xnp is torch
    return isinstance(x, torch.Tensor)


def _percentile_torch(x: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(x, q)`` (linear interpolation) of all elements, without torch.quantile's size cap."""
    flat = x.reshape(-1)
    pos = (q / 100.0) * (flat.numel() - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


class RawpyMissingError(DatasetError, ImportError):
    """Config.rawnerf_mode without the optional `rawpy` package."""


def _import_rawpy():
    try:
        import rawpy
    except ImportError:
        raise RawpyMissingError('Reading raw (DNG) images (Config.rawnerf_mode = True) needs the optional `rawpy` '
                                'package: pip install rawpy') from None
    return rawpy


def _read_dng(rawpy, path: str) -> np.ndarray:
    try:
        with utils.open_file(path, 'rb') as f:
            return rawpy.imread(f).raw_image
    except (OSError, rawpy.LibRawError) as e:
        raise DatasetError(f'Cannot read the raw image {path} ({type(e).__name__}: {e}); replace or remove '
                           'it (it must be a DNG file rawpy can open).') from None


def postprocess_raw(raw: Array, camtorgb: Array, exposure: Optional[float] = None,
                    xnp: Optional[types.ModuleType] = None) -> Array:
    """Turns a demosaicked raw image into sRGB with a minimal pipeline: colour matrix, exposure, gamma.

    Args:
        raw: [H, W, 3] demosaicked raw camera image.
        camtorgb: [3, 3] camera-RGB -> linear-sRGB colour matrix (applied as ``raw @ camtorgb.T``).
        exposure: linear value mapped to white after colour correction; None picks the 97th percentile.
        xnp: ``numpy`` or ``torch``; by default the type of ``raw`` decides.

    Returns:
        [H, W, 3] sRGB image in [0, 1].
    """
    if raw.shape[-1] != 3:
        raise ValueError(f'raw.shape[-1] is {raw.shape[-1]}, expected 3')
    if tuple(camtorgb.shape) != (3, 3):
        raise ValueError(f'camtorgb.shape is {tuple(camtorgb.shape)}, expected (3, 3)')
    if _use_torch(raw, xnp):
        raw = torch.as_tensor(raw)
        camtorgb = torch.as_tensor(camtorgb, dtype=raw.dtype, device=raw.device)
        rgb_linear = raw @ camtorgb.T
        if exposure is None:
            exposure = _percentile_torch(rgb_linear, 97)
        scaled = torch.clamp(rgb_linear / exposure, 0, 1)
        return lib_image.linear_to_srgb(scaled, xnp=torch)
    raw, camtorgb = np.asarray(raw), np.asarray(camtorgb)
    rgb_linear = raw @ camtorgb.T
    if exposure is None:
        exposure = np.percentile(rgb_linear, 97)
    scaled = np.clip(rgb_linear / exposure, 0, 1)
    return lib_image.linear_to_srgb(scaled, xnp=np)


def pixels_to_bayer_mask(pix_x: Array, pix_y: Array) -> Array:
    """RGGB Bayer mask of integer pixel coordinates: red at (even x, even y), blue at (odd, odd), else green.

    Args:
        pix_x: [...] integer x (column) coordinates.
        pix_y: [...] integer y (row) coordinates.

    Returns:
        [..., 3] float32 one-hot masks (numpy, or torch if ``pix_x`` is a tensor).
    """
    if isinstance(pix_x, torch.Tensor):
        x_odd, y_odd = (pix_x % 2 == 1), (torch.as_tensor(pix_y, device=pix_x.device) % 2 == 1)
        r = ~x_odd & ~y_odd
        g = x_odd ^ y_odd
        b = x_odd & y_odd
        return torch.stack([r, g, b], dim=-1).to(torch.float32)
    x_odd, y_odd = (np.asarray(pix_x) % 2 == 1), (np.asarray(pix_y) % 2 == 1)
    return np.stack([~x_odd & ~y_odd, x_odd ^ y_odd, x_odd & y_odd], axis=-1).astype(np.float32)


def bilinear_demosaic(bayer: Array, xnp: Optional[types.ModuleType] = None) -> Array:
    """Bilinear demosaicking of an RGGB Bayer mosaic.

    The 2x2 tile is ``[[R, G], [G, B]]``. Red and blue planes are upsampled 2x bilinearly (red samples sit at
    the top-left of their tile, blue at the bottom-right); a missing green value is the mean of its four
    horizontal/vertical neighbours. Neighbours wrap around at the right/bottom (red) and left/top (blue)
    borders, as in the reference; raw images have a few unusable border rows/columns anyway.

    Args:
        bayer: [H, W] mosaic, H and W even.
        xnp: ``numpy`` or ``torch``; by default the input's type decides.

    Returns:
        [H, W, 3] RGB image.
    """
    use_torch = _use_torch(bayer, xnp)
    if use_torch:
        bayer = torch.as_tensor(bayer)
        roll = lambda z, s, axis: torch.roll(z, s, dims=axis)  # noqa: E731
        stack = lambda zs: torch.stack(zs, dim=-1)  # noqa: E731
        flip = lambda z: torch.flip(z, dims=(0, 1))  # noqa: E731
    else:
        bayer = np.asarray(bayer)
        roll = lambda z, s, axis: np.roll(z, s, axis=axis)  # noqa: E731
        stack = lambda zs: np.stack(zs, axis=-1)  # noqa: E731
        flip = lambda z: z[::-1, ::-1]  # noqa: E731

    def interleave(top_left, top_right, bottom_left, bottom_right):
        """Four [h, w] planes -> one [2h, 2w] image with each plane at its position in the 2x2 tiles."""
        quads = stack([top_left, top_right, bottom_left, bottom_right])
        h, w = quads.shape[:2]
        quads = quads.reshape(h, w, 2, 2)
        quads = quads.permute(0, 2, 1, 3) if use_torch else quads.transpose(0, 2, 1, 3)
        return quads.reshape(2 * h, 2 * w)

    def upsample_top_left(z):
        """2x bilinear upsampling of samples located at the top-left pixel of each tile."""
        right = 0.5 * (z + roll(z, -1, -1))
        below = 0.5 * (z + roll(z, -1, -2))
        diagonal = 0.5 * (right + roll(right, -1, -2))
        return interleave(z, right, below, diagonal)

    def fill_green(g_top_right, g_bottom_left):
        """Green at its observed sites, and the mean of the 4-neighbourhood at the red and blue sites."""
        zeros = g_top_right * 0
        sparse = interleave(zeros, g_top_right, g_bottom_left, zeros)
        cross = 0.25 * (roll(sparse, 1, -1) + roll(sparse, -1, -1) + roll(sparse, 1, -2) + roll(sparse, -1, -2))
        # The cross average is exactly 0 at observed green sites, since all their neighbours are red/blue.
        return sparse + cross

    red, g1, g2, blue = bayer[0::2, 0::2], bayer[0::2, 1::2], bayer[1::2, 0::2], bayer[1::2, 1::2]
    red = upsample_top_left(red)
    blue = flip(upsample_top_left(flip(blue)))
    green = fill_green(g1, g2)
    return stack([red, green, blue])


def bilinear_demosaic_torch(bayer: torch.Tensor) -> torch.Tensor:
    """`bilinear_demosaic` on a torch tensor (the counterpart of the reference's ``bilinear_demosaic_jax``)."""
    return bilinear_demosaic(bayer, xnp=torch)


def load_raw_images(image_dir: str, image_names: Optional[Sequence[str]] = None
                    ) -> Tuple[np.ndarray, Sequence[Mapping[str, Any]]]:
    """Reads raw DNG images and their exiftool JSON metadata.

    Args:
        image_dir: folder holding ``NAME.dng`` and ``NAME.json`` (``exiftool -json NAME.dng > NAME.json``).
        image_names: names to load (extensions ignored); None loads every ``*.dng`` in sorted order.

    Returns:
        ``(images, exifs)``: [N, H, W] float32 raw sensor values and N EXIF dicts.

    Raises:
        DatasetError: if ``image_dir`` does not exist or holds no DNG files, a DNG file is unreadable, or its
            EXIF file is missing or not ``exiftool -json`` output.
        RawpyMissingError (a DatasetError and ImportError): if ``rawpy`` is not installed.
    """
    if not utils.file_exists(image_dir):
        raise DatasetNotFoundError(f'Raw image folder {image_dir} does not exist; RawNeRF scenes '
                                   '(Config.rawnerf_mode = True) keep their DNG files in DATA_DIR/raw.')
    rawpy = _import_rawpy()

    def load_raw_exif(image_name):
        base = os.path.join(image_dir, os.path.splitext(image_name)[0])
        json_path = base + '.json'
        if not utils.file_exists(json_path):
            raise DatasetError(f'Missing EXIF metadata {json_path}; create it with `exiftool -json {base}.dng > '
                               f'{json_path}`.')
        raw = _read_dng(rawpy, base + '.dng')
        try:
            with utils.open_file(json_path, 'rb') as f:
                exif = json.load(f)[0]
            if not isinstance(exif, dict):
                raise TypeError(f'its first entry is a {type(exif).__name__}, not an object')
        except (ValueError, IndexError, KeyError, TypeError) as e:
            raise DatasetError(f'{json_path} is not exiftool JSON output ({e}); recreate it with `exiftool -json '
                               f'{base}.dng > {json_path}`.') from None
        return raw, exif

    if image_names is None:
        image_names = [os.path.basename(f) for f in sorted(glob.glob(os.path.join(image_dir, '*.dng')))]
    if not image_names:
        raise DatasetError(f'No raw images (*.dng) found in {image_dir}; put the DNG files (and their exiftool '
                           'JSON files) there or set Config.rawnerf_mode = False.')
    raws, exifs = zip(*[load_raw_exif(name) for name in image_names])
    return np.stack(raws, axis=0).astype(np.float32), exifs


# Brightness percentiles at which raw images are re-exposed for the training-log visualisations.
_PERCENTILE_LIST = (80, 90, 97, 99, 100)

# EXIF fields used (see the DNG 1.4 specification): black/white levels, white balance, the XYZ->camera matrix
# for the second reference illuminant, and the noise profile.
_EXIF_KEYS = ('BlackLevel', 'WhiteLevel', 'AsShotNeutral', 'ColorMatrix2', 'NoiseProfile')

# Linear sRGB -> CIE XYZ (D65), from Bruce Lindbloom's RGB/XYZ matrices.
_RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                     [0.2126729, 0.7151522, 0.0721750],
                     [0.0193339, 0.1191920, 0.9503041]])


def _shutter_seconds(value: str) -> float:
    parts = str(value).split('/')
    if len(parts) != 2:
        raise ValueError(f'EXIF field ShutterSpeed has unsupported value {value!r} (expected a fraction "1/N")')
    return 1.0 / float(parts[1])


def process_exif(exifs: Sequence[Mapping[str, Any]]) -> MutableMapping[str, Any]:
    """Gathers the EXIF fields RawNeRF needs into arrays and builds camera -> linear sRGB matrices.

    Args:
        exifs: N dicts as written by ``exiftool -json``.

    Returns:
        Dict with the `_EXIF_KEYS` present (stacked over images, squeezed), ``'ShutterSpeed'`` [N] in seconds
        and ``'cam2rgb'`` [N, 3, 3] (white balance, then the row-normalised inverse of XYZ->camera composed
        with sRGB->XYZ).
    """
    meta = {}
    first = exifs[0]
    for key in _EXIF_KEYS:
        value = first.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            vals = [x[key] for x in exifs]
        elif isinstance(value, str):
            vals = [[float(z) for z in x[key].split(' ')] for x in exifs]
        else:
            raise ValueError(f'EXIF field {key} has unsupported value {value!r} (expected a number or a string '
                             'of numbers)')
        meta[key] = np.squeeze(np.array(vals))
    # Shutter speed is written as a fraction "1/N".
    meta['ShutterSpeed'] = np.fromiter((_shutter_seconds(x['ShutterSpeed']) for x in exifs), float)

    # camera -> white-balanced camera -> XYZ -> linear sRGB.
    whitebalance = meta['AsShotNeutral'].reshape(-1, 3)
    cam2camwb = np.array([np.diag(1.0 / wb) for wb in whitebalance])
    xyz2camwb = meta['ColorMatrix2'].reshape(-1, 3, 3)
    rgb2camwb = xyz2camwb @ _RGB2XYZ
    rgb2camwb /= rgb2camwb.sum(axis=-1, keepdims=True)
    meta['cam2rgb'] = np.linalg.inv(rgb2camwb) @ cam2camwb
    return meta


def load_raw_dataset(split: utils.DataSplit, data_dir: str, image_names: Sequence[str],
                     exposure_percentile: float, n_downsample: int
                     ) -> Tuple[np.ndarray, MutableMapping[str, Any], bool]:
    """Loads a RawNeRF scene: raw images scaled to [0, 1], demosaicked and optionally downsampled.

    Test scenes (with ``hdrplus_test/merged.dng``) keep train and test raws under ``raw/train`` and
    ``raw/test``; their test split is the HDR+ merged frame, rescaled to the shortest shutter.

    Args:
        split: `utils.DataSplit.TRAIN` or `.TEST` (only matters for test scenes).
        data_dir: scene folder.
        image_names: image names posed by COLMAP.
        exposure_percentile: brightness percentile exposed to white when post-processing.
        n_downsample: integer downsampling factor of the returned images.

    Returns:
        ``(images, meta, testscene)``: [N, H / n, W / n, 3] float images; the `process_exif` dict plus
        ``exposure_idx`` [N], ``unique_shutters`` (descending), ``exposure_values`` [N] (1 for the longest
        shutter), ``exposure``, ``exposure_levels`` and ``postprocess_fn(z, exposure=exposure)``; and whether
        this is a test scene.
    """
    image_dir = os.path.join(data_dir, 'raw')
    testimg_file = os.path.join(data_dir, 'hdrplus_test/merged.dng')
    testscene = utils.file_exists(testimg_file)
    if testscene:
        image_dir = os.path.join(image_dir, split.value)
        if split == utils.DataSplit.TEST:
            image_names = None  # COLMAP's names do not apply to the test split.
        else:
            image_names = image_names[1:]  # The first posed image duplicates the test frame.

    raws, exifs = load_raw_images(image_dir, image_names)
    try:
        for key in _EXIF_KEYS[:4] + ('ShutterSpeed',):
            if any(key not in exif for exif in exifs):
                raise KeyError(key)
        meta = process_exif(exifs)
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        missing = f'field {e} is missing' if isinstance(e, KeyError) else str(e)
        raise DatasetError(f'Bad EXIF metadata in the JSON files of {image_dir}: {missing}. RawNeRF needs '
                           f'{", ".join(_EXIF_KEYS[:4])} and ShutterSpeed ("1/N"); recreate each with '
                           '`exiftool -json NAME.dng > NAME.json`.') from None

    if testscene and split == utils.DataSplit.TEST:
        testraw = _read_dng(_import_rawpy(), testimg_file)
        # The HDR+ merge carries 2 extra fractional bits.
        testraw = testraw.astype(np.float32) / 4.0
        shutter_ratio = meta['ShutterSpeed'][0] / meta['ShutterSpeed'][-1]
        raws = testraw[None]
        meta = {k: meta[k][:1] for k in meta}
    else:
        shutter_ratio = 1.0

    shutter_speeds = meta['ShutterSpeed']
    unique_shutters = np.sort(np.unique(shutter_speeds))[::-1]  # Longest (brightest) first.
    exposure_idx = np.zeros_like(shutter_speeds, dtype=np.int32)
    for i, shutter in enumerate(unique_shutters):
        exposure_idx[shutter_speeds == shutter] = i
    meta['exposure_idx'] = exposure_idx
    meta['unique_shutters'] = unique_shutters
    meta['exposure_values'] = shutter_speeds / unique_shutters[0]

    blacklevel = meta['BlackLevel'].reshape(-1, 1, 1)
    whitelevel = meta['WhiteLevel'].reshape(-1, 1, 1)
    images = (raws - blacklevel) / (whitelevel - blacklevel) * shutter_ratio

    # The exposure level is always measured on the first full-resolution image.
    image0_rgb = bilinear_demosaic(images[0].astype(np.float32), xnp=np) @ meta['cam2rgb'][0].T
    exposure = np.percentile(image0_rgb, exposure_percentile)
    meta['exposure'] = exposure
    meta['exposure_levels'] = {p: np.percentile(image0_rgb, p) for p in _PERCENTILE_LIST}

    cam2rgb0 = meta['cam2rgb'][0]
    meta['postprocess_fn'] = lambda z, x=exposure: postprocess_raw(z, cam2rgb0, x)

    height, width = images.shape[1:3]
    if n_downsample > 1 and (height % n_downsample or width % n_downsample):
        raise DatasetError(f'The raw images of {image_dir} are {width}x{height}, which Config.factor = '
                           f'{n_downsample} does not divide; use a factor that divides both sides (or 0).')

    def process(im):
        rgb = bilinear_demosaic(torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)), xnp=torch)
        if n_downsample > 1:
            rgb = lib_image.downsample(rgb, n_downsample)
        return rgb.numpy()

    images = np.stack([process(im) for im in images], axis=0)
    return images, meta, testscene


def best_fit_affine(x: Array, y: Array, axis: Axis) -> Tuple[Array, Array]:
    """Least-squares ``a, b`` with ``a x + b ≈ y`` along ``axis``: ``a = Cov(x, y) / Var(x)``."""
    if isinstance(x, torch.Tensor):
        dims = axis
        mean = lambda z: z.mean(dim=dims)  # noqa: E731
    else:
        mean = lambda z: np.mean(z, axis=axis)  # noqa: E731
    x_m, y_m = mean(x), mean(y)
    xy_m, xx_m = mean(x * y), mean(x * x)
    a = (xy_m - x_m * y_m) / (xx_m - x_m * x_m)
    b = y_m - a * x_m
    return a, b


def match_images_affine(est: Array, gt: Array, axis: Axis = (0, 1)) -> Array:
    """Fits ``gt -> est`` affinely (robust to a noisy ``est``) and maps ``est`` back through its inverse."""
    a, b = best_fit_affine(gt, est, axis=axis)
    return (est - b) / a
