"""scripts/local_colmap_and_resize.sh with the real `colmap` binary (Debian's 3.8; `.ci/run` installs it), then
training on its poses.

A textured 360 scene is ray-traced by mipnerf360.synthetic (30 views, 240x180), its true model deleted, and the
images posed by the script (exhaustive matching, OPENCV camera, HARD=1: on these small synthetic images COLMAP
3.8's default mapper thresholds register only 17 of 30 views at 240x180, 25 of 30 at 320x240, and find no
initial pair for 20 views; HARD=1 registers 21 of 24 views at 240x180; below 90% the script would retry with
HARD=2 by itself). The model must register every view,
with camera centres equal to the truth up to a similarity; a tiny model trained on it (test_sfm_training.py's
helpers, on the images_4 the script wrote) must beat the mean-colour prediction on the held-out views.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mipnerf360 import colmap, synthetic
from test_sfm_training import _similarity_align, heldout_psnrs, photos_only, train_tiny

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which('colmap') is None,
                                 reason='the colmap binary is not on PATH (apt-get install colmap; .ci/run does)')]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VIEWS, WIDTH, HEIGHT = 30, 240, 180
TRAIN_STEPS = 300


@pytest.fixture(scope='module')
def binary_scene(tmp_path_factory):
    scene = str(tmp_path_factory.mktemp('binary_scene'))
    t0 = time.time()
    info = photos_only(scene, N_VIEWS, WIDTH, HEIGHT)
    t1 = time.time()
    env = dict(os.environ, HARD='1', NUM_THREADS='1', USE_GPU='0', PYTHON=sys.executable, PYTHONPATH=REPO)
    proc = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'local_colmap_and_resize.sh'), scene],
                          env=env, capture_output=True, text=True, timeout=300)
    print(f'scene rendering {t1 - t0:.1f} s, COLMAP script {time.time() - t1:.1f} s')
    assert proc.returncode == 0, f'stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}'
    return scene, info, proc


def test_binary_registers_every_view_at_the_true_poses(binary_scene):
    scene, info, proc = binary_scene
    assert f'Registered {N_VIEWS} / {N_VIEWS} images (HARD=1)' in proc.stdout
    assert 'retrying' not in proc.stdout  # All registered at once: no automatic HARD=2 run (minutes on a CPU).
    assert not os.path.exists(os.path.join(scene, 'sparse', '1'))
    mgr = colmap.NeRFSceneManager(os.path.join(scene, 'sparse', '0'))
    names, poses, pixtocams, dist, _ = mgr.process()
    assert sorted(names) == info.names and set(mgr.camera_models) == {'OPENCV'}
    assert len(set(mgr.camera_ids)) == 1  # One shared camera.
    gt = np.stack([info.camtoworlds[info.names.index(n)] for n in names])
    s, rot, t = _similarity_align(poses[:, :3, 3], gt[:, :3, 3])
    err = np.linalg.norm(s * poses[:, :3, 3] @ rot.T + t - gt[:, :3, 3], axis=-1)
    # COLMAP 3.8's mapper is not deterministic, even on one thread. Over 12 runs of this capture (2026-12-01) all
    # 30 views registered every time; the worst view's centre error was 0.043-0.066 (1.4-2.2% of the ring radius
    # 3.0), the median 0.018-0.045, the largest rotation-matrix entry error 0.015-0.063 and the focal length within
    # 1.3%. The bounds leave about 2x that; a wrong pose convention (c2w vs w2c, axis flips) misplaces cameras by
    # a good fraction of the radius.
    assert err.max() < 0.05 * 3.0, err.max()
    assert np.median(err) < 0.03 * 3.0, np.median(err)
    np.testing.assert_allclose(rot @ poses[:, :3, :3], gt[:, :3, :3], atol=0.12)
    # The focal length COLMAP refined is the true one (0.9 * width) to 3%.
    np.testing.assert_allclose(1 / pixtocams[0, 0, 0], 0.9 * WIDTH, rtol=0.03)
    for f in (2, 4, 8):
        assert Image.open(os.path.join(scene, f'images_{f}', names[0])).size == \
            synthetic.downsampled_size(WIDTH, HEIGHT, f)


def test_training_on_binary_poses_beats_constant_colour(binary_scene):
    scene, _, _ = binary_scene
    result = heldout_psnrs(train_tiny(scene, steps=TRAIN_STEPS))
    psnr, baseline = float(np.mean(result['psnrs'])), float(np.mean(result['baselines']))
    # Calibration (loaded 2-core machine): 21.3 dB against 17.1 dB; per view 3.4-4.8 dB above.
    assert psnr > baseline + 3.0 and psnr > 20.0, (psnr, baseline)
    assert all(p > b + 2.5 for p, b in zip(result['psnrs'], result['baselines'])), result
