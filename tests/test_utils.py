"""utils.to_uint8: the one float -> 8-bit conversion (PNGs, videos, exports, the viewer, eval's metrics)."""

import numpy as np
import pytest

from mipnerf360 import utils


def test_to_uint8_rounds_to_nearest_after_clipping_and_nan_to_num():
    img = np.array([0., 1., .5 / 255 - 1e-9, .5 / 255 + 1e-9, 100.4 / 255, 100.6 / 255, 254.5 / 255 + 1e-9,
                    -3., 7., np.nan, np.inf, -np.inf])
    np.testing.assert_array_equal(utils.to_uint8(img), [0, 255, 0, 1, 100, 101, 255, 0, 255, 0, 255, 0])
    assert utils.to_uint8(img).dtype == np.uint8
    k = np.arange(256)
    np.testing.assert_array_equal(utils.to_uint8(k / 255.), k)  # 8-bit values survive a round trip.
    np.testing.assert_array_equal(utils.to_uint8((k / 255.).astype(np.float32)), k)


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_to_uint8_is_eval_quantisation_in_the_images_precision(dtype):
    """In the image's own precision: float64 values just above a rounding boundary, which a float32 cast would
    round down, give the level the float64 metric quantisation gives; and a saved PNG holds exactly those."""
    rng = np.random.default_rng(0)
    k = rng.integers(0, 255, 4096)
    img = ((k + .5) / 255 + rng.uniform(-1e-9, 1e-9, k.size)).astype(dtype)
    expected = np.round(np.clip(img, 0, 1) * 255)  # eval's metric quantisation (in the image's precision).
    if dtype == np.float64:  # The case the old float32 cast of save_img_u8 got wrong.
        assert np.any(np.round(img.astype(np.float32) * np.float32(255)) != expected)
    np.testing.assert_array_equal(utils.to_uint8(img), expected)


def test_saved_png_is_to_uint8(tmp_path):
    img = np.random.default_rng(1).uniform(-.1, 1.1, (5, 7, 3))
    img[0, 0, 0] = np.nan
    utils.save_img_u8(img, str(tmp_path / 'a.png'))
    np.testing.assert_array_equal(utils.load_img(str(tmp_path / 'a.png')), utils.to_uint8(img))


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_eval_metric_quantisation_is_unchanged(dtype):
    """eval's quantised metrics go through to_uint8 and give what the previous formula gave, NaN kept (a diverged
    render must still give non-finite metrics), in the image's precision."""
    from mipnerf360.cli import eval as eval_cli
    rng = np.random.default_rng(2)
    img = rng.uniform(-.2, 1.2, 3000)
    k = rng.integers(0, 255, 1000)
    img[:1000] = (k + .5) / 255 + rng.uniform(-1e-9, 1e-9, k.size)
    img[1000:1003] = [np.nan, np.inf, -np.inf]
    img = img.astype(dtype)
    previous = np.round(np.clip(img, 0, 1) * 255) / 255
    got = eval_cli._quantize_8bit(img)  # pylint: disable=protected-access
    assert got.dtype == previous.dtype == dtype
    np.testing.assert_array_equal(got, previous)  # NaN where previous has NaN.


def test_to_uint8_of_float16_is_the_nearest_level():
    """Every float16 value in [0, 1] gets the level nearest to its exact value * 255 (float16 arithmetic would
    round v * 255 to a multiple of 1/16 or 1/8 first and land on the wrong side of .5 for some values)."""
    v = np.arange(2**16, dtype=np.uint16).view(np.float16)
    v = v[(v >= 0) & (v <= 1)]
    np.testing.assert_array_equal(utils.to_uint8(v), np.round(v.astype(np.float64) * 255))


def test_to_uint8_keeps_8_bit_images_and_maps_masks_to_0_and_255(tmp_path):
    """An image already in 8 bits is returned as it is (it used to be read as values in [0, 1], so every level
    above 0 became 255), also by save_img_u8; a bool mask gives 0 / 255."""
    k = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(utils.to_uint8(k), k)
    utils.save_img_u8(k, str(tmp_path / 'k.png'))
    np.testing.assert_array_equal(utils.load_img(str(tmp_path / 'k.png')), k)
    np.testing.assert_array_equal(utils.to_uint8(np.array([True, False])), [255, 0])
