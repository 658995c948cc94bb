"""RobustNeRF end to end: `python -m train / eval` with configs/360_robustnerf.gin (360.gin plus the RobustNeRF
loss on 16 x 16 patches) on a generated distractor scene, against the same run with the plain L2 loss.

The scene (`synthetic.write_distractor_scene`) shows a transient pink ball at a new place in every training
view; the test views are clean. Only the model size, batch, steps, learning rate and image size are shrunk
(full-resolution images, so that 16 x 16 patches fit); patch size, inlier quantile and the mask's filters stay
as configured. The two runs share the seed, the steps and the patches; only the loss differs.

Checked: the robust loss's test PSNR beats the plain loss's by a margin, and the plain loss visibly learns the
distractors (its renders of the clean test views are pinker than the truth, and than the robust loss's).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mipnerf360 import synthetic, utils
from test_cli import REPO, TINY_GIN, _check_ok, _env, _flags

STEPS = 300

# test_cli's tiny model on 360_robustnerf.gin, at full resolution so that the patches fit.
ROBUST_TINY_GIN = TINY_GIN.replace("include 'configs/360.gin'", "include 'configs/360_robustnerf.gin'").format(
        steps=STEPS) + """
Config.factor = 0
Config.batch_size = 512
Config.checkpoint_every = 1000
"""

PLAIN = ("Config.data_loss_type = 'mse'", 'Config.enable_robustnerf_loss = False')


def _run_side_by_side(cmd, gin_file, scene, runs):
    """`python -m <cmd>` for every (checkpoint dir, bindings) of `runs` at the same time (one core each)."""
    procs = [subprocess.Popen([sys.executable, '-m', cmd] + _flags(gin_file, scene, ckpt, *bindings), cwd=REPO,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for ckpt, bindings in runs]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        _check_ok(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))


@pytest.fixture(scope='module')
def robust_runs(tmp_path_factory):
    """Trains and evaluates the robust and the plain loss on the distractor scene; returns the ground truth and
    {name: (checkpoint dir, metrics.json)}."""
    root = tmp_path_factory.mktemp('robustnerf')
    scene, gin_file = root / 'scene', root / 'robust_tiny.gin'
    gt = synthetic.write_distractor_scene(str(scene), n_views=17, width=64, height=48, factors=(),
                                          distractor_views=1.0, ball_radius=0.3)
    gin_file.write_text(ROBUST_TINY_GIN)
    runs = {'robust': (root / 'robust' / 'ckpt', ()), 'plain': (root / 'plain' / 'ckpt', PLAIN)}
    for cmd in ('train', 'eval'):
        _run_side_by_side(cmd, str(gin_file), str(scene), list(runs.values()))
    out = {}
    for name, (ckpt, _) in runs.items():
        with open(ckpt / 'test_preds' / 'metrics.json') as f:
            out[name] = (ckpt, json.load(f))
    return gt, out


def _test_renders(gt, ckpt):
    """(renders, clean ground truth) of the test views (every 8th image), in [0, 1]."""
    test_idx = [i for i in range(len(gt.clean)) if i % 8 == 0]
    renders = [utils.load_img(str(ckpt / 'test_preds' / f'color_{k:03d}.png'))[..., :3] / 255.
               for k in range(len(test_idx))]
    return np.stack(renders), gt.clean[test_idx]


def _pinkness(img):
    """Mean projection of the colours on the distractor's chroma (its colour minus its grey level)."""
    chroma = synthetic.DISTRACTOR_COLOUR - synthetic.DISTRACTOR_COLOUR.mean()
    return float(np.mean((img - img.mean(-1, keepdims=True)) @ (chroma / np.linalg.norm(chroma))))


def test_robust_loss_beats_the_plain_loss_on_distractors(robust_runs):
    _, out = robust_runs
    robust, plain = out['robust'][1], out['plain'][1]
    assert robust['step'] == plain['step'] == STEPS
    print(f"test PSNR: robust {robust['psnr']:.2f} dB, plain {plain['psnr']:.2f} dB")
    assert robust['psnr'] > plain['psnr'] + 1.0, (robust['psnr'], plain['psnr'])
    assert robust['psnr'] > 16.5


def test_plain_loss_learns_the_distractors(robust_runs):
    """The test views are clean: the plain loss's renders of them are pinker than the truth (it learned the
    balls as floaters), the robust loss's much less so."""
    gt, out = robust_runs
    excess = {}
    for name in ('robust', 'plain'):
        renders, clean = _test_renders(gt, out[name][0])
        excess[name] = _pinkness(renders) - _pinkness(clean)
    print('excess pinkness of the test renders:', {k: round(v, 4) for k, v in excess.items()})
    assert excess['plain'] > 0.08, excess
    assert excess['plain'] > excess['robust'] + 0.03, excess
