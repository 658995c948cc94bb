"""Tests of the dataset loaders (mipnerf360/datasets/: files -> Scene) and of the rays a RaySampler casts from
them, on generated scenes."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mipnerf360 import datasets, synthetic, utils
from scenes import N_VIEWS, load
from scenes import config as _config


def _to_orig_world(points, transform):
    """Maps dataset-world points `[n, 3]` back to the generator's world, given Scene.world_transform."""
    inv = np.linalg.inv(transform)
    return points @ inv[:3, :3].T + inv[:3, 3]


def _check_rays_hit_truth(ds, info, pixels, rays, factor_pixtocams, atol=1e-4):
    """Each ray, mapped back to the generator's world, passes through the surface point that the true camera
    sees through the same pixel centre."""
    cam = pixels.cam_idx[..., 0].reshape(-1).cpu().numpy()
    px = pixels.pix_x_int.reshape(-1).cpu().numpy()
    py = pixels.pix_y_int.reshape(-1).cpu().numpy()
    o = rays.origins.reshape(-1, 3).double().cpu().numpy()
    d = rays.directions.reshape(-1, 3).double().cpu().numpy()
    T = ds.scene.world_transform
    names = [ds.scene.split_names[i] for i in cam]
    gi = [info.names.index(n) for n in names]
    for k in range(len(cam)):
        g = gi[k]
        go, gd = synthetic.pixel_rays(info.camtoworlds[g], factor_pixtocams[g], np.array([px[k] + .5]),
                                      np.array([py[k] + .5]), distortion=info.distortion
                                      if info.camera_ids[g] == 1 else None)
        _, _, t = synthetic.trace(go, gd)
        x = go + t[:, None] * gd  # True surface point, generator world.
        # Two points of the dataset ray in the generator's world: the line through them must contain x.
        a = _to_orig_world(o[k:k + 1], T)
        b = _to_orig_world(o[k:k + 1] + d[k:k + 1], T)
        u = (b - a) / np.linalg.norm(b - a)
        dist = np.linalg.norm(np.cross(x - a, u))
        assert dist < atol * max(1., np.linalg.norm(x - a)), (k, dist)
        assert float((x - a)[0] @ u[0]) > 0  # In front of the camera.


def test_llff_poses_split_and_images(colmap_scene):
    d, info = colmap_scene
    cfg = _config(d, factor=2)
    tr = load('train', d, cfg)
    te = load('test', d, cfg)
    names = sorted(info.names)
    assert te.scene.split_names == names[::8]
    assert tr.scene.split_names == [n for i, n in enumerate(names) if i % 8]
    assert tr.size + te.size == N_VIEWS
    # Poses before the PCA transform match the generated ones: undo the transform's scale and rigid part.
    T = tr.scene.world_transform
    scale = np.cbrt(np.linalg.det(T[:3, :3]))
    for ds in (tr, te):
        for i, n in enumerate(ds.scene.split_names):
            g = info.names.index(n)
            gt = info.camtoworlds[g]
            np.testing.assert_allclose(ds.scene.camtoworlds[i][:3, 3], T[:3, :3] @ gt[:3, 3] + T[:3, 3], atol=1e-5)
            np.testing.assert_allclose(ds.scene.camtoworlds[i][:3, :3], T[:3, :3] @ gt[:3, :3] / scale, atol=1e-5)
    # The PCA transform puts camera centres in [-1, 1]^3 with the largest coordinate at 1.
    np.testing.assert_allclose(np.abs(tr.scene.poses[:, :3, 3]).max(), 1., atol=1e-6)
    # Images equal the files in images_2 (values in [0, 1]), and intrinsics are halved.
    for i, n in enumerate(te.scene.split_names):
        ref = np.asarray(Image.open(os.path.join(d, 'images_2', n)), np.float32) / 255.
        assert te.scene.images.dtype == np.uint8  # 8-bit files are kept as read.
        np.testing.assert_array_equal(te.scene.images[i], np.asarray(Image.open(os.path.join(d, 'images_2', n))))
        np.testing.assert_array_equal(datasets.image_as_float(te.scene.images[i]), ref)
        np.testing.assert_allclose(te.scene.pixtocams[i], info.pixtocams[info.names.index(n)] @ np.diag([2., 2., 1.]),
                                   rtol=1e-6)
    assert (te.scene.width, te.scene.height) == (32, 24)
    # Test batches are whole images, in order, cycling.
    for k in range(te.size + 1):
        b = next(te)
        np.testing.assert_array_equal(b.rgb.numpy(), datasets.image_as_float(te.scene.images[k % te.size]))
        assert b.rays.origins.shape == (24, 32, 3)


def test_llff_unsorted_order(colmap_scene):
    d, info = colmap_scene
    ds = load('test', d, _config(d, factor=4, load_alphabetical=False))
    order = [info.names[i] for i in np.argsort(info.image_ids)]  # COLMAP id order.
    assert ds.scene.split_names == order[::8]


def test_llff_use_all_images(colmap_scene):
    d, _ = colmap_scene
    ds = load('train', d, _config(d, factor=4, llff_use_all_images_for_training=True))
    assert ds.size == N_VIEWS


@pytest.mark.parametrize('factor', [0, 2])
def test_train_rays_pass_through_true_surface_points(colmap_scene, factor):
    d, info = colmap_scene
    cfg = _config(d, factor=factor, batch_size=64, cast_rays_in_train_step=True)
    ds = load('train', d, cfg)
    batch = ds.get_train_batch(3)
    assert isinstance(batch.rays, utils.Pixels)
    rays = ds.cast_rays(batch.rays)
    f = max(factor, 1)
    _check_rays_hit_truth(ds, info, batch.rays, rays, info.pixtocams @ np.diag([f, f, 1.]))
    # The colours are the images' pixels.
    cam, px, py = (batch.rays.cam_idx[..., 0], batch.rays.pix_x_int, batch.rays.pix_y_int)
    images = datasets.image_as_float(ds.scene.images)
    np.testing.assert_array_equal(batch.rgb.numpy(), images[cam.numpy(), py.numpy(), px.numpy()])
    # Ray fields follow the reference conventions: unit camera-space depth, normalised viewdirs.
    c2w = ds.scene.camtoworlds[cam.reshape(-1).numpy()]
    depth = -np.einsum('ni,ni->n', rays.directions.reshape(-1, 3).numpy(), c2w[:, :3, 2])
    np.testing.assert_allclose(depth, 1., atol=1e-5)
    np.testing.assert_allclose(rays.viewdirs.norm(dim=-1).numpy(), 1., atol=1e-6)
    np.testing.assert_allclose(rays.near.numpy(), cfg.near)


def test_multicamera_scene_loads_with_two_sizes(multicam_scene):
    d, info = multicam_scene
    cfg = _config(d, factor=2, batch_size=64, cast_rays_in_train_step=True)
    ds = load('train', d, cfg)
    assert isinstance(ds.scene.images, list)
    assert {im.shape for im in ds.scene.images} == {(12, 16, 3), (10, 24, 3)}
    assert isinstance(ds.scene.distortion_params['k1'], np.ndarray)  # Camera 2 is undistorted.
    batch = ds.get_train_batch(0)
    rays = ds.cast_rays(batch.rays)
    _check_rays_hit_truth(ds, info, batch.rays, rays, info.pixtocams @ np.diag([2., 2., 1.]))
    te = load('test', d, cfg)
    for k in range(te.size):
        b = te.generate_ray_batch(k)
        assert b.rgb.shape == te.scene.images[k].shape
        np.testing.assert_array_equal(b.rgb.numpy(), datasets.image_as_float(te.scene.images[k]))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_images_n_rounding(colmap_scene, tmp_path):
    d, info = colmap_scene
    d = _copy(d, tmp_path / 's')
    # 64x48 / 4 = 16x12; make images_4 one pixel larger: accepted, with intrinsics scaled by 64/17, 48/13.
    for n in info.names:
        p = os.path.join(d, 'images_4', n)
        Image.open(p).resize((17, 13)).save(p)
    ds = load('test', d, _config(d, factor=4))
    n0 = ds.scene.split_names[0]
    want = info.pixtocams[info.names.index(n0)] @ np.diag([64 / 17, 48 / 13, 1])
    np.testing.assert_allclose(ds.scene.pixtocams[0], want,
                               rtol=1e-6)
    for n in info.names:
        p = os.path.join(d, 'images_4', n)
        Image.open(p).resize((18, 14)).save(p)
    with pytest.raises(datasets.DatasetError, match=r'images_4.* is 18x14 .* expects 16x12'):
        load('test', d, _config(d, factor=4))


def test_error_messages(colmap_scene, tmp_path):
    d, info = colmap_scene
    with pytest.raises(datasets.DatasetNotFoundError, match='does not exist.*Config.data_dir'):
        load('train', str(tmp_path / 'nope'), _config(str(tmp_path / 'nope')))
    with pytest.raises(datasets.DatasetError, match="Unknown Config.dataset_loader 'foo'"):
        load('train', d, _config(d, dataset_loader='foo'))
    empty = tmp_path / 'empty'
    os.makedirs(empty)
    with pytest.raises(datasets.DatasetNotFoundError, match='No cameras in .*empty.*mipnerf360.colmap'):
        load('train', str(empty), _config(str(empty)))
    # No images.
    s = _copy(d, tmp_path / 'noimg')
    for n in os.listdir(os.path.join(s, 'images_2')):
        os.remove(os.path.join(s, 'images_2', n))
    with pytest.raises(datasets.DatasetError, match='No images in .*images_2'):
        load('train', s, _config(s, factor=2))
    shutil.rmtree(os.path.join(s, 'images_2'))
    with pytest.raises(datasets.DatasetNotFoundError, match='images_2 does not exist'):
        load('train', s, _config(s, factor=2))
    # Images / poses mismatch: a posed image missing from images/.
    s = _copy(d, tmp_path / 'mismatch')
    with open(os.path.join(s, 'sparse', '0', 'images.txt'), 'a') as fp:
        fp.write('99 1 0 0 0 0 0 0 1 ghost.png\n\n')
    with pytest.raises(datasets.DatasetError, match="posed images .*'ghost.png'.* re-run COLMAP"):
        load('train', s, _config(s, factor=2))
    # Unknown camera model.
    s = _copy(d, tmp_path / 'model')
    with open(os.path.join(s, 'sparse', '0', 'cameras.txt'), 'w') as fp:
        fp.write('1 FULL_OPENCV 64 48 50 50 32 24 0 0 0 0 0 0 0 0\n')
    with pytest.raises(datasets.DatasetError, match="Unsupported COLMAP camera model 'FULL_OPENCV'"):
        load('train', s, _config(s, factor=2))
    # Corrupt COLMAP files.
    s = _copy(d, tmp_path / 'corrupt')
    with open(os.path.join(s, 'sparse', '0', 'images.txt'), 'w') as fp:
        fp.write('1 garbage\n')
    with pytest.raises(datasets.DatasetError, match='Corrupt COLMAP model in .*corrupt'):
        load('train', s, _config(s, factor=2))


@pytest.fixture(scope='module')
def blender_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('blender'))
    return d, synthetic.write_blender_scene(d, n_train=4, n_val=1, n_test=2, width=32, height=32)


def test_blender_loader(blender_scene):
    d, metas = blender_scene
    cfg = _config(d, dataset_loader='blender', batch_size=64, cast_rays_in_train_step=True)
    for split in ('train', 'test'):
        ds = load(split, d, cfg)
        frames = metas[split]['frames']
        assert ds.size == len(frames)
        for i, fr in enumerate(frames):
            rgba = np.asarray(Image.open(os.path.join(d, fr['file_path'] + '.png')), np.float64) / 255.
            want = rgba[..., :3] * rgba[..., 3:] + 1. - rgba[..., 3:]
            np.testing.assert_allclose(ds.scene.images[i], want, atol=1e-6)
            np.testing.assert_allclose(ds.scene.camtoworlds[i], np.array(fr['transform_matrix'])[:3], atol=1e-6)
        focal = 16. / np.tan(0.5 * metas[split]['camera_angle_x'])
        np.testing.assert_allclose(np.linalg.inv(ds.scene.pixtocams),
                                   [[[focal, 0, 16], [0, focal, 16], [0, 0, 1]]] * ds.size,
                                   rtol=1e-6)
    # Rays reproject: the ray of pixel (x, y) hits the surface point the true camera sees there.
    ds = load('train', d, cfg)
    pixels = ds.get_train_batch(0).rays
    rays = ds.cast_rays(pixels)
    cam = pixels.cam_idx[..., 0].reshape(-1).numpy()
    px, py = pixels.pix_x_int.reshape(-1).numpy(), pixels.pix_y_int.reshape(-1).numpy()
    for k in range(16):
        go, gd = synthetic.pixel_rays(ds.scene.camtoworlds[cam[k]], ds.scene.pixtocams[cam[k]], np.array([px[k] + .5]),
                                      np.array([py[k] + .5]))
        np.testing.assert_allclose(rays.origins.reshape(-1, 3)[k].numpy(), go[0], atol=1e-5)
        np.testing.assert_allclose(rays.directions.reshape(-1, 3)[k].numpy(), gd[0], atol=1e-5)


def test_nerfstudio_per_frame_intrinsics(multicam_scene, tmp_path):
    d, info = multicam_scene
    s = str(tmp_path / 'ns')
    shutil.copytree(os.path.join(d, 'images'), os.path.join(s, 'images'))
    frames = []
    for i, n in enumerate(info.names):
        K = np.linalg.inv(info.pixtocams[i])
        w, h = info.sizes[i]
        fr = {'file_path': f'images/{n}', 'fl_x': K[0, 0], 'fl_y': K[1, 1], 'cx': K[0, 2], 'cy': K[1, 2],
              'w': w, 'h': h, 'transform_matrix': np.concatenate([info.camtoworlds[i], [[0, 0, 0, 1]]]).tolist()}
        if info.camera_ids[i] == 1:
            fr.update(info.distortion)
        frames.append(fr)
    with open(os.path.join(s, 'transforms.json'), 'w') as fp:
        json.dump({'camera_model': 'OPENCV', 'frames': frames}, fp)
    cfg = _config(s, dataset_loader='nerfstudio', factor=2, batch_size=64, cast_rays_in_train_step=True)
    ds = load('train', s, cfg)
    assert ds.size == 8 and isinstance(ds.scene.images, list)
    batch = ds.get_train_batch(0)
    # Names are the frames' file paths; map them to the generator's names for the check.
    ds.scene.split_names = [os.path.basename(n) for n in ds.scene.split_names]
    _check_rays_hit_truth(ds, info, batch.rays, ds.cast_rays(batch.rays), info.pixtocams @ np.diag([2., 2., 1.]))


def test_forward_facing_ndc(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, forward_facing=True)
    ds = load('test', d, cfg)
    np.testing.assert_allclose(ds.scene.pixtocam_ndc, ds.scene.pixtocams[0])
    b = ds.generate_ray_batch(0)
    # NDC origins of the reference camera lie on the near plane z = -1.
    np.testing.assert_allclose(b.rays.origins[..., 2].numpy(), -1., atol=1e-4)
    assert ds.scene.render_poses.shape == (cfg.render_path_frames, 3, 4)


def test_render_path(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, render_path=True, render_path_frames=7)
    ds = load('test', d, cfg)
    assert ds.size == 7 and ds.scene.images is None
    b = next(ds)
    assert b.rgb is None and b.rays.origins.shape == (12, 16, 3)
    np.testing.assert_allclose(b.rays.origins[0, 0].numpy(), ds.scene.camtoworlds[0][:3, 3], atol=1e-6)


def test_tat_nerfpp_loader(colmap_scene, tmp_path):
    """NeRF++ layout (OpenCV camera-to-world 4x4 text files, 4x4 intrinsics): poses flipped to OpenGL, every
    image's own intrinsics used."""
    d, info = colmap_scene
    for split, idx in (('train', range(0, 6)), ('test', range(6, 8))):
        for sub in ('pose', 'intrinsics', 'rgb'):
            os.makedirs(tmp_path / split / sub)
        for i in idx:
            n = info.names[i]
            c2w_cv = np.concatenate([info.camtoworlds[i] @ np.diag([1., -1., -1., 1.]), [[0, 0, 0, 1]]])
            np.savetxt(tmp_path / split / 'pose' / f'{n}.txt', c2w_cv)
            K = np.eye(4)
            K[:3, :3] = np.linalg.inv(info.pixtocams[i])
            np.savetxt(tmp_path / split / 'intrinsics' / f'{n}.txt', K)
            shutil.copy(os.path.join(d, 'images', n), tmp_path / split / 'rgb' / n)
    ds = load('train', str(tmp_path), _config(str(tmp_path), dataset_loader='tat_nerfpp'))
    np.testing.assert_allclose(ds.scene.camtoworlds, info.camtoworlds[:6], atol=1e-9)
    np.testing.assert_array_equal(ds.scene.world_transform, np.eye(4))  # NeRF++ poses are used as given.
    np.testing.assert_allclose(ds.scene.pixtocams, info.pixtocams[:6], rtol=1e-6)
    ref = np.asarray(Image.open(os.path.join(d, 'images', info.names[2])), np.float32) / 255.
    np.testing.assert_array_equal(datasets.image_as_float(ds.scene.images[2]), ref)


@pytest.mark.parametrize('kw', [dict(factor=2), dict(factor=4, forward_facing=True)])
def test_world_transform_maps_centres_back_to_the_input_frame(colmap_scene, kw):
    """The inverse of `Scene.world_transform` takes the normalised camera centres back to the COLMAP files'."""
    d, info = colmap_scene
    for split in ('train', 'test'):
        scene = datasets.load_scene(_config(d, **kw), split)
        inv = np.linalg.inv(scene.world_transform)
        centres = scene.camtoworlds[:, :3, 3] @ inv[:3, :3].T + inv[:3, 3]
        want = np.stack([info.camtoworlds[info.names.index(n)][:3, 3] for n in scene.split_names])
        np.testing.assert_allclose(centres, want, atol=1e-6)
        assert np.abs(scene.camtoworlds[:, :3, 3] - want).max() > 1e-2  # The transform is not the identity.
