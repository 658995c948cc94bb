"""Tests of the scene generators for Ref-NeRF, RawNeRF, RobustNeRF and GLO (mipnerf360/synthetic.py): the files
are in each dataset's layout and their values round-trip through the loaders to the generators' ground truth."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from mipnerf360 import configs, datasets, image as lib_image, synthetic, utils


def _load(split, data_dir, **overrides):
    """The one place the tests go through the public dataset loader: the split's Scene, images as float."""
    overrides.setdefault('batch_size', 64)
    scene = datasets.load_scene(configs.Config(data_dir=data_dir, **overrides), split)
    images = scene.images
    if images is not None:
        images = [datasets.image_as_float(im) for im in images]
        images = np.stack(images) if all(im.shape == images[0].shape for im in images) else images
    return dataclasses.replace(scene, images=images)


def _u8(x):
    return np.round(np.clip(x, 0., 1.) * 255.)


def _srgb_to_linear(x):
    return np.asarray(lib_image.srgb_to_linear(np.asarray(x, np.float64), xnp=np))


# ---------------------------------------------------------------------------------------------------------------
# Shiny Blender (Ref-NeRF).


@pytest.fixture(scope='module')
def shiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('shiny'))
    return d, synthetic.write_shiny_blender_scene(d, n_train=3, n_val=1, n_test=3, width=40, height=32)


def test_shiny_layout_and_normal_maps_round_trip(shiny):
    d, gt = shiny
    for split, n in (('train', 3), ('val', 1), ('test', 3)):
        with open(os.path.join(d, f'transforms_{split}.json')) as fp:
            assert len(json.load(fp)['frames']) == n
    for i in range(3):
        png = np.array(Image.open(os.path.join(d, 'test', f'r_{i}_normal.png')))
        assert png.shape == (32, 40, 4) and png.dtype == np.uint8
        np.testing.assert_array_equal(png[..., 3] > 0, gt.normal_masks[i])
    # Training views have normal maps too: training with compute_normal_metrics (blender_refnerf.gin) reads them.
    for split, n in (('train', 3), ('val', 1)):
        for i in range(n):
            png = np.array(Image.open(os.path.join(d, split, f'r_{i}_normal.png')))
            assert png.shape == (32, 40, 4) and 0.2 < (png[..., 3] > 0).mean() < 0.8
    train = _load('train', d, dataset_loader='blender', compute_normal_metrics=True)
    on = train.alphas > 0.99
    np.testing.assert_allclose(np.linalg.norm(train.normal_images[on], axis=-1), 1., atol=0.01)
    ds = _load('test', d, dataset_loader='blender', compute_normal_metrics=True)
    m = gt.normal_masks
    assert 0.2 < m.mean() < 0.8
    # 8-bit encoding of [-1, 1]: at most one step of 2 / 255 (plus float32 rounding) per component.
    np.testing.assert_allclose(ds.normal_images[m], gt.normals[m], atol=1.01 / 255.)
    np.testing.assert_allclose(np.linalg.norm(ds.normal_images[m], axis=-1), 1., atol=0.01)
    np.testing.assert_allclose(np.linalg.norm(gt.normals[m], axis=-1), 1., atol=1e-12)
    assert np.all(gt.normals[~m] == 0)
    # The image's coverage contains every pixel whose centre hits an object.
    assert np.all(ds.alphas[m] > 0.2)


def test_shiny_normals_are_the_analytic_sphere_normals(shiny):
    """Independent of the tracer: intersect the pixel-centre rays of each test camera with the spheres."""
    d, gt = shiny
    with open(os.path.join(d, 'transforms_test.json')) as fp:
        meta = json.load(fp)
    focal = 0.5 * 40 / np.tan(0.5 * meta['camera_angle_x'])
    yy, xx = np.meshgrid(np.arange(32) + 0.5, np.arange(40) + 0.5, indexing='ij')
    dirs_cam = np.stack([(xx - 20) / focal, -(yy - 16) / focal, -np.ones_like(xx)], -1)
    n_sphere_pixels = 0
    for i, frame in enumerate(meta['frames']):
        c2w = np.array(frame['transform_matrix'])[:3]
        dirs = dirs_cam @ c2w[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        best_t, best_n = np.full((32, 40), np.inf), np.zeros((32, 40, 3))
        for c, r, _ in synthetic.SHINY_SPHERES:
            oc = c2w[:, 3] - c
            b = dirs @ oc
            disc = b * b - (oc @ oc - r * r)
            t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
            upd = t < best_t
            best_t[upd] = t[upd]
            best_n[upd] = ((c2w[:, 3] + t[..., None] * dirs - c) / r)[upd]
        on_sphere = np.isfinite(best_t)
        n_sphere_pixels += on_sphere.sum()
        assert np.all(gt.normal_masks[i][on_sphere])
        np.testing.assert_allclose(gt.normals[i][on_sphere], best_n[on_sphere], atol=1e-9)
        # Elsewhere on the mask the surface is the box: axis-aligned normals facing the camera.
        box = gt.normal_masks[i] & ~on_sphere
        n_box = gt.normals[i][box]
        np.testing.assert_allclose(np.abs(n_box).max(-1), 1., atol=1e-12)
        assert np.all((n_box * dirs[box]).sum(-1) < 0)
    assert n_sphere_pixels > 100


def test_shiny_mirror_colour_depends_on_the_view_through_the_reflection():
    """The mirror sphere's top point seen from two directions: the colour is the tinted environment in the
    mirrored direction (which escapes upwards), so it changes with the view."""
    c, r, kind = synthetic.SHINY_SPHERES[0]
    assert kind == 'mirror'
    top = c + np.array([0., 0., r])
    dirs = np.array([[0.57, 0.11, -0.81], [-0.13, -0.62, -0.77]])  # Off the texture's cell boundaries.
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    rgb, alpha, normal = synthetic.trace_shiny(top - 2. * dirs, dirs)
    np.testing.assert_allclose(alpha, 1.)
    np.testing.assert_allclose(normal, [[0., 0., 1.]] * 2, atol=1e-9)
    mirrored = dirs * np.array([1., 1., -1.])
    np.testing.assert_allclose(rgb, synthetic.MIRROR_TINT * synthetic._background(mirrored), atol=1e-9)
    assert np.abs(rgb[0] - rgb[1]).max() > 0.05


# ---------------------------------------------------------------------------------------------------------------
# Raw (RawNeRF).


@pytest.fixture(scope='module')
def raw_scene(tmp_path_factory):
    pytest.importorskip('pidng', reason='writing DNGs needs the optional pidng package (pip install .[raw])')
    pytest.importorskip('rawpy', reason='reading DNGs needs the optional rawpy package (pip install .[raw])')
    d = str(tmp_path_factory.mktemp('raw'))
    return d, synthetic.write_raw_scene(d, n_views=6, width=32, height=24)


def test_raw_layout(raw_scene):
    d, gt = raw_scene
    names = [os.path.splitext(n)[0] for n in gt.info.names]
    assert sorted(os.listdir(os.path.join(d, 'raw'))) == sorted([n + '.dng' for n in names] +
                                                                [n + '.json' for n in names])
    assert sorted(os.listdir(os.path.join(d, 'images'))) == gt.info.names
    pb = np.load(os.path.join(d, 'poses_bounds.npy'))
    assert pb.shape == (6, 17)
    np.testing.assert_allclose(pb[:, 15:], gt.bounds)
    with open(os.path.join(d, 'raw', names[1] + '.json')) as fp:
        exif = json.load(fp)[0]
    assert exif['ShutterSpeed'] == '1/50' and exif['ExposureTime'] == pytest.approx(0.02)
    # Views differ in exposure by known ratios, and the longest one clips the bright sky (HDR).
    np.testing.assert_allclose(gt.exposure_values, [1, .5, .25, .125, 1, .5])
    assert gt.radiance.max() > 1.5
    assert (gt.sensor_values()[0] >= 1).any() and not (gt.sensor_values()[3] >= 1).any()


def test_raw_round_trip_through_load_raw_dataset(raw_scene):
    from mipnerf360 import raw_utils
    d, gt = raw_scene
    images, meta, testscene = raw_utils.load_raw_dataset(utils.DataSplit.TRAIN, d, gt.info.names, 97., 1)
    assert not testscene
    expected = gt.sensor_values()
    tol = 0.5 / (gt.white_level - gt.black_level) + 1e-6  # Quantisation of the 16-bit sensor values.
    for i in range(len(images)):
        # Observed Bayer sites hold the sensor value; the rest is the bilinear demosaic of the mosaic.
        np.testing.assert_allclose(synthetic.bayer_mosaic(images[i]), synthetic.bayer_mosaic(expected[i]),
                                   atol=tol, rtol=0)
        demosaicked = raw_utils.bilinear_demosaic(synthetic.bayer_mosaic(expected[i]), xnp=np)
        np.testing.assert_allclose(images[i], demosaicked, atol=tol, rtol=0)
    np.testing.assert_allclose(meta['exposure_values'], gt.exposure_values)
    np.testing.assert_allclose(meta['ShutterSpeed'], gt.shutter_speeds)
    np.testing.assert_allclose(meta['cam2rgb'], np.broadcast_to(np.diag(1. / gt.white_balance), (6, 3, 3)),
                               atol=1e-9)
    # White-balanced, exposure-normalised linear images equal the HDR radiance where nothing clipped.
    lin = (images @ meta['cam2rgb'][0].T) / (gt.sensor_gain * gt.exposure_values[:, None, None, None])
    site = synthetic.bayer_mosaic
    ok = np.stack([site(expected[i]) < 1 for i in range(6)])
    got = np.stack([site(lin[i]) for i in range(6)])[ok]
    want = np.stack([site(gt.radiance[i]) for i in range(6)])[ok]
    np.testing.assert_allclose(got, want, atol=tol / (gt.sensor_gain * 0.125 * gt.white_balance.min()))


def test_raw_scene_loads_in_rawnerf_mode(raw_scene):
    d, gt = raw_scene
    ds = _load('train', d, dataset_loader='llff', forward_facing=True, factor=4, rawnerf_mode=True, llffhold=3)
    idx = ds.split_indices
    np.testing.assert_array_equal(idx, [1, 2, 4, 5])
    assert ds.images.shape == (4, 24, 32, 3)  # RawNeRF trains at full resolution.
    np.testing.assert_allclose(ds.metadata['exposure_values'], gt.exposure_values[idx])
    np.testing.assert_allclose(synthetic.bayer_mosaic(ds.images[0]), synthetic.bayer_mosaic(
            gt.sensor_values()[idx[0]]), atol=0.5 / (gt.white_level - gt.black_level) + 1e-6, rtol=0)
    te = _load('test', d, dataset_loader='llff', forward_facing=True, factor=4, rawnerf_mode=True, llffhold=3)
    assert te.images.shape == (2, 6, 8, 3)


def test_raw_scene_rejects_sizes_libraw_cannot_read(tmp_path, capsys):
    with pytest.raises(synthetic.SyntheticSceneError, match='16 x 24.*at least 22'):
        synthetic.write_raw_scene(str(tmp_path), width=16, height=24)
    with pytest.raises(synthetic.SyntheticSceneError, match='even'):
        synthetic.write_raw_scene(str(tmp_path), width=33, height=24)
    with pytest.raises(SystemExit):  # The CLI says it in one line.
        synthetic.main([str(tmp_path), '--format', 'raw', '--width', '16'])
    assert 'at least 22 pixels' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Distractors (RobustNeRF).


@pytest.fixture(scope='module')
def distractors(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('distractors'))
    return d, synthetic.write_distractor_scene(d, n_views=17, width=48, height=32, factors=(2,))


def test_distractor_masks_are_the_pixels_that_differ(distractors):
    d, gt = distractors
    assert os.path.isfile(os.path.join(d, 'sparse', '0', 'images.txt'))
    assert len(os.listdir(os.path.join(d, 'images_2'))) == 17
    tr = _load('train', d, dataset_loader='llff', factor=0)
    te = _load('test', d, dataset_loader='llff', factor=0)
    np.testing.assert_array_equal(te.split_indices, [0, 8, 16])
    # Test views are clean, and so are their masks.
    np.testing.assert_allclose(te.images * 255., _u8(gt.clean[te.split_indices]), atol=1e-3)
    assert not gt.masks[te.split_indices].any()
    with_ball = gt.masks.any((1, 2))
    assert with_ball.sum() == 7  # Half of the 14 training views.
    for k, i in enumerate(tr.split_indices):
        differ = np.abs(tr.images[k] * 255. - _u8(gt.clean[i])).max(-1) > 0.5
        assert np.all(gt.masks[i][differ])
        assert np.all(differ[gt.coverage[i] >= 0.5])
        if with_ball[i]:
            assert 0.01 < gt.coverage[i].mean() < 0.4
            # The ball's projected centre is covered.
            u, v = synthetic.project(gt.ball_centres[i][None], gt.info.camtoworlds[i], gt.info.pixtocams[i])[0]
            assert gt.coverage[i][int(v), int(u)] == 1.
        else:
            assert not differ.any() and np.all(np.isnan(gt.ball_centres[i]))


# ---------------------------------------------------------------------------------------------------------------
# Appearance (GLO).


def test_appearance_gains_are_recovered_by_least_squares(tmp_path):
    d = str(tmp_path)
    gt = synthetic.write_appearance_scene(d, n_views=9, width=48, height=32, factors=(2,))
    assert gt.gains.shape == (9, 3)
    assert gt.gains.max() / gt.gains.min() > 1.5  # The views really differ.
    tr = _load('train', d, dataset_loader='llff', factor=0)
    te = _load('test', d, dataset_loader='llff', factor=0)
    for ds in (tr, te):
        for k, i in enumerate(ds.split_indices):
            y = _srgb_to_linear(ds.images[k])
            x = gt.clean_linear[i]
            ok = (y < 0.95) & (x > 0.02)  # Unclipped, above the 8-bit floor.
            fit = np.array([(x[..., c][ok[..., c]] * y[..., c][ok[..., c]]).sum() /
                            (x[..., c][ok[..., c]] ** 2).sum() for c in range(3)])
            np.testing.assert_allclose(fit, gt.gains[i], rtol=0.01)


def test_cli_writes_the_new_formats(tmp_path):
    for fmt, probe in (('shiny_blender', 'test/r_0_normal.png'), ('distractors', 'sparse/0/images.txt'),
                       ('appearance', 'images_2/img_002.png')):
        synthetic.main([str(tmp_path / fmt), '--format', fmt, '--n_views', '3', '--width', '16', '--height', '12',
                        '--factors', '2', '--supersample', '1'])
        assert os.path.exists(tmp_path / fmt / probe), fmt
    pytest.importorskip('pidng', reason='writing DNGs needs the optional pidng package (pip install .[raw])')
    synthetic.main([str(tmp_path / 'raw'), '--format', 'raw', '--n_views', '2', '--width', '24', '--height', '22',
                    '--supersample', '1'])
    assert os.path.exists(tmp_path / 'raw' / 'raw' / 'view_001.dng')


def test_raw_test_scene_round_trip(tmp_path):
    """RawNeRF's test-scene convention: the loader's test image is the HDR+ merged frame rescaled to the
    longest shutter of the burst (unclipped), and its train split is views 1.. from raw/train."""
    pytest.importorskip('pidng', reason='writing DNGs needs the optional pidng package (pip install .[raw])')
    pytest.importorskip('rawpy', reason='reading DNGs needs the optional rawpy package (pip install .[raw])')
    d = str(tmp_path)
    gt = synthetic.write_raw_scene(d, n_views=4, width=24, height=22, test_scene=True)
    assert sorted(os.listdir(os.path.join(d, 'raw', 'test'))) == sorted(
            f'view_000_{k}.{e}' for k in range(4) for e in ('dng', 'json'))
    assert sorted(os.listdir(os.path.join(d, 'raw', 'train')))[0] == 'view_001.dng'
    tol = 0.5 / (gt.white_level - gt.black_level)
    te = _load('test', d, dataset_loader='llff', forward_facing=True, factor=0, rawnerf_mode=True)
    assert te.images.shape == (1, 22, 24, 3)
    want = gt.merged_test_values()
    assert want.max() > 1  # HDR: brighter than the longest frame can record.
    # The merge keeps 2 extra bits; rescaled by the shutter ratio 8 to the longest frame.
    np.testing.assert_allclose(synthetic.bayer_mosaic(te.images[0]), synthetic.bayer_mosaic(want),
                               atol=8 * tol / 4 + 1e-6, rtol=0)
    np.testing.assert_allclose(te.camtoworlds.shape, (1, 3, 4))
    tr = _load('train', d, dataset_loader='llff', forward_facing=True, factor=0, rawnerf_mode=True)
    assert tr.images.shape == (3, 22, 24, 3)
    np.testing.assert_allclose(synthetic.bayer_mosaic(tr.images[2]), synthetic.bayer_mosaic(
            gt.sensor_values()[3]), atol=tol + 1e-6, rtol=0)
    np.testing.assert_allclose(tr.metadata['exposure_values'], gt.exposure_values[1:] / gt.exposure_values[1])
