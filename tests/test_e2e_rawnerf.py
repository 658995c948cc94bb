"""RawNeRF end to end: `python -m train / eval / render` with configs/llff_raw_test.gin (llff_raw.gin plus the
reference's test-scene evaluation: affine raw-space colour correction) on a generated raw scene.

The scene (`synthetic.write_raw_scene(test_scene=True)`) is RawNeRF's test-scene layout: Bayer DNGs with
exiftool JSON at four shutter speeds in raw/train, and an HDR+ merged test frame. Its JSON files then get
slightly wrong shutter speeds (1/40 s written for a true 1/50 s, and so on), as real shutters are imprecise:
the relative exposures the loader reads are off by 20-25 %, and `Model.learned_exposure_scaling` must learn
them back. Only the model size, batch, steps and learning rate are shrunk; RawNeRF's own settings (raw loss,
Bayer mask, exp colour activation, learned exposure scaling, single MLP, density noise) stay as configured.

Checked: the test PSNR of the postprocessed (sRGB) render beats the best constant image by a margin and a bar,
the written PNGs are the postprocessed renders the metrics were computed on, the learned exposures match the
true ratios within 10 %, and render writes postprocessed frames (the test view exactly as eval, a path
auto-exposed per frame) and the videos.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from mipnerf360 import checkpoints, configs, datasets, synthetic, utils
from test_cli import TINY_GIN, _check_ok, _cli, _psnr

pytest.importorskip('pidng', reason='writing DNGs needs the optional pidng package (pip install .[raw])')
pytest.importorskip('rawpy', reason='reading DNGs needs the optional rawpy package (pip install .[raw])')

STEPS = 400
CROP = 2  # Config.eval_crop_borders (llff_raw_test.gin's 16 would leave little of a 64 x 48 image).
# Written shutter speeds for the true ones: the exposures the loader reads are wrong by these factors.
SHUTTER_LIES = {'1/50': '1/40', '1/100': '1/125', '1/200': '1/160'}

# test_cli's tiny model on llff_raw_test.gin (whose basis is already the octahedron), full resolution.
RAW_TINY_GIN = TINY_GIN.replace("include 'configs/360.gin'", "include 'configs/llff_raw_test.gin'").format(
        steps=STEPS) + f"""
Config.factor = 0
Config.eval_crop_borders = {CROP}
Config.batch_size = 512
Config.lr_init = 0.005
Config.lr_final = 0.0005
Config.checkpoint_every = 1000
"""


def _write_scene(d):
    gt = synthetic.write_raw_scene(d, n_views=13, width=64, height=48, test_scene=True)
    for path in glob.glob(os.path.join(d, 'raw', 'train', '*.json')):
        with open(path) as f:
            exif = json.load(f)
        exif[0]['ShutterSpeed'] = SHUTTER_LIES.get(exif[0]['ShutterSpeed'], exif[0]['ShutterSpeed'])
        with open(path, 'w') as f:
            json.dump(exif, f)
    return gt


@pytest.fixture(scope='module')
def raw_run(tmp_path_factory):
    """One trained checkpoint, evaluated and rendered (the test view, and a 3-frame auto-exposed path)."""
    root = tmp_path_factory.mktemp('rawnerf')
    scene, ckpt, gin_file = root / 'scene', root / 'exp' / 'ckpt', root / 'raw_tiny.gin'
    gt = _write_scene(str(scene))
    gin_file.write_text(RAW_TINY_GIN)
    args = str(gin_file), str(scene), str(ckpt)
    _check_ok(_cli('train', *args))
    _check_ok(_cli('eval', *args))
    _check_ok(_cli('render', *args, 'Config.render_path = False'))
    _check_ok(_cli('render', *args, 'Config.render_path = True', 'Config.render_path_frames = 3',
                   'Config.autoexpose_renders = True'))
    return root, ckpt, gt


def _test_scene(scene_dir, split='test'):
    config = configs.Config(data_dir=str(scene_dir), dataset_loader='llff', forward_facing=True, factor=0,
                            rawnerf_mode=True, batch_size=64)
    return datasets.load_scene(config, utils.DataSplit(split))


def _quantised(x):
    return np.round(np.clip(x, 0, 1) * 255) / 255


def _crop(x):
    return x[CROP:-CROP, CROP:-CROP]


def test_postprocessed_test_psnr_beats_the_best_constant(raw_run):
    root, ckpt, _ = raw_run
    scene = _test_scene(root / 'scene')
    postprocess = scene.metadata['postprocess_fn']
    gt_raw = np.asarray(scene.images[0], np.float64)
    gt_srgb = _crop(postprocess(gt_raw))
    constant = np.broadcast_to(gt_raw.reshape(-1, 3).mean(0), gt_raw.shape)  # An oracle: the test image's mean.
    baseline = _psnr(_crop(_quantised(postprocess(constant))), gt_srgb)

    with open(ckpt / 'test_preds' / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['step'] == STEPS and metrics['num_images'] == 1
    print(f"RawNeRF test PSNR {metrics['psnr']:.2f} dB (affine cc {metrics['cc_psnr']:.2f} dB), best constant "
          f'{baseline:.2f} dB')
    assert metrics['psnr'] > baseline + 5., (metrics['psnr'], baseline)
    assert metrics['psnr'] > 18.5
    assert metrics['cc_psnr'] > baseline + 3.

    # The written images are the postprocessed (sRGB) renders the metrics were computed on.
    for name, key in (('color', 'psnr'), ('color_cc', 'cc_psnr')):
        png = utils.load_img(str(ckpt / 'test_preds' / f'{name}_000.png'))[..., :3] / 255.
        assert abs(_psnr(_crop(png), gt_srgb) - metrics[key]) < 1e-3, name


def test_learned_exposure_scaling_recovers_the_true_exposures(raw_run):
    root, ckpt, gt = raw_run
    train = _test_scene(root / 'scene', 'train')
    read = train.metadata['exposure_values']  # From the (wrong) shutter speeds in the JSON files.
    true = gt.exposure_values[1:]  # raw/train holds views 1.. .
    assert np.max(np.abs(read / true - 1)) > 0.2  # Without the learned scaling they are 20-25 % off.
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(str(ckpt)))
    offsets = state['model']['exposure_scaling_offsets.weight'].numpy().astype(np.float64)
    idx = train.metadata['exposure_idx']
    scaling = 1 + (idx > 0)[:, None] * offsets[idx]  # [N, 3]: image 0's exposure is the fixed reference.
    learned = read[:, None] * scaling
    ratio = learned / true[:, None]
    print('learned / true exposure per training view and channel:', np.round(ratio, 3).tolist())
    assert np.all(np.abs(ratio - 1) < 0.1), ratio


def test_render_writes_postprocessed_frames_and_videos(raw_run):
    import imageio_ffmpeg
    _, ckpt, _ = raw_run
    # The test view, rendered by render, is bit-identical to eval's postprocessed image.
    frame = utils.load_img(str(ckpt / 'render' / f'test_preds_step_{STEPS}' / 'color_000.png'))
    assert np.array_equal(frame, utils.load_img(str(ckpt / 'test_preds' / 'color_000.png')))

    path_dir = ckpt / 'render' / f'path_renders_step_{STEPS}'
    assert len(glob.glob(str(path_dir / 'color_*.png'))) == 3
    with open(path_dir / 'render_manifest.json') as f:
        assert json.load(f)['autoexpose_renders'] is True
    for i in range(3):
        # Auto-exposed: each frame's 97th percentile (over pixels and channels) is mapped to white.
        img = utils.load_img(str(path_dir / f'color_{i:03d}.png'))[..., :3]
        white = float(np.mean(img >= 254))
        assert 0.01 < white < 0.08, (i, white)
        assert np.median(img) > 20, i  # Not a black frame: the exposure follows the content.
    for kind in ('color', 'acc', 'distance_mean', 'distance_median'):
        video = ckpt / 'render' / f'ckpt_exp_path_renders_step_{STEPS}_{kind}.mp4'
        reader = imageio_ffmpeg.read_frames(str(video))
        meta = next(reader)
        assert meta['codec'] == 'h264' and sum(1 for _ in reader) == 3, kind


def test_spline_path_interpolates_the_raw_exposures(tmp_path):
    """`render_spline_interpolate_exposure` on a raw scene: the path's exposures come from the keyframes'
    shutters (relative to the longest), pass through each keyframe's value, move monotonically between them, and
    are what the path's rays carry (so render scales the raw colour by them)."""
    import torch
    denominators = (25, 35, 50, 70, 100, 140)  # Views 0..5, darker and darker by about sqrt(2).
    gt = synthetic.write_raw_scene(str(tmp_path / 'scene'), n_views=6, width=24, height=22,
                                   shutter_denominators=denominators)
    keys = tmp_path / 'keyframes.txt'
    keys.write_text('\n'.join(sorted(os.listdir(tmp_path / 'scene' / 'images'))) + '\n')
    n_interp = 4
    config = configs.Config(data_dir=str(tmp_path / 'scene'), dataset_loader='llff', forward_facing=False,
                            factor=0, rawnerf_mode=True, render_path=True, render_spline_keyframes=str(keys),
                            render_spline_n_interp=n_interp, render_spline_interpolate_exposure=True)
    scene = datasets.load_scene(config, utils.DataSplit.TEST)
    path = scene.render_exposures
    np.testing.assert_array_equal(scene.spline_indices, np.arange(6))
    assert path.shape == (n_interp * 5,) and scene.size == n_interp * 5
    # Six keyframes and a degree-5 spline: the spline interpolates them, frame k * n_interp is keyframe k.
    np.testing.assert_allclose(path[::n_interp], gt.exposure_values[:5], rtol=1e-6)
    assert np.all(np.diff(path) < 0), path
    assert path.min() > gt.exposure_values[-1] and path.max() <= gt.exposure_values[0] * (1 + 1e-9)

    sampler = datasets.RaySampler(scene, config, torch.device('cpu'))
    for idx in (0, 3, n_interp * 5 - 1):
        rays = sampler.generate_ray_batch(idx).rays
        values = rays.exposure_values.numpy()
        assert values.shape == (22, 24, 1)
        np.testing.assert_allclose(values, path[idx], rtol=1e-6)
        assert np.all(rays.exposure_idx.numpy() == 0)  # The path's learned scaling is the reference's (1).


def test_spline_exposures_of_a_raw_test_scene_are_a_config_error(tmp_path):
    """A raw test scene's metadata covers only its split (the merged test frame, or raw/train), not the posed
    keyframes: interpolating exposures there is refused with the fix."""
    synthetic.write_raw_scene(str(tmp_path / 'scene'), n_views=7, width=24, height=22, test_scene=True)
    keys = tmp_path / 'keyframes.txt'
    keys.write_text('\n'.join(sorted(os.listdir(tmp_path / 'scene' / 'images'))) + '\n')
    config = configs.Config(data_dir=str(tmp_path / 'scene'), dataset_loader='llff', forward_facing=False,
                            factor=0, rawnerf_mode=True, render_path=True, render_spline_keyframes=str(keys),
                            render_spline_interpolate_exposure=True)
    with pytest.raises(configs.ConfigError, match='render_spline_interpolate_exposure = True needs per-image '
                       'exposures .* not a test scene.*set it to False'):
        datasets.load_scene(config, utils.DataSplit.TEST)
