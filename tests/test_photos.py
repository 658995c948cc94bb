"""`python -m mipnerf360.photos DIR`: photos -> poses -> train -> eval -> render, end to end.

Only the images of a ray-traced 30-view 320x240 scene are kept (as a user's photos); the command poses them with
pycolmap (`--sfm pycolmap`, so the test does not depend on a colmap binary being installed), trains the cpu
preset shrunk to tests/test_sfm_training.py's tiny model for 300 steps on images_4, evaluates and renders a
3-frame video. Checked: the checkpoint, metrics and video exist and are printed, the held-out PSNR beats the
mean-colour prediction, the SfM report is there, a second call keeps the poses, and user errors are one line.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mipnerf360 import checkpoints, photos, utils
from test_sfm_training import TINY_BINDINGS, _psnr, photos_only

pytestmark = pytest.mark.slow

STEPS = 300


@pytest.fixture(scope='module')
def journey(tmp_path_factory):
    scene = str(tmp_path_factory.mktemp('photos'))
    photos_only(scene, 30, 320, 240)
    bindings = TINY_BINDINGS + ['Config.render_path_frames = 3', 'Config.checkpoint_every = 1000',
                                'Config.print_every = 100']
    argv = [scene, '--preset', 'cpu', '--steps', str(STEPS), '--factor', '4', '--sfm', 'pycolmap']
    for b in bindings:
        argv += ['--gin_bindings', b]
    code = photos.main(argv)
    return scene, code


def test_photos_to_checkpoint_metrics_and_video(journey, capfd):
    scene, code = journey
    assert code == 0
    ckpt = os.path.join(scene, 'nerf_cpu')
    assert checkpoints.step_of(checkpoints.latest_checkpoint(ckpt)) == STEPS
    with open(os.path.join(scene, 'sparse', 'colmap_report.json')) as f:
        report = json.load(f)
    assert report['registered'] == report['total'] == 30 and report['mean_reprojection_error_px'] < 1.
    with open(os.path.join(ckpt, 'test_preds', 'metrics.json')) as f:
        metrics = json.load(f)
    # Held-out photos are every 8th (llffhold 8); the baseline predicts the training photos' mean colour.
    names = sorted(os.listdir(os.path.join(scene, 'images_4')))
    images = [utils.load_img(os.path.join(scene, 'images_4', n))[..., :3] / 255. for n in names]
    mean_rgb = np.mean([im.reshape(-1, 3).mean(0) for i, im in enumerate(images) if i % 8], axis=0)
    baseline = float(np.mean([_psnr(im, np.broadcast_to(mean_rgb, im.shape))
                              for i, im in enumerate(images) if i % 8 == 0]))
    print(f"held-out PSNR {metrics['psnr']:.2f} dB vs mean-colour baseline {baseline:.2f} dB")
    assert metrics['num_images'] == 4 and metrics['step'] == STEPS
    assert metrics['psnr'] > baseline + 2.5, (metrics['psnr'], baseline)
    videos = [v for v in os.listdir(os.path.join(ckpt, 'render')) if v.endswith('_color.mp4')]
    assert len(videos) == 1 and os.path.getsize(os.path.join(ckpt, 'render', videos[0])) > 1000


def test_second_run_keeps_the_poses(journey, capsys):
    scene, _ = journey
    before = os.path.getmtime(os.path.join(scene, 'sparse', '0', 'images.bin'))
    assert photos.pose(scene) == 'existing'
    assert os.path.getmtime(os.path.join(scene, 'sparse', '0', 'images.bin')) == before
    assert 'keeping the existing model' in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert photos.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: No photos in {tmp_path / "images"}: put your .jpg/.png photos in DIR/images and run '
                   'again.']
    os.makedirs(tmp_path / 'images')
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'images' / 'a.png')
    assert photos.main([str(tmp_path), '--sfm', 'pycolmap']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: Found 1 images') and 'at least 2' in err[0]


@pytest.mark.parametrize('width,preset,factor', [(320, 'cpu', 2), (1000, 'cpu', 4), (1600, 'cpu', 4),
                                                 (1601, 'cpu', 8), (9000, 'cpu', 8), (320, 'gpu', 4)])
def test_choose_factor(tmp_path, width, preset, factor):
    os.makedirs(tmp_path / 'images')
    Image.fromarray(np.zeros((width * 3 // 4, width, 3), np.uint8)).save(tmp_path / 'images' / 'a.png')
    assert photos.choose_factor(str(tmp_path), photos.PRESETS[preset]['max_side']) == factor


def test_gin_flags_are_the_standard_commands_flags():
    flags = photos.gin_flags('gpu', '/d', '/c', 4, 100, ['Model.x = 1'])
    assert flags == ['--gin_configs=configs/360.gin', "--gin_bindings=Config.data_dir = '/d'",
                     "--gin_bindings=Config.checkpoint_dir = '/c'", '--gin_bindings=Config.factor = 4',
                     '--gin_bindings=Config.max_steps = 100', '--gin_bindings=Model.x = 1']
    assert photos.gin_flags('cpu', '/d', '/c', 2, None)[0] == '--gin_configs=configs/demo.gin'


@pytest.mark.parametrize('arg', ['--logtostderr', "--gin_bindings=Config.data_dir = '/my photos'",
                                 'a"b c', 'x $HOME', "it's"])
def test_printed_commands_can_be_pasted(arg):
    import shlex
    assert shlex.split(photos._shell_word(arg)) == [arg]
