"""Tests of the NeRF++ / FVS / DTU / LLFF poses_bounds loaders, use_tiffs, and the render paths
(mipnerf360/datasets/) against the ground truth of scenes written by mipnerf360/synthetic.py."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mipnerf360 import camera_utils, configs, datasets, synthetic
from scenes import load


def _config(data_dir, **kw):
    kw.setdefault('batch_size', 64)
    return configs.Config(data_dir=data_dir, **kw)


def _read(path):
    return np.asarray(Image.open(path), np.float32) / 255.


def _image(ds, i):
    """Image `i` of the sampler's scene in float32 [0, 1] (8-bit images are stored as read, uint8)."""
    return datasets.image_as_float(ds.scene.images[i])


def _map(T, points):
    """Applies a [4, 4] world transform to points [n, 3]."""
    return points @ T[:3, :3].T + T[:3, 3]


def _assert_pose(c2w, gt_c2w, T, atol=1e-5):
    """`c2w` is the true pose `gt_c2w` after the similarity `T` (rotation part divided by its scale)."""
    scale = np.cbrt(np.linalg.det(T[:3, :3]))
    np.testing.assert_allclose(c2w[:3, 3], _map(T, gt_c2w[None, :3, 3])[0], atol=atol)
    np.testing.assert_allclose(c2w[:3, :3], T[:3, :3] @ gt_c2w[:3, :3] / scale, atol=atol)


def _assert_rays_hit_truth(ds, k, gt_c2w, gt_pixtocam, T=np.eye(4), n=16, atol=1e-4):
    """Rays of random pixels of the dataset's camera `k`, mapped back through `T`, pass through the surface
    points that the true camera sees through the same pixel centres."""
    rays = ds.generate_ray_batch(k).rays
    h, w = rays.origins.shape[:2]
    rng = np.random.default_rng(k)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    o = rays.origins[ys, xs].double().numpy()
    d = rays.directions[ys, xs].double().numpy()
    go, gd = synthetic.pixel_rays(gt_c2w, gt_pixtocam, xs + .5, ys + .5)
    _, _, t = synthetic.trace(go, gd)
    assert np.all(np.isfinite(t))
    x = go + t[:, None] * gd  # True surface points.
    Tinv = np.linalg.inv(T)
    a, b = _map(Tinv, o), _map(Tinv, o + d)
    u = (b - a) / np.linalg.norm(b - a, axis=-1, keepdims=True)
    dist = np.linalg.norm(np.cross(x - a, u), axis=-1)
    assert np.all(dist < atol * np.maximum(1., np.linalg.norm(x - a, axis=-1))), dist
    assert np.all(((x - a) * u).sum(-1) > 0)  # In front of the camera.


def _axis_distance(c2w, point):
    """Distance `[n]` from `point` `[3]` to each camera's forward (-z) half-line through its centre."""
    fwd = -c2w[:, :3, 2] / np.linalg.norm(c2w[:, :3, 2], axis=-1, keepdims=True)
    v = point - c2w[:, :3, 3]
    assert np.all((v * fwd).sum(-1) > 0)  # The point is in front.
    return np.linalg.norm(np.cross(v, fwd), axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# NeRF++ (tat_nerfpp).


@pytest.fixture(scope='module')
def nerfpp_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('nerfpp'))
    return d, synthetic.write_nerfpp_scene(d, n_train=6, n_test=2, n_path=5, width=32, height=24)


def test_nerfpp_loader(nerfpp_scene):
    d, truth = nerfpp_scene
    cfg = _config(d, dataset_loader='tat_nerfpp')
    for split in ('train', 'test'):
        ds = load(split, d, cfg)
        gt = truth[split]
        assert ds.size == len(gt.names)
        np.testing.assert_allclose(ds.scene.camtoworlds, gt.camtoworlds, atol=1e-12)
        np.testing.assert_allclose(ds.scene.pixtocams, gt.pixtocams, rtol=1e-6)  # Each image its own intrinsics.
        for i, n in enumerate(gt.names):
            np.testing.assert_array_equal(_image(ds, i), _read(os.path.join(d, split, 'rgb', n + '.png')))
        for k in range(ds.size):
            _assert_rays_hit_truth(ds, k, gt.camtoworlds[k], gt.pixtocams[k])
    # Render path: poses of camera_path/, size of the first test image, the first path focal length.
    ds = load('test', d, _config(d, dataset_loader='tat_nerfpp', render_path=True))
    gt = truth['camera_path']
    assert ds.size == 5 and ds.scene.images is None
    np.testing.assert_allclose(ds.scene.camtoworlds, gt.camtoworlds, atol=1e-12)
    f = 1. / gt.pixtocams[0, 0, 0]
    np.testing.assert_allclose(ds.scene.pixtocams, [np.linalg.inv([[f, 0, 16], [0, f, 12], [0, 0, 1]])] * ds.size,
                               rtol=1e-6)
    b = next(ds)
    assert b.rgb is None and b.rays.origins.shape == (24, 32, 3)
    np.testing.assert_allclose(b.rays.origins[5, 7].numpy(), gt.camtoworlds[0][:, 3], atol=1e-6)


def test_nerfpp_errors(nerfpp_scene, tmp_path):
    d, truth = nerfpp_scene
    s = shutil.copytree(d, tmp_path / 'a')
    os.remove(s / 'train' / 'pose' / (truth['train'].names[0] + '.txt'))
    with pytest.raises(datasets.DatasetError, match=r'train has 5 pose files but 6 intrinsics files'):
        load('train', str(s), _config(str(s), dataset_loader='tat_nerfpp'))
    s = shutil.copytree(d, tmp_path / 'b')
    with open(s / 'train' / 'intrinsics' / (truth['train'].names[1] + '.txt'), 'w') as fp:
        fp.write('1 0 0\n0 1 0\n0 0 1\n')
    with pytest.raises(datasets.DatasetError, match=r'intrinsics.*train_0001.txt holds 9 numbers.*4x4 matrix'):
        load('train', str(s), _config(str(s), dataset_loader='tat_nerfpp'))
    s = shutil.copytree(d, tmp_path / 'c')
    os.remove(s / 'test' / 'rgb' / (truth['test'].names[0] + '.png'))
    with pytest.raises(datasets.DatasetError, match=r'rgb has 1 images but .*test/pose has 2 poses'):
        load('test', str(s), _config(str(s), dataset_loader='tat_nerfpp'))


# ---------------------------------------------------------------------------------------------------------------
# Free View Synthesis (tat_fvs).


@pytest.fixture(scope='module')
def fvs_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('fvs'))
    return d, synthetic.write_fvs_scene(d, n_views=10, width=32, height=24, scales=(0.25, 0.5), image_ext='jpg')


@pytest.mark.parametrize('factor,folder,size', [(0, 'ibr3d_pw_0.50', (32, 24)), (1, 'ibr3d_pw_0.25', (16, 12))])
def test_fvs_loader(fvs_scene, factor, folder, size):
    d, truth = fvs_scene
    gt = truth[folder]
    cfg = _config(d, dataset_loader='tat_fvs', factor=factor)
    tr = load('train', d, cfg)
    te = load('test', d, cfg)
    assert te.scene.split_names == [gt.names[0], gt.names[8]]
    assert tr.scene.split_names == [n for i, n in enumerate(gt.names) if i % 8]
    assert (te.scene.width, te.scene.height) == size
    T = tr.scene.world_transform
    np.testing.assert_allclose(np.abs(tr.scene.poses[:, :3, 3]).max(), 1., atol=1e-9)  # PCA-normalised.
    for ds in (tr, te):
        for i, n in enumerate(ds.scene.split_names):
            g = gt.names.index(n)
            _assert_pose(ds.scene.camtoworlds[i], gt.camtoworlds[g], T)
            np.testing.assert_allclose(ds.scene.pixtocams[i], gt.pixtocams[g], rtol=1e-6)
            np.testing.assert_array_equal(_image(ds, i), _read(os.path.join(d, 'dense', folder, n)))
    for k in (0, 1):
        g = te.scene.split_indices[k]
        _assert_rays_hit_truth(te, k, gt.camtoworlds[g], gt.pixtocams[g], T)
    g = tr.scene.split_indices[3]
    _assert_rays_hit_truth(tr, 3, gt.camtoworlds[g], gt.pixtocams[g], T)


def test_fvs_render_path_is_an_ellipse_around_the_scene(fvs_scene):
    d, _ = fvs_scene
    ds = load('test', d, _config(d, dataset_loader='tat_fvs', render_path=True,
                                                 render_path_frames=9))
    assert ds.size == 9 and ds.scene.images is None
    np.testing.assert_allclose(ds.scene.camtoworlds, ds.scene.render_poses)
    # All true cameras look at synthetic.LOOKAT, so the path looks at its image in the dataset world.
    centre = _map(ds.scene.world_transform, synthetic.LOOKAT[None])[0]
    assert _axis_distance(ds.scene.camtoworlds, centre).max() < 1e-6
    np.testing.assert_allclose(ds.scene.camtoworlds[:, 2, 3], 0., atol=1e-9)  # z_variation = 0: a flat ellipse.
    assert ds.scene.camtoworlds[:, 2, 1].min() > 0  # Upright.


def test_fvs_errors(fvs_scene, tmp_path):
    d, _ = fvs_scene
    s = shutil.copytree(d, tmp_path / 'a')
    os.remove(s / 'dense' / 'ibr3d_pw_0.50' / 'Ks.npy')
    with pytest.raises(datasets.DatasetNotFoundError, match=r'ibr3d_pw_0.50/Ks.npy does not exist.*Rs.npy'):
        load('train', str(s), _config(str(s), dataset_loader='tat_fvs'))
    s = shutil.copytree(d, tmp_path / 'b')
    p = s / 'dense' / 'ibr3d_pw_0.50' / 'ts.npy'
    np.save(p, np.load(p)[:-1])
    with pytest.raises(datasets.DatasetError, match=r'ts.npy has shape \(9, 3\) but .* has 10 im_\* images.*'
                                                    r'\[10, 3\]'):
        load('train', str(s), _config(str(s), dataset_loader='tat_fvs'))
    with pytest.raises(datasets.DatasetError, match=r'Config.factor 2 must be between 0 and 1'):
        load('train', d, _config(d, dataset_loader='tat_fvs', factor=2))


# ---------------------------------------------------------------------------------------------------------------
# DTU.


@pytest.fixture(scope='module')
def dtu_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('dtu'))
    return synthetic.write_dtu_scene(d, n_views=9, width=32, height=24)


def test_dtu_loader(dtu_scene):
    d, gt = dtu_scene
    assert len(os.listdir(d)) == 8 * 9  # The reference's image count: files // 8.
    cfg = _config(d, dataset_loader='dtu', factor=2, dtu_light_cond=3, dtuhold=4)
    tr = load('train', d, cfg)
    te = load('test', d, cfg)
    np.testing.assert_array_equal(te.scene.split_indices, [0, 4, 8])
    assert tr.size == 6 and (te.scene.width, te.scene.height) == (16, 12)
    T = tr.scene.world_transform
    np.testing.assert_allclose(T, te.scene.world_transform)
    centres = np.concatenate([tr.scene.camtoworlds, te.scene.camtoworlds])[:, :3, 3]
    np.testing.assert_allclose(np.abs(centres).max(), 1., atol=1e-9)  # Rescaled to the unit cube.
    for ds in (tr, te):
        for i, g in enumerate(ds.scene.split_indices):
            _assert_pose(ds.scene.camtoworlds[i], gt.camtoworlds[g], T)
            np.testing.assert_allclose(ds.scene.pixtocams[i], gt.pixtocams[g] @ np.diag([2., 2., 1.]), rtol=1e-6,
                                       atol=1e-12)
    # Images: the light-3 files, area-downsampled by 2.
    full = _read(os.path.join(d, gt.names[4]))
    np.testing.assert_allclose(te.scene.images[1], full.reshape(12, 2, 16, 2, 3).mean((1, 3)), atol=1e-6)
    for k in range(te.size):
        _assert_rays_hit_truth(te, k, gt.camtoworlds[te.scene.split_indices[k]],
                               gt.pixtocams[te.scene.split_indices[k]] @ np.diag([2., 2., 1.]), T)
    # Light 7 reads the `_max` files (brighter).
    mx = load('test', d, _config(d, dataset_loader='dtu', factor=0, dtu_light_cond=7))
    np.testing.assert_array_equal(_image(mx, 0), _read(os.path.join(d, 'rect_001_max.png')))
    np.testing.assert_allclose(mx.scene.pixtocams[0], gt.pixtocams[0], rtol=1e-6, atol=1e-12)


def test_dtu_errors(dtu_scene, tmp_path):
    d, _ = dtu_scene
    root = shutil.copytree(os.path.dirname(os.path.dirname(d)), tmp_path / 'a')
    s = str(root / 'Rectified' / 'scan1')
    with pytest.raises(datasets.DatasetError, match='render_path cannot be used with the DTU dataset'):
        load('train', s, _config(s, dataset_loader='dtu', render_path=True))
    with open(root / 'cal18' / 'pos_002.txt', 'w') as fp:
        fp.write('1 2 3 4\n5 6 seven 8\n9 10 11 12\n')
    with pytest.raises(datasets.DatasetError, match=r'Cannot parse DTU calibration file .*cal18/pos_002.txt.*3x4'):
        load('train', s, _config(s, dataset_loader='dtu'))
    np.savetxt(root / 'cal18' / 'pos_002.txt', np.eye(3))
    with pytest.raises(datasets.DatasetError, match=r'pos_002.txt holds an array of shape \(3, 3\).*3x4'):
        load('train', s, _config(s, dataset_loader='dtu'))
    os.remove(root / 'cal18' / 'pos_002.txt')
    with pytest.raises(datasets.DatasetNotFoundError, match=r'cal18/pos_002.txt does not exist.*two levels'):
        load('train', s, _config(s, dataset_loader='dtu'))
    empty = tmp_path / 'empty'
    os.makedirs(empty)
    with pytest.raises(datasets.DatasetError, match=r'No DTU images \(rect_XXX_\*.png\) in .*empty'):
        load('train', str(empty), _config(str(empty), dataset_loader='dtu'))


# ---------------------------------------------------------------------------------------------------------------
# LLFF from poses_bounds.npy only.


@pytest.fixture(scope='module')
def llff_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('llff_pb'))
    info, bounds = synthetic.write_llff_scene(d, n_views=10, width=48, height=32, factors=(2,))
    return d, info, bounds


def test_llff_poses_bounds_layout(llff_scene):
    """The written rows follow LLFF's convention: columns (down, right, back) of the camera, its centre, and
    (h, w, f); checked on the OpenGL truth (x right, y up, z back) directly."""
    d, info, bounds = llff_scene
    arr = np.load(os.path.join(d, 'poses_bounds.npy'))
    assert arr.shape == (10, 17)
    mats = arr[:, :15].reshape(-1, 3, 5)
    c2w = info.camtoworlds
    np.testing.assert_allclose(mats[:, :, 0], -c2w[:, :, 1], atol=1e-12)  # down = -up
    np.testing.assert_allclose(mats[:, :, 1], c2w[:, :, 0], atol=1e-12)  # right
    np.testing.assert_allclose(mats[:, :, 2], c2w[:, :, 2], atol=1e-12)  # back
    np.testing.assert_allclose(mats[:, :, 3], c2w[:, :, 3], atol=1e-12)
    np.testing.assert_allclose(mats[:, :, 4], [[32, 48, 1. / info.pixtocams[0, 0, 0]]] * 10)
    np.testing.assert_allclose(arr[:, 15:], bounds)
    assert np.all(bounds[:, 0] > 0) and np.all(bounds[:, 1] > bounds[:, 0])


def test_llff_poses_bounds_loader(llff_scene):
    d, info, _ = llff_scene
    assert not os.path.exists(os.path.join(d, 'sparse'))
    cfg = _config(d, factor=2, llffhold=4)
    tr = load('train', d, cfg)
    te = load('test', d, cfg)
    assert te.scene.split_names == [info.names[i] for i in (0, 4, 8)] and tr.size == 7
    T = tr.scene.world_transform
    for ds in (tr, te):
        for i, n in enumerate(ds.scene.split_names):
            g = info.names.index(n)
            _assert_pose(ds.scene.camtoworlds[i], info.camtoworlds[g], T)
            np.testing.assert_allclose(ds.scene.pixtocams[i], info.pixtocams[g] @ np.diag([2., 2., 1.]), rtol=1e-6)
            np.testing.assert_array_equal(_image(ds, i), _read(os.path.join(d, 'images_2', n)))
    for k in range(te.size):
        g = te.scene.split_indices[k]
        _assert_rays_hit_truth(te, k, info.camtoworlds[g], info.pixtocams[g] @ np.diag([2., 2., 1.]), T)


def test_llff_forward_facing_spiral(llff_scene):
    """Forward-facing: poses scaled by 1 / (0.75 near_min) and recentred; the spiral path (render_path_frames
    poses) looks at the point at the focus depth on the average camera's axis, computed from the bounds."""
    d, info, bounds = llff_scene
    ds = load('test', d, _config(d, factor=2, forward_facing=True, render_path=True,
                                                 render_path_frames=11))
    assert ds.size == 11 and ds.scene.images is None
    T = ds.scene.world_transform
    scale = 1. / (0.75 * bounds.min())
    np.testing.assert_allclose(np.cbrt(np.linalg.det(T[:3, :3])), scale, rtol=1e-9)
    for g in range(len(info.names)):
        _assert_pose(ds.scene.poses[g], info.camtoworlds[g], T)
    np.testing.assert_allclose(camera_utils.average_pose(ds.scene.poses), np.eye(4)[:3], atol=1e-9)  # Recentred.
    near, far = bounds.min() * scale * 0.9, bounds.max() * scale * 5.
    focus = 1. / (0.25 / near + 0.75 / far)
    assert _axis_distance(ds.scene.camtoworlds, np.array([0., 0., -focus])).max() < 1e-6
    np.testing.assert_allclose(ds.scene.camtoworlds, ds.scene.render_poses)
    # Rays are cast in NDC: the render cameras' rays start on the near plane z = -1.
    b = ds.generate_ray_batch(3)
    assert b.rgb is None
    np.testing.assert_allclose(b.rays.origins[..., 2].numpy(), -1., atol=1e-4)


def test_llff_poses_bounds_errors(llff_scene, tmp_path):
    d, info, _ = llff_scene
    s = shutil.copytree(d, tmp_path / 'a')
    np.save(s / 'poses_bounds.npy', np.load(s / 'poses_bounds.npy')[:, :15])
    with pytest.raises(datasets.DatasetError,
                       match=r'poses_bounds.npy has shape \(10, 15\) but must be \[N, 17\]'):
        load('train', str(s), _config(str(s), factor=2))
    s = shutil.copytree(d, tmp_path / 'b')
    np.save(s / 'poses_bounds.npy', np.load(s / 'poses_bounds.npy')[:9])
    with pytest.raises(datasets.DatasetError, match=r'poses_bounds.npy has 9 poses but .*images has 10 images'):
        load('train', str(s), _config(str(s), factor=2))


# ---------------------------------------------------------------------------------------------------------------
# Render paths of 360 scenes (COLMAP layout): ellipse, spline, render_path_file.


@pytest.fixture(scope='module')
def colmap_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('colmap360'))
    return d, synthetic.write_colmap_scene(d, n_views=12, width=32, height=24, factors=(4,), seed=3,
                                           supersample=1)


def test_ellipse_render_path(colmap_scene):
    d, info = colmap_scene
    ds = load('test', d, _config(d, factor=4, render_path=True, render_path_frames=13))
    assert ds.size == 13 and ds.scene.images is None
    centre = _map(ds.scene.world_transform, synthetic.LOOKAT[None])[0]
    assert _axis_distance(ds.scene.camtoworlds, centre).max() < 1e-6  # All look at the scene centre.
    np.testing.assert_allclose(ds.scene.camtoworlds[:, 2, 3], 0., atol=1e-9)
    # A closed loop around the centre: the azimuths cover the circle once, in order.
    rel = ds.scene.camtoworlds[:, :2, 3] - centre[:2]
    step = np.angle(np.exp(1j * np.diff(np.arctan2(rel[:, 1], rel[:, 0]))))
    assert np.all(step > 0) or np.all(step < 0)
    np.testing.assert_allclose(np.abs(step).sum() + np.abs(np.angle(
            np.exp(1j * (np.arctan2(rel[0, 1], rel[0, 0]) - np.arctan2(rel[-1, 1], rel[-1, 0]))))), 2 * np.pi)


def test_spline_render_path_from_file_and_directory(colmap_scene, tmp_path):
    d, info = colmap_scene
    names = sorted(info.names)
    keys = [names[1], names[4], names[7], names[10]]
    key_file = tmp_path / 'keys.txt'
    key_file.write_text('\n'.join(keys + ['not_an_image.png']) + '\n')
    kw = dict(factor=4, render_path=True, render_spline_n_interp=6, render_spline_smoothness=0.)
    ds = load('test', d, _config(d, render_spline_keyframes=str(key_file), **kw))
    np.testing.assert_array_equal(ds.scene.spline_indices, [1, 4, 7, 10])
    assert ds.size == 6 * 3 and ds.scene.images is None
    kf = ds.scene.poses[ds.scene.spline_indices]
    # With no smoothing the spline starts at the first keyframe and passes through every keyframe centre.
    np.testing.assert_allclose(ds.scene.camtoworlds[0], kf[0], atol=1e-6)
    path = ds.scene.camtoworlds[:, :3, 3]
    max_step = np.linalg.norm(np.diff(path, axis=0), axis=-1).max()
    for c in kf[1:-1, :3, 3]:
        assert np.linalg.norm(path - c, axis=-1).min() < 0.6 * max_step
    # A folder of keyframe images gives the same path.
    key_dir = tmp_path / 'keys'
    os.makedirs(key_dir)
    for n in keys:
        shutil.copy(os.path.join(d, 'images', n), key_dir / n)
    ds2 = load('test', d, _config(d, render_spline_keyframes=str(key_dir), **kw))
    np.testing.assert_allclose(ds2.scene.camtoworlds, ds.scene.camtoworlds, atol=1e-12)
    with pytest.raises(ValueError, match='at least 2 keyframes'):
        (tmp_path / 'one.txt').write_text(names[0] + '\n')
        load('test', d, _config(d, render_spline_keyframes=str(tmp_path / 'one.txt'), **kw))


def test_render_path_file(colmap_scene, tmp_path):
    d, _ = colmap_scene
    poses = camera_utils.pad_poses(synthetic.ring_poses(5, radius=0.8, target=np.zeros(3)))
    np.save(tmp_path / 'path.npy', poses)
    ds = load('test', d, _config(d, factor=4, render_path=True,
                                                 render_path_file=str(tmp_path / 'path.npy')))
    assert ds.size == 5
    np.testing.assert_allclose(ds.scene.camtoworlds, poses[:, :3], atol=1e-12)
    for k in (0, 4):
        o = ds.generate_ray_batch(k).rays.origins.numpy()
        np.testing.assert_allclose(o.reshape(-1, 3), np.broadcast_to(poses[k, :3, 3], (6 * 8, 3)), atol=1e-6)
    np.save(tmp_path / 'bad.npy', poses[:, :2])
    with pytest.raises(datasets.DatasetError, match=r'bad.npy holds an array of shape \(5, 2, 4\).*\[N, 3, 4\]'):
        load('test', d, _config(d, factor=4, render_path=True,
                                                 render_path_file=str(tmp_path / 'bad.npy')))
    with pytest.raises(datasets.DatasetNotFoundError, match=r'nope.npy does not exist.*render_path_file'):
        load('test', d, _config(d, factor=4, render_path=True,
                                                 render_path_file=str(tmp_path / 'nope.npy')))


# ---------------------------------------------------------------------------------------------------------------
# Blender: orbit render path and 32-bit TIFF images.


@pytest.fixture(scope='module')
def blender_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('blender'))
    return d, synthetic.write_blender_scene(d, n_train=2, n_val=1, n_test=5, width=16, height=16, supersample=1)


@pytest.mark.parametrize('split', ['test', 'train'])
def test_blender_orbit_render_path(blender_scene, split):
    d, metas = blender_scene
    cfg = _config(d, dataset_loader='blender', render_path=True, render_path_frames=10)
    ds = load(split, d, cfg)
    assert ds.size == 10 and ds.scene.images is None
    test_c2w = np.array([f['transform_matrix'] for f in metas['test']['frames']])[:, :3]
    c = ds.scene.camtoworlds[:, :3, 3]
    gc = test_c2w[:, :, 3]
    # At the test cameras' (median) distance and elevation, looking at the scene centre (the origin).
    np.testing.assert_allclose(np.linalg.norm(c, axis=-1), np.median(np.linalg.norm(gc, axis=-1)), rtol=1e-6)
    elev = lambda p: np.arcsin(p[:, 2] / np.linalg.norm(p, axis=-1))
    np.testing.assert_allclose(elev(c), np.median(elev(gc)), atol=1e-6)  # (The json poses are float32.)
    assert _axis_distance(ds.scene.camtoworlds, np.zeros(3)).max() < 1e-6
    np.testing.assert_allclose(ds.scene.camtoworlds[:, 2, 0], 0., atol=1e-9)  # Level: camera x is horizontal.
    assert ds.scene.camtoworlds[:, 2, 1].min() > 0  # Upright.
    az = np.arctan2(c[:, 1], c[:, 0])
    np.testing.assert_allclose(np.angle(np.exp(1j * np.diff(az))), 2 * np.pi / 10, atol=1e-9)  # Even steps.
    np.testing.assert_allclose(az[0], np.arctan2(gc[0, 1], gc[0, 0]), atol=1e-6)
    b = ds.generate_ray_batch(0)
    assert b.rgb is None
    focal = 8. / np.tan(0.5 * metas['test']['camera_angle_x'])
    np.testing.assert_allclose(np.linalg.inv(ds.scene.pixtocams), [[[focal, 0, 8], [0, focal, 8], [0, 0, 1]]] * ds.size,
                               rtol=1e-6)
    np.testing.assert_allclose(b.rays.origins[3, 4].numpy(), c[0], atol=1e-6)


def _srgb(x):
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.maximum(x, 1e-12) ** (1 / 2.4) - 0.055)


def test_blender_use_tiffs(blender_scene, tmp_path):
    """32-bit linear R, G, B, A channel TIFFs: colour sRGB-encoded, alpha used as is, composited on white."""
    d, metas = blender_scene
    s = shutil.copytree(d, tmp_path / 'tiff')
    rng = np.random.default_rng(0)
    want = []
    for fr in metas['test']['frames']:
        lin = rng.uniform(0., 1., (16, 16, 4)).astype(np.float32)
        lin[:4, :, 3] = 0.
        for c, ch in enumerate('RGBA'):
            Image.fromarray(lin[..., c], 'F').save(str(s / fr['file_path']) + f'_{ch}.tiff')
        disp = rng.uniform(0., 2., (16, 16)).astype(np.float32)
        Image.fromarray(disp, 'F').save(str(s / fr['file_path']) + '_disp.tiff')
        a = lin[..., 3:].astype(np.float64)
        want.append((_srgb(lin[..., :3].astype(np.float64)) * a + 1. - a, disp))
        os.remove(str(s / fr['file_path']) + '.png')  # Only the TIFFs are read.
    ds = load('test', str(s), _config(str(s), dataset_loader='blender', use_tiffs=True,
                                                       compute_disp_metrics=True))
    for i, (img, disp) in enumerate(want):
        np.testing.assert_allclose(ds.scene.images[i], img, atol=1e-5)
        np.testing.assert_array_equal(ds.scene.disp_images[i], disp)
    np.testing.assert_array_equal(ds.scene.images[:, :4], 1.)  # Transparent rows are the white background.
    b = ds.generate_ray_batch(1)
    np.testing.assert_array_equal(b.rgb.numpy(), ds.scene.images[1])
    np.testing.assert_array_equal(b.disps.numpy(), want[1][1])


def test_writers_cameras_project_like_the_truth(fvs_scene, dtu_scene):
    """The FVS (K, R, t) and DTU (P) files map world points to the pixels where the true camera sees them
    (`synthetic.project`), independently of the loaders."""
    pts = synthetic.LOOKAT + np.random.default_rng(0).uniform(-0.4, 0.4, (10, 3))
    d, truth = fvs_scene
    folder = os.path.join(d, 'dense', 'ibr3d_pw_0.25')
    Ks, Rs, ts = (np.load(os.path.join(folder, f'{n}.npy')) for n in ('Ks', 'Rs', 'ts'))
    gt = truth['ibr3d_pw_0.25']
    for i in (0, 5):
        cam = pts @ Rs[i].T + ts[i]
        assert np.all(cam[:, 2] > 0)
        uv = (cam / cam[:, 2:]) @ Ks[i].T
        np.testing.assert_allclose(uv[:, :2], synthetic.project(pts, gt.camtoworlds[i], gt.pixtocams[i]),
                                   atol=1e-9)
    d, gt = dtu_scene
    for i in (0, 7):
        P = np.loadtxt(os.path.join(os.path.dirname(os.path.dirname(d)), 'cal18', f'pos_{i + 1:03d}.txt'))
        assert P.shape == (3, 4)
        x = np.concatenate([pts, np.ones((10, 1))], -1) @ P.T
        np.testing.assert_allclose(x[:, :2] / x[:, 2:], synthetic.project(pts, gt.camtoworlds[i],
                                                                          gt.pixtocams[i]), atol=1e-6)
        # Every lighting condition is the same picture with its own brightness.
        lo = _read(os.path.join(d, f'rect_{i + 1:03d}_0_r5000.png'))
        hi = _read(os.path.join(d, f'rect_{i + 1:03d}_max.png'))
        assert hi.mean() > lo.mean() + 0.05


def test_synthetic_cli_writes_every_format(tmp_path):
    for fmt, probe in (('llff', 'poses_bounds.npy'), ('nerfpp', 'camera_path/pose'),
                       ('fvs', 'dense/ibr3d_pw_0.50/Ks.npy'), ('dtu', 'cal18/pos_003.txt')):
        synthetic.main([str(tmp_path / fmt), '--format', fmt, '--n_views', '3', '--width', '16', '--height', '8',
                        '--factors', '2', '--supersample', '1'])
        assert os.path.exists(tmp_path / fmt / probe), fmt
