"""Ref-NeRF end to end: `train / eval / render --gin_configs=configs/blender_refnerf.gin` on the generated
shiny-Blender scene (a mirror sphere, a glossy sphere and a glossy pedestal; `synthetic.write_shiny_blender_scene`).

The bindings only shrink the run (MLP sizes, samples, batch, steps, image size); every Ref-NeRF setting of the
config (reflections, IDE, predicted normals and roughness, orientation and predicted-normal losses, normal
metrics) stays as it is. Checked:
- training logs the orientation and predicted-normal losses (log line and tensorboard) and drives the
  orientation loss down;
- eval writes the reference's normal metrics (`normals_mae`, `normals_pred_mae`: the angle in degrees between the
  rendered and the ground-truth normals, weighted by acc * alpha), which agree with a recomputation from the
  written files, and the predicted normals on the glossy sphere are within a bar of the true ones;
- the test PSNR is at least that of a plain mip-NeRF (configs/blender_256.gin, same sizes, seed and steps);
- render writes normals, predicted normals and roughness frames and a video of each kind;
- the model's diffuse, specular and tint outputs: per sample the colour is clip(linear_to_srgb(specular + diffuse)),
  padded, with 0 <= specular <= tint; their maps are composited with the weights (like the normals) and written
  by eval and render (frames and videos).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mipnerf360 import image, synthetic, utils
from mipnerf360.cli import eval as eval_cli, render as render_cli, train as train_cli
from test_cli import _flags, _in_process

STEPS = 300
SIZE = 32
SEED = 0
NUM_TEST = 4
RENDER_FRAMES = 3

# The run's size, shared by every end-to-end test model (the method settings come from the config files).
RUN_BINDINGS = (
    'Config.batch_size = 256',
    'Config.render_chunk_size = 4096',
    f'Config.max_steps = {STEPS}',
    'Config.lr_init = 0.01',
    'Config.lr_final = 0.001',
    'Config.lr_delay_steps = 20',
    'Config.checkpoint_every = 1000',
    'Config.print_every = 50',
    'Config.train_render_every = 0',
    f'Config.seed = {SEED}',
    'Model.num_prop_samples = 16',
    'Model.num_nerf_samples = 16',
    'NerfMLP.net_depth = 2',
    'NerfMLP.net_width = 64',
    'NerfMLP.bottleneck_width = 32',
    'NerfMLP.skip_layer = 4',
)
PROP_MLP_BINDINGS = ('PropMLP.net_depth = 1', 'PropMLP.net_width = 32')
REFNERF_BINDINGS = RUN_BINDINGS + ('NerfMLP.net_depth_viewdirs = 2',)
PLAIN_BINDINGS = RUN_BINDINGS + PROP_MLP_BINDINGS
# Every test image's outputs are written (the config writes every 5th), for the recomputations below.
EVAL_BINDINGS = ('Config.eval_render_interval = 1',)


def train_and_eval(gin_file: str, scene: str, ckpt: str, bindings, eval_bindings=()) -> dict:
    """`train` then `eval` (in this process, through the commands' entry points); returns metrics.json."""
    assert _in_process(train_cli, _flags(gin_file, scene, ckpt, *bindings)) == 0
    assert _in_process(eval_cli, _flags(gin_file, scene, ckpt, *bindings, *eval_bindings)) == 0
    with open(os.path.join(ckpt, 'test_preds', 'metrics.json')) as f:
        return json.load(f)


def tensorboard_scalars(log_dir: str) -> dict:
    """{tag: [values in step order]} of the scalars in `log_dir`'s event files."""
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


@pytest.fixture(scope='module')
def scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('shiny') / 'scene')
    info = synthetic.write_shiny_blender_scene(d, n_train=16, n_val=1, n_test=NUM_TEST, width=SIZE, height=SIZE)
    return d, info


@pytest.fixture(scope='module')
def refnerf(scene, tmp_path_factory):
    """Ref-NeRF trained, evaluated and rendered once; returns (ckpt_dir, metrics)."""
    ckpt = str(tmp_path_factory.mktemp('refnerf') / 'exp' / 'ckpt')
    metrics = train_and_eval('configs/blender_refnerf.gin', scene[0], ckpt, REFNERF_BINDINGS, EVAL_BINDINGS)
    assert _in_process(render_cli, _flags('configs/blender_refnerf.gin', scene[0], ckpt, *REFNERF_BINDINGS,
                                          'Config.render_path = True',
                                          f'Config.render_path_frames = {RENDER_FRAMES}')) == 0
    return ckpt, metrics


@pytest.fixture(scope='module')
def plain(scene, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp('plain') / 'ckpt')
    return train_and_eval('configs/blender_256.gin', scene[0], ckpt, PLAIN_BINDINGS)


def test_training_logs_and_minimises_the_normal_losses(refnerf):
    ckpt, _ = refnerf
    with open(os.path.join(ckpt, 'train_log.txt')) as f:
        lines = [ln for ln in f if ln.lstrip().split('/')[0].isdigit()]
    assert lines and all('orie=' in ln and 'pred=' in ln for ln in lines)  # losses/orientation, /predicted_normals
    scalars = tensorboard_scalars(ckpt)
    orientation = scalars['train_avg_losses/orientation']
    predicted = scalars['train_avg_losses/predicted_normals']
    assert len(orientation) == len(predicted) == len(lines)
    assert np.all(np.isfinite(orientation)) and np.all(np.isfinite(predicted)) and min(predicted) > 0
    # Normals facing away from the camera are penalised, and training turns them around.
    assert orientation[-1] < 0.05 * orientation[0], orientation


def _decode_normals(path: str) -> np.ndarray:
    """A normal map PNG as unit vectors (the loaders' decoding, rgb * 2 / 255 - 1, then normalised)."""
    n = utils.load_img(path)[..., :3] * 2. / 255. - 1.
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def _angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1., 1.)))


def _test_view_hits(scene_dir: str, i: int):
    """Test view i's pixel-centre rays: which shiny object each hits first ([H, W]; 1 is the glossy sphere, -1
    none) and the unit ray directions [H, W, 3]."""
    with open(os.path.join(scene_dir, 'transforms_test.json')) as f:
        meta = json.load(f)
    focal = .5 * SIZE / np.tan(.5 * meta['camera_angle_x'])
    pixtocam = np.linalg.inv(synthetic.intrinsics(focal, SIZE, SIZE))
    c2w = np.array(meta['frames'][i]['transform_matrix'])[:3]
    origins, directions = synthetic.subpixel_rays(c2w, pixtocam, SIZE, SIZE, 1)
    _, kind, _ = synthetic._shiny_hits(origins, directions)  # pylint: disable=protected-access
    directions = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    return kind.reshape(SIZE, SIZE), directions.reshape(SIZE, SIZE, 3)


def test_eval_normal_metrics_follow_the_reference(scene, refnerf):
    """normals_mae / normals_pred_mae: degrees between rendered and true normals weighted by acc * alpha (the
    reference's compute_normal_metrics), recomputed here from the written PNG / TIFF files."""
    scene_dir, _ = scene
    ckpt, metrics = refnerf
    preds = os.path.join(ckpt, 'test_preds')
    for key in ('normals', 'normals_pred'):
        per_image = [float(v) for v in open(os.path.join(preds, f'metric_{key}_mae_{STEPS}.txt')).read().split()]
        assert len(per_image) == NUM_TEST and np.isclose(np.mean(per_image), metrics[f'{key}_mae'])
        for i in range(NUM_TEST):
            gt = _decode_normals(os.path.join(scene_dir, 'test', f'r_{i}_normal.png'))
            alpha = utils.load_img(os.path.join(scene_dir, 'test', f'r_{i}.png'))[..., 3] / 255.
            weights = utils.load_img(os.path.join(preds, f'acc_{i:03d}.tiff')) * alpha
            err = _angles_deg(_decode_normals(os.path.join(preds, f'{key}_{i:03d}.png')), gt)
            # The rendered normals went through 8 bits here: up to ~0.5 degrees.
            assert abs(np.sum(weights * err) / np.sum(weights) - per_image[i]) < 1.0, (key, i)
    # Seeds 0, 1, 2: normals 41.4 / 42.1 / 42.3, predicted normals 47.9 / 40.7 / 38.4 degrees.
    assert metrics['normals_mae'] < 50 and metrics['normals_pred_mae'] < 55, metrics


def test_normals_on_the_glossy_sphere(scene, refnerf):
    """On the glossy sphere the rendered (density-gradient) normals beat those of a disc facing the camera
    (-viewdir: 45 degrees from a sphere's on average). The predicted normals, learned in so short a run only
    through the predicted-normal loss (x 3e-4) and the reflections, only have to face the camera (the orientation
    loss): within 75 degrees. Seeds 0, 1, 2 gave 36.8 / 42.3 / 35.2 and 61.0 / 63.2 / 59.5 degrees."""
    scene_dir, info = scene
    ckpt, _ = refnerf
    errors = {'normals': [], 'normals_pred': [], 'facing': []}
    for i in range(NUM_TEST):
        kind, viewdirs = _test_view_hits(scene_dir, i)
        glossy = kind == 1
        for key in ('normals', 'normals_pred'):
            pred = _decode_normals(os.path.join(ckpt, 'test_preds', f'{key}_{i:03d}.png'))
            errors[key].append(_angles_deg(pred, info.normals[i])[glossy])
        errors['facing'].append(_angles_deg(-viewdirs, info.normals[i])[glossy])
    mae = {k: float(np.mean(np.concatenate(v))) for k, v in errors.items()}
    print('normal MAE on the glossy sphere (degrees):', {k: round(v, 1) for k, v in mae.items()})
    assert 40 < mae['facing'] < 50
    assert mae['normals'] < mae['facing'], mae
    assert mae['normals_pred'] < 75, mae


def test_refnerf_psnr_at_least_plain_mipnerf(refnerf, plain):
    _, metrics = refnerf
    print(f"test PSNR: Ref-NeRF {metrics['psnr']:.2f} dB, mip-NeRF {plain['psnr']:.2f} dB")
    # Seeds 0, 1, 2: 22.96 / 22.84 / 23.08 dB against 21.38 / 22.51 / 22.55 dB.
    assert metrics['psnr'] >= plain['psnr'], (metrics['psnr'], plain['psnr'])
    assert 'normals_mae' not in plain  # blender_256 computes no normals.


def test_render_writes_refnerf_frames_and_videos(refnerf):
    import imageio_ffmpeg
    ckpt, _ = refnerf
    frames_dir = os.path.join(ckpt, 'render', f'path_renders_step_{STEPS}')
    for k in range(RENDER_FRAMES):
        acc = utils.load_img(os.path.join(frames_dir, f'acc_{k:03d}.tiff'))
        roughness = utils.load_img(os.path.join(frames_dir, f'roughness_{k:03d}.tiff'))
        assert roughness.shape == acc.shape and np.all(np.isfinite(roughness))
        # Weights times softplus roughness, summed along the ray: non-negative, positive on the objects.
        assert np.all(roughness >= 0) and np.all(roughness[acc > 0.5] > 0)
        for key in ('normals', 'normals_pred'):
            n = utils.load_img(os.path.join(frames_dir, f'{key}_{k:03d}.png'))[..., :3] * 2. / 255. - 1.
            # Weights times unit normals, summed along the ray: no longer than acc (up to the 8 bits).
            length = np.linalg.norm(n, axis=-1)
            assert np.all(length <= acc + 0.01), key
            assert (acc > 0.95).mean() > 0.1 and np.mean(length[acc > 0.95]) > 0.3, key
        for key in ('diffuse', 'specular', 'tint'):
            img = utils.load_img(os.path.join(frames_dir, f'{key}_{k:03d}.png'))
            assert img.shape == (SIZE, SIZE, 3) and img[acc > 0.95].mean() > 5, key  # Not black on the objects.
            # Weights times values in [0, 1], summed, no background: at most acc (diffuse / specular tone-mapped).
            bound = acc if key == 'tint' else image.linear_to_srgb(np.clip(acc, 0., 1.))
            assert np.all(img / 255. <= bound[..., None] + 1 / 255.), key
    for kind in ('color', 'normals', 'normals_pred', 'roughness', 'acc', 'distance_mean', 'distance_median',
                 'diffuse', 'specular', 'tint'):
        video = os.path.join(ckpt, 'render', f'ckpt_exp_path_renders_step_{STEPS}_{kind}.mp4')
        reader = imageio_ffmpeg.read_frames(video)
        meta = reader.__next__()
        frames = [np.frombuffer(fr, np.uint8).reshape(meta['size'][1], meta['size'][0], 3) for fr in reader]
        assert len(frames) == RENDER_FRAMES, kind
        if kind == 'normals_pred':
            first = utils.load_img(os.path.join(frames_dir, 'normals_pred_000.png'))[..., :3].astype(np.float64)
        elif kind == 'roughness':
            first = np.tanh(utils.load_img(os.path.join(frames_dir, 'roughness_000.tiff')))[..., None] * 255.
        elif kind in ('diffuse', 'specular', 'tint'):
            first = utils.load_img(os.path.join(frames_dir, f'{kind}_000.png'))[..., :3].astype(np.float64)
        else:
            continue
        assert np.abs(frames[0][:SIZE, :SIZE] - first).mean() < 6., kind


def test_diffuse_specular_and_tint_make_the_colour(scene, refnerf):
    """The trained model on test image 0: per sample, rgb = clip(linear_to_srgb(specular + diffuse), 0, 1) padded
    (the model's own combination) and specular = tint * (a colour in [0, 1]); the rendered maps are the samples
    composited with the weights (no background), as eval wrote them (diffuse and specular tone-mapped)."""
    import gin
    import torch
    from mipnerf360 import configs, models
    from mipnerf360.cli import common
    ckpt, _ = refnerf
    gin.clear_config()
    try:
        config = configs.load_config(
                save_config=False, gin_configs=['configs/blender_refnerf.gin'],
                gin_bindings=[f"Config.data_dir = '{scene[0]}'", f"Config.checkpoint_dir = '{ckpt}'",
                              *REFNERF_BINDINGS])
        device = torch.device('cpu')
        model = common.build_model(config, device)
        assert common.restore_model(model, config, device) == STEPS
        sampler = common.load_dataset('test', config, device)
        rays = sampler.generate_ray_batch(0).rays
        flat = utils.tree_map(lambda r: r.reshape((SIZE * SIZE, -1)), rays)
        with common.no_grad_eval(model):
            renderings, history = model(None, flat, train_frac=1., compute_extras=True)
            image_maps = models.render_image(lambda rng, r: model(rng, r, train_frac=1., compute_extras=True),
                                             rays, None, config, verbose=False)
    finally:
        gin.clear_config()
    samples, rendering = history[-1], renderings[-1]
    padding = model.nerf_mlp.rgb_padding
    combined = torch.clamp(image.linear_to_srgb(samples['specular'] + samples['diffuse']), 0., 1.)
    torch.testing.assert_close(samples['rgb'], combined * (1 + 2 * padding) - padding, rtol=0, atol=1e-6)
    assert torch.all(samples['specular'] >= 0) and torch.all(samples['specular'] <= samples['tint'] + 1e-7)
    assert torch.all((samples['tint'] > 0) & (samples['tint'] < 1))
    weights = samples['weights'][..., None]
    bg = model._background(None)  # pylint: disable=protected-access
    torch.testing.assert_close(rendering['rgb'], (weights * samples['rgb']).sum(-2) + (1 - weights.sum(-2)) * bg,
                               rtol=0, atol=1e-5)
    preds = os.path.join(ckpt, 'test_preds')
    for key in ('diffuse', 'specular', 'tint'):
        composited = (weights * samples[key]).sum(-2)
        torch.testing.assert_close(rendering[key], composited, rtol=0, atol=1e-6)
        assert image_maps[key].shape == (SIZE, SIZE, 3)
        torch.testing.assert_close(image_maps[key].reshape(-1, 3), composited, rtol=0, atol=1e-5)
        expected = composited.reshape(SIZE, SIZE, 3).numpy().astype(np.float64)
        if key != 'tint':
            expected = image.linear_to_srgb(np.clip(expected, 0., 1.))
        written = utils.load_img(os.path.join(preds, f'{key}_000.png'))[..., :3] / 255.
        assert np.max(np.abs(written - expected)) < 0.6 / 255 + 1e-4, key  # 8 bits, rounded.
    # Sum of the parts and colour agree on opaque pixels only roughly: the tone curve is not linear.
    acc = rendering['acc'] > 0.99
    srgb_of_parts = image.linear_to_srgb(torch.clamp(rendering['diffuse'] + rendering['specular'], 0., 1.))
    gap = float((srgb_of_parts - rendering['rgb'])[acc].abs().mean())
    print('opaque pixels, |srgb(diffuse + specular) - rgb| mean:', gap)
    assert gap < 0.1  # Seed 0: 0.029.
