"""Tests of the dataset loaders and batching (mipnerf360/datasets.py) on generated scenes."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mipnerf360 import configs, datasets, synthetic, utils

N_VIEWS = 12


@pytest.fixture(scope='module')
def colmap_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('llff'))
    return d, synthetic.write_colmap_scene(d, n_views=N_VIEWS, width=64, height=48, factors=(2, 4), seed=1)


@pytest.fixture(scope='module')
def multicam_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('multicam'))
    info = synthetic.write_colmap_scene(d, n_views=10, width=32, height=24, factors=(2,), multi_camera=True,
                                        camera_model='OPENCV', seed=2)
    return d, info


def _config(data_dir, **kw):
    kw.setdefault('batch_size', 512)
    return configs.Config(data_dir=data_dir, **kw)


def _to_orig_world(points, transform):
    """Maps dataset-world points `[n, 3]` back to the generator's world, given colmap_to_world_transform."""
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
    T = ds.colmap_to_world_transform
    names = [ds.split_names[i] for i in cam]
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
    tr = datasets.load_dataset('train', d, cfg)
    te = datasets.load_dataset('test', d, cfg)
    names = sorted(info.names)
    assert te.split_names == names[::8]
    assert tr.split_names == [n for i, n in enumerate(names) if i % 8]
    assert tr.size + te.size == N_VIEWS
    # Poses before the PCA transform match the generated ones: undo the transform's scale and rigid part.
    T = tr.colmap_to_world_transform
    scale = np.cbrt(np.linalg.det(T[:3, :3]))
    for ds in (tr, te):
        for i, n in enumerate(ds.split_names):
            g = info.names.index(n)
            gt = info.camtoworlds[g]
            np.testing.assert_allclose(ds.camtoworlds[i][:3, 3], T[:3, :3] @ gt[:3, 3] + T[:3, 3], atol=1e-5)
            np.testing.assert_allclose(ds.camtoworlds[i][:3, :3], T[:3, :3] @ gt[:3, :3] / scale, atol=1e-5)
    # The PCA transform puts camera centres in [-1, 1]^3 with the largest coordinate at 1.
    np.testing.assert_allclose(np.abs(tr.poses[:, :3, 3]).max(), 1., atol=1e-6)
    # Images equal the files in images_2 (values in [0, 1]), and intrinsics are halved.
    for i, n in enumerate(te.split_names):
        ref = np.asarray(Image.open(os.path.join(d, 'images_2', n)), np.float32) / 255.
        np.testing.assert_array_equal(te.images[i], ref)
        np.testing.assert_allclose(te.pixtocams[i], info.pixtocams[info.names.index(n)] @ np.diag([2., 2., 1.]),
                                   rtol=1e-6)
    assert (te.width, te.height) == (32, 24)
    # Test batches are whole images, in order, cycling.
    for k in range(te.size + 1):
        b = next(te)
        np.testing.assert_array_equal(b.rgb.numpy(), te.images[k % te.size])
        assert b.rays.origins.shape == (24, 32, 3)


def test_llff_unsorted_order(colmap_scene):
    d, info = colmap_scene
    ds = datasets.load_dataset('test', d, _config(d, factor=4, load_alphabetical=False))
    order = [info.names[i] for i in np.argsort(info.image_ids)]  # COLMAP id order.
    assert ds.split_names == order[::8]


def test_llff_use_all_images(colmap_scene):
    d, _ = colmap_scene
    ds = datasets.load_dataset('train', d, _config(d, factor=4, llff_use_all_images_for_training=True))
    assert ds.size == N_VIEWS


@pytest.mark.parametrize('factor', [0, 2])
def test_train_rays_pass_through_true_surface_points(colmap_scene, factor):
    d, info = colmap_scene
    cfg = _config(d, factor=factor, batch_size=64, cast_rays_in_train_step=True)
    ds = datasets.load_dataset('train', d, cfg)
    batch = ds.get_train_batch(3)
    assert isinstance(batch.rays, utils.Pixels)
    rays = ds.cast_rays(batch.rays)
    f = max(factor, 1)
    _check_rays_hit_truth(ds, info, batch.rays, rays, info.pixtocams @ np.diag([f, f, 1.]))
    # The colours are the images' pixels.
    cam, px, py = (batch.rays.cam_idx[..., 0], batch.rays.pix_x_int, batch.rays.pix_y_int)
    np.testing.assert_array_equal(batch.rgb.numpy(), ds.images[cam.numpy(), py.numpy(), px.numpy()])
    # Ray fields follow the reference conventions: unit camera-space depth, normalised viewdirs.
    c2w = ds.camtoworlds[cam.reshape(-1).numpy()]
    depth = -np.einsum('ni,ni->n', rays.directions.reshape(-1, 3).numpy(), c2w[:, :3, 2])
    np.testing.assert_allclose(depth, 1., atol=1e-5)
    np.testing.assert_allclose(rays.viewdirs.norm(dim=-1).numpy(), 1., atol=1e-6)
    np.testing.assert_allclose(rays.near.numpy(), cfg.near)


def test_train_batches_are_pure_functions_of_seed_step_rank(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, batch_size=256, cast_rays_in_train_step=True)
    a = datasets.load_dataset('train', d, cfg)
    b = datasets.load_dataset('train', d, cfg)
    r1 = datasets.load_dataset('train', d, cfg, rank=1, world_size=2)
    key = lambda x: torch.stack([x.rays.pix_x_int, x.rays.pix_y_int, x.rays.cam_idx[..., 0]]).reshape(3, -1)
    assert torch.equal(key(a.get_train_batch(7)), key(b.get_train_batch(7)))
    assert not torch.equal(key(a.get_train_batch(7)), key(a.get_train_batch(8)))
    assert r1.get_train_batch(7).rays.pix_x_int.shape[0] == 128  # Per-rank batch.
    assert not torch.equal(key(a.get_train_batch(7))[:, :128], key(r1.get_train_batch(7)))
    other_seed = datasets.load_dataset('train', d, _config(d, factor=4, batch_size=256, seed=1,
                                                           cast_rays_in_train_step=True))
    assert not torch.equal(key(a.get_train_batch(7)), key(other_seed.get_train_batch(7)))
    # The prefetch thread serves exactly get_train_batch(step) for step = start, start + 1, ...
    b.set_start_step(5)
    assert torch.equal(key(b.peek()), key(a.get_train_batch(5)))
    for step in (5, 6, 7):
        assert torch.equal(key(next(b)), key(a.get_train_batch(step)))
    with pytest.raises(RuntimeError):
        b.set_start_step(0)
    c = datasets.load_dataset('train', d, cfg, start_step=100)
    assert torch.equal(key(next(c)), key(a.get_train_batch(100)))
    b.close()
    c.close()


def test_all_images_sampling_is_uniform_over_pixels(multicam_scene):
    d, _ = multicam_scene
    ds = datasets.load_dataset('train', d, _config(d, factor=2, batch_size=20000, cast_rays_in_train_step=True))
    counts = ds.widths * ds.heights
    assert len(set(counts)) == 2  # Two image sizes.
    cam = ds.get_train_batch(0).rays.cam_idx.reshape(-1).numpy()
    freq = np.bincount(cam, minlength=ds.size) / cam.size
    p = counts / counts.sum()
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / cam.size))
    b = ds.get_train_batch(1).rays
    assert torch.all(b.pix_x_int < torch.as_tensor(ds.widths)[b.cam_idx[..., 0]])
    assert torch.all(b.pix_y_int < torch.as_tensor(ds.heights)[b.cam_idx[..., 0]])


def test_single_image_batching_and_patches(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, batch_size=64, batching='single_image', patch_size=4,
                  num_border_pixels_to_mask=1, cast_rays_in_train_step=True)
    ds = datasets.load_dataset('train', d, cfg)
    px = ds.get_train_batch(0).rays
    assert px.pix_x_int.shape == (4, 4, 4)
    assert torch.unique(px.cam_idx).numel() == 1
    np.testing.assert_array_equal(np.diff(px.pix_x_int.numpy(), axis=2), 1)
    np.testing.assert_array_equal(np.diff(px.pix_y_int.numpy(), axis=1), 1)
    assert px.pix_x_int.min() >= 1 and px.pix_x_int.max() <= ds.width - 2


def test_multicamera_scene_loads_with_two_sizes(multicam_scene):
    d, info = multicam_scene
    cfg = _config(d, factor=2, batch_size=64, cast_rays_in_train_step=True)
    ds = datasets.load_dataset('train', d, cfg)
    assert isinstance(ds.images, list)
    assert {im.shape for im in ds.images} == {(12, 16, 3), (10, 24, 3)}
    assert isinstance(ds.distortion_params['k1'], np.ndarray)  # Camera 2 is undistorted.
    batch = ds.get_train_batch(0)
    rays = ds.cast_rays(batch.rays)
    _check_rays_hit_truth(ds, info, batch.rays, rays, info.pixtocams @ np.diag([2., 2., 1.]))
    te = datasets.load_dataset('test', d, cfg)
    for k in range(te.size):
        b = te.generate_ray_batch(k)
        assert b.rgb.shape == te.images[k].shape
        np.testing.assert_array_equal(b.rgb.numpy(), te.images[k])


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
    ds = datasets.load_dataset('test', d, _config(d, factor=4))
    n0 = ds.split_names[0]
    want = info.pixtocams[info.names.index(n0)] @ np.diag([64 / 17, 48 / 13, 1])
    np.testing.assert_allclose(ds.pixtocams[0], want,
                               rtol=1e-6)
    for n in info.names:
        p = os.path.join(d, 'images_4', n)
        Image.open(p).resize((18, 14)).save(p)
    with pytest.raises(datasets.DatasetError, match=r'images_4.* is 18x14 .* expects 16x12'):
        datasets.load_dataset('test', d, _config(d, factor=4))


def test_error_messages(colmap_scene, tmp_path):
    d, info = colmap_scene
    with pytest.raises(datasets.DatasetNotFoundError, match='does not exist.*Config.data_dir'):
        datasets.load_dataset('train', str(tmp_path / 'nope'), _config(str(tmp_path / 'nope')))
    with pytest.raises(datasets.DatasetError, match="Unknown Config.dataset_loader 'foo'"):
        datasets.load_dataset('train', d, _config(d, dataset_loader='foo'))
    empty = tmp_path / 'empty'
    os.makedirs(empty)
    with pytest.raises(datasets.DatasetNotFoundError, match='No cameras in .*empty.*mipnerf360.colmap'):
        datasets.load_dataset('train', str(empty), _config(str(empty)))
    # No images.
    s = _copy(d, tmp_path / 'noimg')
    for n in os.listdir(os.path.join(s, 'images_2')):
        os.remove(os.path.join(s, 'images_2', n))
    with pytest.raises(datasets.DatasetError, match='No images in .*images_2'):
        datasets.load_dataset('train', s, _config(s, factor=2))
    shutil.rmtree(os.path.join(s, 'images_2'))
    with pytest.raises(datasets.DatasetNotFoundError, match='images_2 does not exist'):
        datasets.load_dataset('train', s, _config(s, factor=2))
    # Images / poses mismatch: a posed image missing from images/.
    s = _copy(d, tmp_path / 'mismatch')
    with open(os.path.join(s, 'sparse', '0', 'images.txt'), 'a') as fp:
        fp.write('99 1 0 0 0 0 0 0 1 ghost.png\n\n')
    with pytest.raises(datasets.DatasetError, match="posed images .*'ghost.png'.* re-run COLMAP"):
        datasets.load_dataset('train', s, _config(s, factor=2))
    # Unknown camera model.
    s = _copy(d, tmp_path / 'model')
    with open(os.path.join(s, 'sparse', '0', 'cameras.txt'), 'w') as fp:
        fp.write('1 FULL_OPENCV 64 48 50 50 32 24 0 0 0 0 0 0 0 0\n')
    with pytest.raises(datasets.DatasetError, match="Unsupported COLMAP camera model 'FULL_OPENCV'"):
        datasets.load_dataset('train', s, _config(s, factor=2))
    # Corrupt COLMAP files.
    s = _copy(d, tmp_path / 'corrupt')
    with open(os.path.join(s, 'sparse', '0', 'images.txt'), 'w') as fp:
        fp.write('1 garbage\n')
    with pytest.raises(datasets.DatasetError, match='Corrupt COLMAP model in .*corrupt'):
        datasets.load_dataset('train', s, _config(s, factor=2))


@pytest.fixture(scope='module')
def blender_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('blender'))
    return d, synthetic.write_blender_scene(d, n_train=4, n_val=1, n_test=2, width=32, height=32)


def test_blender_loader(blender_scene):
    d, metas = blender_scene
    cfg = _config(d, dataset_loader='blender', batch_size=64, cast_rays_in_train_step=True)
    for split in ('train', 'test'):
        ds = datasets.load_dataset(split, d, cfg)
        frames = metas[split]['frames']
        assert ds.size == len(frames)
        for i, fr in enumerate(frames):
            rgba = np.asarray(Image.open(os.path.join(d, fr['file_path'] + '.png')), np.float64) / 255.
            want = rgba[..., :3] * rgba[..., 3:] + 1. - rgba[..., 3:]
            np.testing.assert_allclose(ds.images[i], want, atol=1e-6)
            np.testing.assert_allclose(ds.camtoworlds[i], np.array(fr['transform_matrix'])[:3], atol=1e-6)
        focal = 16. / np.tan(0.5 * metas[split]['camera_angle_x'])
        np.testing.assert_allclose(np.linalg.inv(ds.pixtocams), [[focal, 0, 16], [0, focal, 16], [0, 0, 1]],
                                   rtol=1e-6)
    # Rays reproject: the ray of pixel (x, y) hits the surface point the true camera sees there.
    ds = datasets.load_dataset('train', d, cfg)
    pixels = ds.get_train_batch(0).rays
    rays = ds.cast_rays(pixels)
    cam = pixels.cam_idx[..., 0].reshape(-1).numpy()
    px, py = pixels.pix_x_int.reshape(-1).numpy(), pixels.pix_y_int.reshape(-1).numpy()
    for k in range(16):
        go, gd = synthetic.pixel_rays(ds.camtoworlds[cam[k]], ds.pixtocams, np.array([px[k] + .5]),
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
    ds = datasets.load_dataset('train', s, cfg)
    assert ds.size == 8 and isinstance(ds.images, list)
    batch = ds.get_train_batch(0)
    # Names are the frames' file paths; map them to the generator's names for the check.
    ds.split_names = [os.path.basename(n) for n in ds.split_names]
    _check_rays_hit_truth(ds, info, batch.rays, ds.cast_rays(batch.rays), info.pixtocams @ np.diag([2., 2., 1.]))


def test_forward_facing_ndc(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, forward_facing=True)
    ds = datasets.load_dataset('test', d, cfg)
    np.testing.assert_allclose(ds.pixtocam_ndc, ds.pixtocams[0])
    b = ds.generate_ray_batch(0)
    # NDC origins of the reference camera lie on the near plane z = -1.
    np.testing.assert_allclose(b.rays.origins[..., 2].numpy(), -1., atol=1e-4)
    assert ds.render_poses.shape == (cfg.render_path_frames, 3, 4)


def test_render_path(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, render_path=True, render_path_frames=7)
    ds = datasets.load_dataset('test', d, cfg)
    assert ds.size == 7 and ds.images is None
    b = next(ds)
    assert b.rgb is None and b.rays.origins.shape == (12, 16, 3)
    np.testing.assert_allclose(b.rays.origins[0, 0].numpy(), ds.camtoworlds[0][:3, 3], atol=1e-6)


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
    ds = datasets.load_dataset('train', str(tmp_path), _config(str(tmp_path), dataset_loader='tat_nerfpp'))
    np.testing.assert_allclose(ds.camtoworlds, info.camtoworlds[:6], atol=1e-9)
    np.testing.assert_allclose(ds.pixtocams, info.pixtocams[:6], rtol=1e-6)
    ref = np.asarray(Image.open(os.path.join(d, 'images', info.names[2])), np.float32) / 255.
    np.testing.assert_array_equal(ds.images[2], ref)
