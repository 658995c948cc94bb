"""Tests of the ray-traced synthetic scene generator (mipnerf360/synthetic.py)."""

import json
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from mipnerf360 import synthetic


def _random_rotation(seed):
    m = np.random.default_rng(seed).normal(size=(3, 3))
    q, r = np.linalg.qr(m)
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10 ** 6))
def test_quaternion_round_trip(seed):
    R = _random_rotation(seed)
    q = synthetic.rotmat_to_qvec(R)
    assert q[0] >= 0 and abs(np.linalg.norm(q) - 1) < 1e-12
    np.testing.assert_allclose(synthetic.qvec_to_rotmat(q), R, atol=1e-12)


def test_quaternion_matches_pycolmap():
    import pycolmap
    for seed in range(5):
        R = _random_rotation(seed)
        w, x, y, z = synthetic.rotmat_to_qvec(R)
        np.testing.assert_allclose(pycolmap.Rotation3d(np.array([x, y, z, w])).matrix(), R, atol=1e-12)


def test_colmap_extrinsics_project_like_the_camera():
    """World point -> COLMAP (R X + t, then K) equals the OpenGL projection of `synthetic.project`."""
    c2w = synthetic.ring_poses(5, seed=3)[2]
    K = synthetic.intrinsics(50., 64, 48, cx=31.2, cy=24.7)
    q, t = synthetic.camtoworld_to_colmap(c2w)
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (20, 3)) + synthetic.LOOKAT
    cam = pts @ synthetic.qvec_to_rotmat(q).T + t
    assert np.all(cam[:, 2] > 0)  # In front of the camera in COLMAP's (right, down, forward) frame.
    uv = (cam / cam[:, 2:]) @ K.T
    np.testing.assert_allclose(uv[:, :2], synthetic.project(pts, c2w, np.linalg.inv(K)), atol=1e-9)


def test_pixel_rays_reproject():
    """A point on each pixel ray projects back to the pixel, with and without OpenCV distortion."""
    c2w = synthetic.ring_poses(3, seed=1)[0]
    pixtocam = np.linalg.inv(synthetic.intrinsics(40., 64, 48))
    px = np.array([0.5, 10.25, 63.5, 32.])
    py = np.array([0.5, 40.75, 47.5, 24.])
    for dist in (None, {'k1': -0.05, 'k2': 0.01, 'p1': 0.003, 'p2': -0.002}):
        o, d = synthetic.pixel_rays(c2w, pixtocam, px, py, distortion=dist)
        # Unit camera-space depth: the direction's component along the camera's -z axis is 1.
        np.testing.assert_allclose(d @ -c2w[:3, 2], 1., atol=1e-12)
        uv = synthetic.project(o + 2.7 * d, c2w, pixtocam, distortion=dist)
        np.testing.assert_allclose(uv, np.stack([px, py], -1), atol=1e-6)


def test_undistort_inverts_distort():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.6, 0.6, (2, 100))
    params = {'k1': -0.08, 'k2': 0.02, 'p1': 0.001, 'p2': 0.002}
    xd, yd = synthetic.distort(x, y, **params)
    xu, yu = synthetic.undistort(xd, yd, **params)
    np.testing.assert_allclose(np.stack([xu, yu]), np.stack([x, y]), atol=1e-9)


def test_trace_hits_sphere_at_closed_form_distance():
    c, r, _ = synthetic.SPHERES[0]
    o = np.array([[3., 0.2, 0.7], [0., -4., 1.0]])
    d = c - o
    _, alpha, t = synthetic.trace(o, d)
    dist = np.linalg.norm(d, axis=-1)
    np.testing.assert_allclose(t * dist, dist - r, atol=1e-12)
    np.testing.assert_array_equal(alpha, 1.)
    # A ray pointing up from above everything hits only the background sphere at its radius.
    rgb, alpha, t = synthetic.trace(np.array([[0., 0., 5.]]), np.array([[0., 0., 1.]]))
    np.testing.assert_allclose(t, synthetic.BACKGROUND_RADIUS - 5.)
    assert alpha[0] == 0. and np.all((rgb >= 0) & (rgb <= 1))
    # Without the background, it hits nothing.
    _, alpha, t = synthetic.trace(np.array([[0., 0., 5.]]), np.array([[0., 0., 1.]]), background=False)
    assert alpha[0] == 0. and np.isinf(t[0])


def test_trace_ground_plane():
    o = np.array([[2., 2., 1.]])
    d = np.array([[0.5, 0.7, -0.5]])
    _, alpha, t = synthetic.trace(o, d)
    np.testing.assert_allclose(t, 2.)  # z = 1 - 0.5 t = 0.
    assert alpha[0] == 1.


def test_render_view_is_deterministic_and_textured():
    c2w = synthetic.ring_poses(4)[1]
    pixtocam = np.linalg.inv(synthetic.intrinsics(60., 64, 48))
    a = synthetic.render_view(c2w, pixtocam, 64, 48)
    b = synthetic.render_view(c2w, np.linalg.inv(pixtocam), 64, 48, is_K=True)
    assert a.shape == (48, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.05
    # Supersampling averages sub-pixel samples: a 1x render of a 2x larger image, box-averaged, equals it.
    K = synthetic.intrinsics(60., 64, 48)
    K2 = np.diag([2., 2., 1.]) @ K
    big = synthetic.render_view(c2w, np.linalg.inv(K2), 128, 96, supersample=1)
    np.testing.assert_allclose(big.reshape(48, 2, 64, 2, 3).mean((1, 3)), a, atol=1e-12)


def test_write_colmap_scene_layout_and_speed(tmp_path):
    t0 = time.time()
    info = synthetic.write_colmap_scene(str(tmp_path), n_views=24, width=64, height=48, factors=(2, 4))
    elapsed = time.time() - t0
    # About 0.4 s on one idle core; the bar only catches a pathological slowdown (speed is measured in bench/).
    assert elapsed < 60., elapsed
    names = sorted(os.listdir(tmp_path / 'images'))
    assert names == info.names and len(names) == 24
    for f, size in ((2, (32, 24)), (4, (16, 12))):
        assert sorted(os.listdir(tmp_path / f'images_{f}')) == names
        assert Image.open(tmp_path / f'images_{f}' / names[0]).size == size
    full = np.asarray(Image.open(tmp_path / 'images' / names[3]), np.float64)
    half = np.asarray(Image.open(tmp_path / 'images_2' / names[3]), np.float64)
    np.testing.assert_allclose(full.reshape(24, 2, 32, 2, 3).mean((1, 3)), half, atol=1.0)
    import pycolmap
    rec = pycolmap.Reconstruction(str(tmp_path / 'sparse' / '0'))
    assert rec.num_images() == 24 and rec.num_cameras() == 1
    for i, name in enumerate(info.names):
        im = rec.find_image_with_name(name)
        assert im.image_id == info.image_ids[i]
        w2c = im.cam_from_world().matrix()
        c2w = np.linalg.inv(np.concatenate([w2c, [[0, 0, 0, 1]]]))[:3] @ np.diag([1., -1., -1., 1.])
        np.testing.assert_allclose(c2w, info.camtoworlds[i], atol=1e-12)
    cam = rec.cameras[1]
    np.testing.assert_allclose(cam.calibration_matrix(), np.linalg.inv(info.pixtocams[0]), atol=1e-12)
    # Image ids are shuffled relative to names (so the loaders' name sorting matters).
    assert info.image_ids != sorted(info.image_ids)


def test_write_colmap_scene_rounds_downsampled_sizes(tmp_path):
    synthetic.write_colmap_scene(str(tmp_path), n_views=2, width=66, height=50, factors=(4,))
    # 66 / 4 = 16.5 and 50 / 4 = 12.5 are rounded half up, as the official images_4 folders.
    assert Image.open(tmp_path / 'images_4' / 'img_000.png').size == (17, 13)


def test_write_blender_scene(tmp_path):
    metas = synthetic.write_blender_scene(str(tmp_path), n_train=3, n_val=1, n_test=2, width=32, height=32)
    for split, n in (('train', 3), ('val', 1), ('test', 2)):
        with open(tmp_path / f'transforms_{split}.json') as fp:
            meta = json.load(fp)
        assert meta == json.loads(json.dumps(metas[split]))
        assert len(meta['frames']) == n
        for frame in meta['frames']:
            assert not os.path.splitext(frame['file_path'])[1]
            m = np.array(frame['transform_matrix'])
            assert m.shape == (4, 4)
            np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
            np.testing.assert_allclose(m[3], [0, 0, 0, 1])
            # The camera looks at the origin: -z axis points from the camera to it.
            np.testing.assert_allclose(-m[:3, 2], -m[:3, 3] / np.linalg.norm(m[:3, 3]), atol=1e-12)
            img = np.asarray(Image.open(tmp_path / (frame['file_path'] + '.png')))
            assert img.shape == (32, 32, 4)
            assert img[..., 3].min() == 0 and img[..., 3].max() == 255  # Transparent background + object.


def test_cli(tmp_path):
    synthetic.main([str(tmp_path / 'c'), '--format', 'colmap', '--n_views', '3', '--width', '16', '--height',
                    '12', '--factors', '2'])
    assert len(os.listdir(tmp_path / 'c' / 'images_2')) == 3
    synthetic.main([str(tmp_path / 'b'), '--format', 'blender', '--n_views', '2', '--width', '16',
                    '--height', '16'])
    assert os.path.isfile(tmp_path / 'b' / 'transforms_train.json')


@pytest.mark.parametrize('model', ['SIMPLE_PINHOLE', 'SIMPLE_RADIAL', 'RADIAL', 'OPENCV'])
def test_camera_models_written(tmp_path, model):
    info = synthetic.write_colmap_scene(str(tmp_path), n_views=2, width=16, height=12, factors=(),
                                        camera_model=model)
    import pycolmap
    cam = pycolmap.Reconstruction(str(tmp_path / 'sparse' / '0')).cameras[1]
    assert cam.model.name == model
    np.testing.assert_allclose(cam.calibration_matrix(), np.linalg.inv(info.pixtocams[0]), atol=1e-12)
    # pycolmap's own projection (with the distortion) agrees with the generator's.
    pts = synthetic.LOOKAT + np.array([[0.1, -0.2, 0.3], [0.3, 0.2, -0.1]])
    c2w = info.camtoworlds[0]
    q, t = synthetic.camtoworld_to_colmap(c2w)
    cam_pts = pts @ synthetic.qvec_to_rotmat(q).T + t
    uv = np.array(cam.img_from_cam(cam_pts))
    np.testing.assert_allclose(uv, synthetic.project(pts, c2w, info.pixtocams[0], info.distortion), atol=1e-6)
