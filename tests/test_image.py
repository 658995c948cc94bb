"""Tests for mipnerf360.image: PSNR/SSIM conversions, sRGB curves, resampling, colour correction, metrics."""

import logging

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from mipnerf360 import image


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------------
# PSNR / MSE / DSSIM


@pytest.mark.parametrize('kind', ['numpy', 'torch'])
def test_psnr_mse_round_trip_and_known_values(kind):
    psnr = np.array([10.0, 20.0, 30.0, 47.5])
    x = torch.tensor(psnr) if kind == 'torch' else psnr
    back = image.mse_to_psnr(image.psnr_to_mse(x))
    assert isinstance(back, torch.Tensor) == (kind == 'torch')
    np.testing.assert_allclose(np.asarray(back), psnr, rtol=1e-12)
    mse = image.psnr_to_mse(x)
    np.testing.assert_allclose(np.asarray(mse), 10.0 ** (-psnr / 10), rtol=1e-12)
    assert float(image.mse_to_psnr(0.01)) == pytest.approx(20.0)
    assert float(image.mse_to_psnr(1.0)) == pytest.approx(0.0, abs=1e-12)


def test_ssim_dssim_round_trip():
    for s in [-0.9, 0.0, 0.3, 1.0]:
        assert image.dssim_to_ssim(image.ssim_to_dssim(s)) == pytest.approx(s)
    assert image.ssim_to_dssim(1.0) == 0.0


# ----------------------------------------------------------------------------------------------------------
# sRGB


def test_srgb_round_trip_and_closed_form():
    x = np.linspace(-1, 3, 10001)
    for xs in (x, torch.tensor(x)):
        np.testing.assert_allclose(np.asarray(image.linear_to_srgb(image.srgb_to_linear(xs))), x, atol=1e-12)
        np.testing.assert_allclose(np.asarray(image.srgb_to_linear(image.linear_to_srgb(xs))), x, atol=1e-12)
    s = np.linspace(0.05, 1, 50)
    np.testing.assert_allclose(image.srgb_to_linear(s), ((s + 0.055) / 1.055) ** 2.4, rtol=1e-12)
    lin = np.linspace(0, 0.003, 50)
    np.testing.assert_allclose(image.linear_to_srgb(lin), 12.92 * lin, rtol=1e-12)
    assert image.srgb_to_linear(np.float64(1.0)) == pytest.approx(1.0)


def test_srgb_continuity_at_knee():
    for fn, knee in [(image.linear_to_srgb, 0.0031308), (image.srgb_to_linear, 0.04045)]:
        delta = 1e-9
        below = fn(np.array([knee - delta]))[0]
        above = fn(np.array([knee + delta]))[0]
        assert abs(above - below) < 1e-6, (fn.__name__, below, above)


def test_srgb_gradients_finite_and_dtype_kept():
    x = torch.linspace(-1, 3, 1001, requires_grad=True)
    for fn in (image.linear_to_srgb, image.srgb_to_linear):
        y = fn(x)
        assert y.dtype == torch.float32
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(g).all()
    assert image.linear_to_srgb(np.zeros(3, np.float32)).dtype == np.float32
    # An explicit backend wins over the input's type.
    assert isinstance(image.linear_to_srgb(np.ones(3), xnp=torch), torch.Tensor)


# ----------------------------------------------------------------------------------------------------------
# Resampling


def test_downsample_upsample_constant_and_means():
    const = np.full((12, 8, 3), 0.37)
    np.testing.assert_allclose(image.downsample(const, 4), np.full((3, 2, 3), 0.37))
    np.testing.assert_allclose(image.upsample(const, 3), np.full((36, 24, 3), 0.37))
    img = _rng().uniform(size=(6, 9, 2))
    down = image.downsample(img, 3)
    np.testing.assert_allclose(down[1, 2], img[3:6, 6:9].mean(axis=(0, 1)))
    np.testing.assert_allclose(image.downsample(image.upsample(img, 2), 2), img)
    up = image.upsample(torch.tensor(img), 2)
    torch.testing.assert_close(up[5, 7], torch.tensor(img[2, 3]))
    torch.testing.assert_close(image.downsample(torch.tensor(img), 3), torch.tensor(down))
    with pytest.raises(ValueError, match='does not evenly divide'):
        image.downsample(img, 4)


# ----------------------------------------------------------------------------------------------------------
# Colour correction


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_color_correct_recovers_quadratic_colour_transform(seed):
    rng = _rng(seed)
    im0 = rng.uniform(0.1, 0.9, size=(64, 64, 3)).astype(np.float32)
    ccm = np.eye(3) + rng.normal(size=(3, 3)) * 0.1
    sq = rng.normal() * 0.1
    shift = rng.normal() * 0.1
    im1 = np.clip(im0 @ ccm + sq * im0 ** 2 + shift, 0, 1).astype(np.float32)
    out = image.color_correct(im0, im1)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, im1, atol=1e-5)
    out_t = image.color_correct(torch.tensor(im0), torch.tensor(im1))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), im1, atol=1e-5)


def test_color_correct_ignores_clipped_pixels():
    """An affine map fitted only on unclipped pixels, though many targets saturate at 1."""
    rng = _rng(5)
    im0 = rng.uniform(0.05, 0.95, size=(48, 48, 3))
    im1 = np.clip(1.6 * im0 - 0.1, 0, 1)
    out = image.color_correct(im0, im1)
    np.testing.assert_allclose(out, im1, atol=1e-6)


def test_color_correct_channel_mismatch():
    with pytest.raises(ValueError, match='channels must match'):
        image.color_correct(np.zeros((4, 4, 3)), np.zeros((4, 4, 1)))


# ----------------------------------------------------------------------------------------------------------
# SSIM


def _ssim_brute_force(a, b, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Direct float64 SSIM: a loop over every fully-inside window of every channel."""
    g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = k1 ** 2, k2 ** 2
    h, w, c = a.shape
    vals = []
    for ch in range(c):
        for i in range(h - size + 1):
            for j in range(w - size + 1):
                pa, pb = a[i:i + size, j:j + size, ch], b[i:i + size, j:j + size, ch]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va = (win * (pa - ma) ** 2).sum()
                vb = (win * (pb - mb) ** 2).sum()
                cov = (win * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_identical_images_is_one():
    a = torch.rand(20, 23, 3, generator=torch.Generator().manual_seed(0))
    assert float(image.ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    const = torch.full((16, 16, 3), 0.5)
    assert float(image.ssim(const, const)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize('noise', [0.05, 0.3])
def test_ssim_matches_float64_brute_force(noise):
    rng = _rng(1)
    a = rng.uniform(size=(17, 19, 3))
    b = np.clip(a + noise * rng.normal(size=a.shape), 0, 1)
    ref = _ssim_brute_force(a, b)
    ours64 = float(image.ssim(torch.tensor(a), torch.tensor(b)))
    ours32 = float(image.ssim(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)))
    assert ours64 == pytest.approx(ref, abs=1e-10)
    assert ours32 == pytest.approx(ref, abs=1e-5)
    # The map has the valid-region size.
    assert image.ssim(torch.tensor(a), torch.tensor(b), return_map=True).shape == (7, 9, 3)


def test_ssim_matches_torchmetrics_on_valid_region():
    """torchmetrics reflect-pads before filtering; cropping its map by 5 px leaves exactly the valid region."""
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 32, 40, 3, dtype=torch.float64, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, dtype=torch.float64, generator=g)).clamp(0, 1)
    ours = image.ssim(a, b)
    assert ours.shape == (2,)
    _, full = tm_ssim(b.permute(0, 3, 1, 2), a.permute(0, 3, 1, 2), gaussian_kernel=True, sigma=1.5,
                      kernel_size=11, data_range=1.0, k1=0.01, k2=0.03, return_full_image=True)
    theirs = full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_ssim_rejects_bad_shapes():
    with pytest.raises(ValueError, match='smaller than'):
        image.ssim(torch.zeros(8, 8, 3), torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match='differ'):
        image.ssim(torch.zeros(12, 12, 3), torch.zeros(12, 13, 3))


# ----------------------------------------------------------------------------------------------------------
# MetricHarness


def test_metric_harness_numpy_and_torch_agree_with_definitions():
    rng = _rng(3)
    gt = rng.uniform(size=(24, 30, 3)).astype(np.float32)
    pred = np.clip(gt + 0.1 * rng.normal(size=gt.shape), 0, 1).astype(np.float32)
    harness = image.MetricHarness(compute_lpips=False)
    m_np = harness(pred, gt)
    m_t = harness(torch.tensor(pred), torch.tensor(gt), name_fn=lambda s: 'test/' + s)
    mse = np.mean((pred.astype(np.float64) - gt) ** 2)
    assert m_np['psnr'] == pytest.approx(-10 * np.log10(mse), abs=1e-9)
    ssim_ref = _ssim_brute_force(pred.astype(np.float64), gt.astype(np.float64))
    assert m_np['ssim'] == pytest.approx(ssim_ref, abs=1e-9)
    assert m_t == {'test/psnr': m_np['psnr'], 'test/ssim': m_np['ssim']}
    assert set(m_np) == {'psnr', 'ssim'}
    assert isinstance(m_np['psnr'], float)


def test_metric_harness_reports_lpips_unavailable_once(monkeypatch, caplog, tmp_path):
    """Without the lpips package, or without cached backbone weights, LPIPS is skipped with one message."""
    import builtins
    import sys
    import types

    real_import = builtins.__import__

    def no_lpips(name, *args, **kwargs):
        if name == 'lpips':
            raise ImportError('no lpips')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_lpips)
    monkeypatch.setattr(image, '_LPIPS_WARNED', set())
    with caplog.at_level(logging.WARNING):
        h1 = image.MetricHarness()
        h2 = image.MetricHarness()
    assert not h1.lpips_available and 'pip install lpips' in h1.lpips_message
    assert sum('LPIPS unavailable' in r.message for r in caplog.records) == 1
    out = h2(np.zeros((16, 16, 3)), np.full((16, 16, 3), 0.1))
    assert 'lpips' not in out and out['psnr'] == pytest.approx(20.0)

    # A fake lpips package but an empty torch hub cache: no model is built (so nothing can be downloaded).
    monkeypatch.setattr(builtins, '__import__', real_import)
    fake = types.ModuleType('lpips')

    def build(*args, **kwargs):
        raise AssertionError('must not construct LPIPS without cached weights')

    fake.LPIPS = build
    monkeypatch.setitem(sys.modules, 'lpips', fake)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    model, msg = image.load_lpips('alex')
    assert model is None and 'torch hub cache' in msg and str(tmp_path) in msg
