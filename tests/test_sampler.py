"""Tests of RaySampler (mipnerf360/datasets/sampler.py) and Prefetcher: training batches as a pure function of
(seed, step, rank), DDP slicing of the global batch, uint8 images on the device, no host syncs."""

import numpy as np
import pytest
import torch

import syncguard
from mipnerf360 import camera_utils, datasets, utils
from scenes import config as _config
from scenes import load


def test_train_batches_are_pure_functions_of_seed_step_rank(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, batch_size=256, cast_rays_in_train_step=True)
    a = load('train', d, cfg)
    b = datasets.Prefetcher(load('train', d, cfg))
    r1 = load('train', d, cfg, rank=1, world_size=2)
    key = lambda x: torch.stack([x.rays.pix_x_int, x.rays.pix_y_int, x.rays.cam_idx[..., 0]]).reshape(3, -1)
    assert torch.equal(key(a.get_train_batch(7)), key(b.sampler.get_train_batch(7)))
    assert not torch.equal(key(a.get_train_batch(7)), key(a.get_train_batch(8)))
    assert r1.get_train_batch(7).rays.pix_x_int.shape[0] == 128  # Per-rank batch.
    assert not torch.equal(key(a.get_train_batch(7))[:, :128], key(r1.get_train_batch(7)))
    other_seed = load('train', d, _config(d, factor=4, batch_size=256, seed=1, cast_rays_in_train_step=True))
    assert not torch.equal(key(a.get_train_batch(7)), key(other_seed.get_train_batch(7)))
    # The prefetch thread serves exactly get_train_batch(step) for step = start, start + 1, ...
    b.set_start_step(5)
    assert torch.equal(key(b.peek()), key(a.get_train_batch(5)))
    for step in (5, 6, 7):
        assert torch.equal(key(next(b)), key(a.get_train_batch(step)))
    with pytest.raises(RuntimeError):
        b.set_start_step(0)
    c = datasets.Prefetcher(load('train', d, cfg), start_step=100)
    assert torch.equal(key(next(c)), key(a.get_train_batch(100)))
    b.close()
    c.close()


def test_all_images_sampling_is_uniform_over_pixels(multicam_scene):
    d, _ = multicam_scene
    ds = load('train', d, _config(d, factor=2, batch_size=20000, cast_rays_in_train_step=True))
    counts = ds.scene.widths * ds.scene.heights
    assert len(set(counts)) == 2  # Two image sizes.
    cam = ds.get_train_batch(0).rays.cam_idx.reshape(-1).numpy()
    freq = np.bincount(cam, minlength=ds.size) / cam.size
    p = counts / counts.sum()
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / cam.size))
    b = ds.get_train_batch(1).rays
    assert torch.all(b.pix_x_int < torch.as_tensor(ds.scene.widths)[b.cam_idx[..., 0]])
    assert torch.all(b.pix_y_int < torch.as_tensor(ds.scene.heights)[b.cam_idx[..., 0]])


def test_single_image_batching_and_patches(colmap_scene):
    d, _ = colmap_scene
    cfg = _config(d, factor=4, batch_size=64, batching='single_image', patch_size=4,
                  num_border_pixels_to_mask=1, cast_rays_in_train_step=True)
    ds = load('train', d, cfg)
    px = ds.get_train_batch(0).rays
    assert px.pix_x_int.shape == (4, 4, 4)
    assert torch.unique(px.cam_idx).numel() == 1
    np.testing.assert_array_equal(np.diff(px.pix_x_int.numpy(), axis=2), 1)
    np.testing.assert_array_equal(np.diff(px.pix_y_int.numpy(), axis=1), 1)
    assert px.pix_x_int.min() >= 1 and px.pix_x_int.max() <= ds.scene.width - 2



def _key(batch):
    """(x, y, camera) of every ray of a batch, `[3, n]`."""
    r = batch.rays
    return torch.stack([r.pix_x_int, r.pix_y_int, r.cam_idx[..., 0]]).reshape(3, -1)


@pytest.mark.parametrize('kw', [dict(), dict(patch_size=2), dict(batching='single_image', patch_size=2)])
@pytest.mark.parametrize('world_size', [2, 4])
def test_ranks_split_the_single_process_batch(multicam_scene, kw, world_size):
    """Ranks 0..N-1 together draw exactly the batch one process draws at that step (rays, colours, patches)."""
    d, _ = multicam_scene
    cfg = _config(d, factor=2, batch_size=64, cast_rays_in_train_step=True, **kw)
    single = load('train', d, cfg)
    ranks = [load('train', d, cfg, rank=r, world_size=world_size) for r in range(world_size)]
    for step in (0, 5):
        want = single.get_train_batch(step)
        got = [s.get_train_batch(step) for s in ranks]
        assert got[0].rgb.shape[0] == want.rgb.shape[0] // world_size
        assert torch.equal(torch.cat([_key(g) for g in got], 1), _key(want))
        assert torch.equal(torch.cat([g.rgb for g in got]), want.rgb)
    with pytest.raises(datasets.DatasetError, match='batch_size = 64 holds 16 patches of 2\\^2 rays, which 3 '):
        load('train', d, _config(d, factor=2, batch_size=64, patch_size=2), rank=0, world_size=3)


@pytest.mark.parametrize('kw', [dict(), dict(cast_rays_in_train_step=True), dict(batching='single_image'),
                                dict(apply_bayer_mask=True, patch_size=2, cast_rays_in_train_step=True)])
def test_train_batch_makes_no_host_sync(multicam_scene, kw):
    d, _ = multicam_scene
    sampler = load('train', d, _config(d, factor=2, batch_size=64, **kw))
    want = sampler.get_train_batch(3)
    with syncguard.no_host_sync():
        batch = sampler.get_train_batch(3)
    assert torch.equal(batch.rgb, want.rgb)
    if isinstance(batch.rays, utils.Pixels):
        assert torch.equal(_key(batch), _key(want))
    else:
        assert torch.equal(batch.rays.origins, want.rays.origins)
        assert torch.equal(batch.rays.directions, want.rays.directions)
    if kw.get('apply_bayer_mask'):
        x, y = batch.rays.pix_x_int, batch.rays.pix_y_int
        red = (x % 2 == 0) & (y % 2 == 0)
        assert torch.equal(batch.rays.lossmult[..., 0] == 1, red)  # RGGB: red at (even x, even y).
        np.testing.assert_array_equal(batch.rays.lossmult.sum(-1).numpy(), 1.)


def test_uint8_images_stay_uint8_in_one_flat_buffer(multicam_scene):
    """8-bit images are stored as uint8 without padding and served as exactly u8 / 255 in float32."""
    d, _ = multicam_scene
    sampler = load('test', d, _config(d, factor=2))
    pixels = sampler._rgb.pixels  # pylint: disable=protected-access
    assert pixels.dtype == torch.uint8
    assert pixels.shape == (int((sampler.scene.widths * sampler.scene.heights).sum()), 3)
    for k in range(sampler.size):
        np.testing.assert_array_equal(sampler.generate_ray_batch(k).rgb.numpy(),
                                      (sampler.scene.images[k] / 255.).astype(np.float32))
    # Every 8-bit value converts as the float64 division rounded to float32.
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    scene = datasets.Scene(split=utils.DataSplit.TEST, data_dir='', images=values,
                           camtoworlds=np.eye(4)[None, :3], pixtocams=np.eye(3)[None],
                           widths=np.array([16]), heights=np.array([16]), near=0., far=1.)
    rgb = datasets.RaySampler(scene, _config('')).generate_ray_batch(0).rgb.numpy()
    np.testing.assert_array_equal(rgb, (values[0] / 255.).astype(np.float32))
    assert len(np.unique(rgb)) == 256


def test_sampler_cameras_and_cycling(multicam_scene):
    d, _ = multicam_scene
    cfg = _config(d, factor=2, batch_size=64, cast_rays_in_train_step=True)
    sampler = load('test', d, cfg)
    pixtocams, camtoworlds, dist, ndc = sampler.cameras
    for t, want in ((pixtocams, sampler.scene.pixtocams), (camtoworlds, sampler.scene.camtoworlds),
                    (dist['k1'], sampler.scene.distortion_params['k1'])):
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
        np.testing.assert_array_equal(t.numpy(), np.asarray(want, np.float32))
    assert ndc is None
    # Pixels cast with `cameras` in the train step give the rays the sampler casts itself.
    train = load('train', d, cfg)
    px = train.get_train_batch(0).rays
    cast_here = load('train', d, _config(d, factor=2, batch_size=64)).get_train_batch(0).rays
    cast_later = camera_utils.cast_ray_batch(train.cameras, px, train.camtype, xnp=torch)
    for field in ('origins', 'directions', 'radii'):
        np.testing.assert_array_equal(getattr(cast_later, field), getattr(cast_here, field))
    seen = [next(sampler).rgb for _ in range(sampler.size + 1)]
    assert torch.equal(seen[-1], seen[0]) and not torch.equal(seen[1], seen[0])


def test_prefetcher_exposes_its_sampler(colmap_scene):
    d, _ = colmap_scene
    sampler = load('train', d, _config(d, factor=4, batch_size=64))
    with datasets.Prefetcher(sampler, start_step=3) as prefetcher:
        assert prefetcher.sampler is sampler and prefetcher.scene is sampler.scene
        assert prefetcher.size == sampler.size and prefetcher.camtype == sampler.camtype
        assert prefetcher.cameras is sampler.cameras
        assert torch.equal(next(prefetcher).rgb, sampler.get_train_batch(3).rgb)
    assert not prefetcher._thread.is_alive()  # pylint: disable=protected-access


def test_prefetcher_reraises_errors_of_its_thread(colmap_scene):
    """An exception in get_train_batch reaches next() instead of leaving it blocked forever."""
    d, _ = colmap_scene
    sampler = load('train', d, _config(d, factor=4, batch_size=64))

    def fail(step):
        raise ValueError(f'step {step}')

    sampler.get_train_batch = fail
    with datasets.Prefetcher(sampler, start_step=2) as prefetcher:
        with pytest.raises(ValueError, match='step 2'):
            next(prefetcher)


def test_mixed_8_bit_and_float_images_are_served_in_0_1():
    """An 8-bit image next to a float (16-bit file) one is served as u8 / 255, not as 0..255 floats."""
    u8 = np.full((2, 3, 3), 255, np.uint8)
    f32 = np.full((2, 3, 3), .5, np.float32)
    for images in ([u8, f32], datasets.scene.stack_if_same([u8, f32]),
                   [u8, np.full((4, 3, 3), .5, np.float32)]):
        n = len(images)
        heights = np.array([im.shape[0] for im in images])
        scene = datasets.Scene(split=utils.DataSplit.TEST, data_dir='', images=images,
                               camtoworlds=np.tile(np.eye(4)[None, :3], (n, 1, 1)),
                               pixtocams=np.tile(np.eye(3)[None], (n, 1, 1)), widths=np.array([3] * n),
                               heights=heights, near=0., far=1.)
        sampler = datasets.RaySampler(scene, _config(''))
        np.testing.assert_array_equal(sampler.generate_ray_batch(0).rgb.numpy(), 1.)
        np.testing.assert_array_equal(sampler.generate_ray_batch(1).rgb.numpy(), .5)
