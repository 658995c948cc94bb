"""Tests for mipnerf360.vis (numpy visualisations)."""

import importlib.util
import types

import numpy as np
import pytest
import torch

from mipnerf360 import vis


def test_weighted_percentile_closed_forms():
    # With unit weights on 1..n the cumulative weight equals the value, so the p-th percentile is p n / 100.
    x = np.arange(1.0, 101.0)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(x)
    np.testing.assert_allclose(vis.weighted_percentile(shuffled, np.ones(100), [10, 50, 99.5]), [10, 50, 99.5])
    # Doubling one weight region shifts the median into it.
    w = np.where(x <= 25, 3.0, 1.0)  # Total weight 150; half is reached at x = 25.
    np.testing.assert_allclose(vis.weighted_percentile(x, w, [50]), [25.0])
    # Torch input is accepted.
    np.testing.assert_allclose(vis.weighted_percentile(torch.tensor(shuffled), torch.ones(100), [50]), [50.0])


def test_visualize_cmap_monotone_on_ramp_gray():
    ramp = np.tile(np.linspace(0.0, 5.0, 64)[None], (4, 1))
    out = vis.visualize_cmap(ramp, np.ones_like(ramp), vis.gray, matte_background=False)
    assert out.shape == (4, 64, 3)
    assert out.min() >= 0 and out.max() <= 1
    assert np.all(np.diff(out[..., 0], axis=1) >= 0)
    assert np.all(np.diff(out[:, 1:63, 0], axis=1) > 0)  # Strictly inside the percentile clip.
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    # Explicit bounds: a linear map from [lo, hi] to [0, 1] (an explicit lo = 0 is honoured).
    out2 = vis.visualize_cmap(ramp, np.ones_like(ramp), vis.gray, lo=0.0, hi=5.0, matte_background=False)
    np.testing.assert_allclose(out2[0, :, 0], np.linspace(0, 1, 64), atol=1e-12)
    # A decreasing curve function reverses the ramp.
    out3 = vis.visualize_cmap(ramp + 1, np.ones_like(ramp), vis.gray, curve_fn=lambda z: -np.log(z),
                              matte_background=False)
    assert np.all(np.diff(out3[0, :, 0]) <= 0)


def test_visualize_cmap_modulus_and_rgb_passthrough():
    value = np.linspace(0, 2, 9)[None].repeat(2, 0)
    out = vis.visualize_cmap(value, np.ones_like(value), vis.gray, modulus=0.5, matte_background=False)
    np.testing.assert_allclose(out[0, :, 0], np.mod(np.linspace(0, 2, 9), 0.5) / 0.5)
    rgb = np.random.default_rng(1).uniform(size=(5, 6, 3))
    out_rgb = vis.visualize_cmap(rgb, np.ones((5, 6)), None, lo=0.0, hi=1.0, matte_background=False)
    np.testing.assert_allclose(out_rgb, rgb)
    with pytest.raises(ValueError, match='3 channels'):
        vis.visualize_cmap(np.ones((5, 6, 2)), np.ones((5, 6)), None, lo=0.0, hi=1.0)


def test_turbo_builtin_shape_and_character():
    x = np.linspace(0, 1, 257)
    c = vis.turbo(x)
    assert c.shape == (257, 4) and c.min() >= 0 and c.max() <= 1
    np.testing.assert_array_equal(c[:, 3], 1.0)
    # Dark blue at the low end, dark red at the high end, bright green in the middle.
    assert c[20, 2] > c[20, 0] and c[-1, 0] > c[-1, 2]
    assert c[128, 1] > 0.9
    if importlib.util.find_spec('matplotlib') is None:
        # The built-in maps are what the suite uses, and unknown names explain how to get more.
        np.testing.assert_allclose(vis.colormap_turbo(x.reshape(1, -1)), c[None, :, :3])
        with pytest.raises(ValueError, match='matplotlib'):
            vis.get_colormap('no_such_map')
    else:
        np.testing.assert_allclose(vis.colormap_turbo(x.reshape(1, -1)), c[None, :, :3], atol=0.15)


def test_matte_checkerboard_and_passthrough():
    rgb = np.full((32, 32, 3), 0.3)
    np.testing.assert_allclose(vis.matte(rgb, np.ones((32, 32))), rgb)
    bg = vis.matte(rgb, np.zeros((32, 32)))
    assert bg[0, 0, 0] == 0.8 and bg[0, 8, 0] == 1.0 and bg[8, 0, 0] == 1.0 and bg[8, 8, 0] == 0.8
    assert bg[7, 7, 0] == 0.8 and bg[16, 16, 0] == 0.8
    half = vis.matte(rgb, np.full((32, 32), 0.5))
    np.testing.assert_allclose(half[0, 0], 0.5 * 0.3 + 0.5 * 0.8)


def test_visualize_coord_mod_closed_form():
    coords = np.array([[[0.0, 1.5, -0.5], [2.0, 3.0, -3.0]]])
    out = vis.visualize_coord_mod(coords, np.ones((1, 2)))
    np.testing.assert_allclose(out, [[[0.5, 0.25, 0.25], [0.5, 0.0, 0.0]]])


def test_visualize_rays_constant_profile():
    """Constant weights and colours give constant rows; layout has one background row between rays."""
    num_rays, num_levels, s, res = 2, 2, 5, 32
    dist = [np.tile(np.linspace(0, 1, s + 1), (num_rays, 1)) for _ in range(num_levels)]
    weights = [np.full((num_rays, s), 0.25) for _ in range(num_levels)]
    rgbs = [np.tile(np.array([1.0, 0.0, 0.5]), (num_rays, s, 1)) for _ in range(num_levels)]
    out, alpha = vis.visualize_rays(dist, (0, 1), weights, rgbs, resolution=res)
    rep = res // (num_rays * num_levels + 1)
    assert out.shape == (num_rays * (rep * num_levels + 1) - 1, res, 3)
    expected = 0.25 * np.array([1.0, 0.0, 0.5]) + 0.75 * 0.8
    block = rep * num_levels
    np.testing.assert_allclose(out[:block], np.broadcast_to(expected, (block, res, 3)), atol=1e-6)
    np.testing.assert_allclose(out[block], 0.8)  # Separator row.
    np.testing.assert_allclose(alpha[:block], 0.25, atol=1e-6)
    # Accumulated: weight grows linearly from 0.25 * (bin position) to the total 1.25 over the ray.
    _, acc_alpha = vis.visualize_rays(dist, (0, 1), weights, rgbs, accumulate=True, resolution=res)
    assert np.all(np.diff(acc_alpha[0]) >= -1e-9)
    np.testing.assert_allclose(acc_alpha[0, -1], 1.25, atol=1e-6)


def _fake_rendering(h=16, w=20, seed=0, to_torch=False):
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(h, w, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    r = {
        'rgb': rng.uniform(size=(h, w, 3)), 'acc': rng.uniform(size=(h, w)),
        'distance_mean': rng.uniform(0.5, 5, (h, w)), 'distance_median': rng.uniform(0.5, 5, (h, w)),
        'distance_percentile_5': rng.uniform(0.3, 0.5, (h, w)),
        'distance_percentile_95': rng.uniform(5, 6, (h, w)),
        'normals': normals, 'normals_pred': normals,
        'roughness': rng.uniform(0, 3, size=(h, w, 1)),  # A softplus output, so >= 0.
        'rgb_cc': rng.uniform(size=(h, w, 3)),
    }
    sd, ws, cs = [], [], []
    for s in (6, 6, 4):
        t = np.sort(rng.uniform(size=(3, s + 1)), axis=-1)
        t[:, 0], t[:, -1] = 0, 1
        sd.append(t)
        ws.append(rng.uniform(size=(3, s)) / s)
        cs.append(rng.uniform(-0.2, 1.2, size=(3, s, 3)))
    r.update(ray_sdist=sd, ray_weights=ws, ray_rgbs=cs)
    rays = types.SimpleNamespace(origins=rng.normal(size=(h, w, 3)), directions=rng.normal(size=(h, w, 3)))
    if to_torch:
        conv = lambda v: [torch.tensor(x) for x in v] if isinstance(v, list) else torch.tensor(v)  # noqa: E731
        r = {k: conv(v) for k, v in r.items()}
        rays = types.SimpleNamespace(origins=torch.tensor(rays.origins), directions=torch.tensor(rays.directions))
    return r, rays


def test_visualize_suite_outputs_numpy_in_unit_range_and_accepts_torch():
    r, rays = _fake_rendering()
    out = vis.visualize_suite(r, rays)
    expected = {'color', 'acc', 'color_matte', 'depth_mean', 'depth_median', 'depth_triplet', 'coords_mod',
                'ray_colors', 'ray_weights', 'color_corrected', 'normals', 'normals_pred', 'roughness'}
    assert set(out) == expected
    for k, v in out.items():
        assert isinstance(v, np.ndarray), k
        assert np.all(np.isfinite(v)), k
        assert v.min() >= -1e-6 and v.max() <= 1 + 1e-6, k
    assert out['depth_mean'].shape == (16, 20, 3)
    # Depth is drawn with turbo over -log(depth): where acc = 1, the colour equals turbo of the normalised value.
    r2 = dict(r, acc=np.ones((16, 20)))
    out2 = vis.visualize_suite(r2, rays)
    eps = np.finfo(np.float32).eps
    curve = lambda z: -np.log(z + eps)  # noqa: E731
    lo, hi = vis.weighted_percentile(r['distance_mean'], np.ones((16, 20)), [0.5, 99.5])
    lo, hi = curve(lo - eps), curve(hi + eps)
    t = np.clip((curve(r['distance_mean']) - min(lo, hi)) / abs(hi - lo), 0, 1)
    expected_rgb = np.asarray(vis.get_colormap('turbo')(t))[..., :3]
    np.testing.assert_allclose(out2['depth_mean'], expected_rgb, atol=1e-12)
    assert t.min() == 0 and t.max() == 1 and 0.2 < np.median(t) < 0.8
    # Normals map [-1, 1] to [0, 1].
    np.testing.assert_allclose(out2['normals'], r['normals'] / 2 + 0.5, atol=1e-12)
    # The same rendering as torch tensors gives the same images.
    rt, rays_t = _fake_rendering(to_torch=True)
    out_t = vis.visualize_suite(rt, rays_t)
    for k in expected:
        np.testing.assert_allclose(out_t[k], out[k], atol=1e-12, err_msg=k)


def test_visualize_suite_nan_depth_zeroes_acc():
    r, rays = _fake_rendering()
    r['distance_mean'][0, 0] = np.nan
    out = vis.visualize_suite(r, rays)
    assert out['acc'][0, 0] == 0
