"""Tests for mipnerf360.raw_utils (Bayer masks, demosaicking, raw post-processing, EXIF handling)."""

import importlib.util

import numpy as np
import pytest
import torch

from mipnerf360 import image, raw_utils, utils


def test_bayer_mask_pattern():
    pix_x, pix_y = np.meshgrid(np.arange(4), np.arange(4))
    mask = raw_utils.pixels_to_bayer_mask(pix_x, pix_y)
    assert mask.shape == (4, 4, 3) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask.sum(-1), 1.0)
    channel = mask.argmax(-1)  # 0 = R, 1 = G, 2 = B.
    np.testing.assert_array_equal(channel, [[0, 1, 0, 1], [1, 2, 1, 2], [0, 1, 0, 1], [1, 2, 1, 2]])
    mask_t = raw_utils.pixels_to_bayer_mask(torch.tensor(pix_x), torch.tensor(pix_y))
    np.testing.assert_array_equal(mask_t.numpy(), mask)


@pytest.mark.parametrize('kind', ['numpy', 'torch'])
def test_demosaic_constant_and_observed_values(kind):
    h, w = 12, 16
    const = np.full((h, w), 0.42, np.float32)
    bayer_in = torch.tensor(const) if kind == 'torch' else const
    out = np.asarray(raw_utils.bilinear_demosaic(bayer_in))
    assert out.shape == (h, w, 3)
    np.testing.assert_allclose(out, 0.42, atol=1e-7)

    bayer = np.random.default_rng(0).uniform(size=(h, w)).astype(np.float32)
    bayer_in = torch.tensor(bayer) if kind == 'torch' else bayer
    rgb = np.asarray(raw_utils.bilinear_demosaic(bayer_in))
    px, py = np.meshgrid(np.arange(w), np.arange(h))
    mask = raw_utils.pixels_to_bayer_mask(px, py).astype(bool)
    # Every measured value is kept, unchanged, in its own channel.
    for c in range(3):
        np.testing.assert_allclose(rgb[..., c][mask[..., c]], bayer[mask[..., c]], atol=0)


def test_demosaic_reproduces_linear_ramps_in_interior():
    """Bilinear interpolation is exact for an image linear in x and y away from the wrap-around borders."""
    h, w = 10, 14
    py, px = np.mgrid[0:h, 0:w].astype(np.float64)
    scene = 0.1 + 0.03 * px + 0.02 * py
    rgb = raw_utils.bilinear_demosaic(scene)  # Every channel sees the same scene at its own sites.
    for c in range(3):
        np.testing.assert_allclose(rgb[2:-2, 2:-2, c], scene[2:-2, 2:-2], atol=1e-12)


def test_demosaic_numpy_and_torch_agree():
    bayer = np.random.default_rng(1).uniform(size=(8, 10))
    np.testing.assert_allclose(raw_utils.bilinear_demosaic(torch.tensor(bayer)).numpy(),
                               raw_utils.bilinear_demosaic(bayer), atol=1e-15)
    np.testing.assert_allclose(raw_utils.bilinear_demosaic_torch(torch.tensor(bayer)).numpy(),
                               raw_utils.bilinear_demosaic(bayer), atol=1e-15)


def test_postprocess_raw_closed_form_and_auto_exposure():
    rng = np.random.default_rng(2)
    raw = rng.uniform(size=(20, 30, 3))
    ccm = np.eye(3) + 0.1 * rng.normal(size=(3, 3))
    out = raw_utils.postprocess_raw(raw, ccm, 0.5)
    np.testing.assert_allclose(out, image.linear_to_srgb(np.clip(raw @ ccm.T / 0.5, 0, 1)), atol=1e-12)
    out_t = raw_utils.postprocess_raw(torch.tensor(raw), torch.tensor(ccm), 0.5)
    np.testing.assert_allclose(out_t.numpy(), out, atol=1e-12)
    # Auto exposure maps the 97th percentile to white: about 3% of values saturate.
    auto = raw_utils.postprocess_raw(raw, np.eye(3))
    frac_white = np.mean(auto >= 1.0 - 1e-12)
    assert 0.025 < frac_white < 0.035
    auto_t = raw_utils.postprocess_raw(torch.tensor(raw), torch.eye(3, dtype=torch.float64))
    np.testing.assert_allclose(auto_t.numpy(), auto, atol=1e-12)
    with pytest.raises(ValueError, match='expected 3'):
        raw_utils.postprocess_raw(raw[..., :2], ccm)


def test_percentile_torch_matches_numpy():
    x = torch.rand(1001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for q in (0, 3.3, 50, 97, 100):
        assert float(raw_utils._percentile_torch(x, q)) == pytest.approx(np.percentile(x.numpy(), q), abs=1e-15)


def _exifs():
    base = {'BlackLevel': 512, 'WhiteLevel': 16383, 'AsShotNeutral': '0.5 1 0.7',
            'ColorMatrix2': '1.1 -0.2 0.05 -0.3 1.2 0.1 0.02 -0.1 0.9', 'NoiseProfile': '0.001 0.0002'}
    return [dict(base, ShutterSpeed=f'1/{s}') for s in (30, 60, 30)]


def test_process_exif_maps_neutral_to_white():
    meta = raw_utils.process_exif(_exifs())
    np.testing.assert_allclose(meta['ShutterSpeed'], [1 / 30, 1 / 60, 1 / 30])
    np.testing.assert_array_equal(meta['BlackLevel'], [512, 512, 512])
    assert meta['ColorMatrix2'].shape == (3, 9)
    assert meta['cam2rgb'].shape == (3, 3, 3)
    # The as-shot neutral is white in camera space, so the full transform must send it to RGB (1, 1, 1).
    neutral = np.array([0.5, 1.0, 0.7])
    np.testing.assert_allclose(meta['cam2rgb'][0] @ neutral, np.ones(3), atol=1e-12)


def test_match_images_affine_recovers_affine_map():
    rng = np.random.default_rng(3)
    gt = rng.uniform(size=(8, 9, 3))
    est = 0.7 * gt + 0.05
    np.testing.assert_allclose(raw_utils.match_images_affine(est, gt), gt, atol=1e-12)
    matched = raw_utils.match_images_affine(torch.tensor(est), torch.tensor(gt))
    torch.testing.assert_close(matched, torch.tensor(gt))
    # Least squares on noisy data agrees with numpy's line fit.
    x, y = gt[..., 0].ravel(), est[..., 0].ravel() + 0.01 * rng.normal(size=72)
    a, b = raw_utils.best_fit_affine(x, y, axis=0)
    pa, pb = np.polyfit(x, y, 1)
    assert a == pytest.approx(pa, rel=1e-10) and b == pytest.approx(pb, rel=1e-10)


def test_load_raw_images_errors(tmp_path):
    with pytest.raises(ValueError, match='does not exist'):
        raw_utils.load_raw_images(str(tmp_path / 'missing'))
    if importlib.util.find_spec('rawpy') is None:
        with pytest.raises(ImportError, match='pip install rawpy'):
            raw_utils.load_raw_images(str(tmp_path))
    else:
        with pytest.raises(ValueError, match='No raw images'):
            raw_utils.load_raw_images(str(tmp_path))
    assert utils.DataSplit.TRAIN.value == 'train'
