"""The standard commands (`python -m train / eval / render`) end to end, as a user runs them.

Everything runs on a tiny generated 360 scene in the COLMAP layout (`images/`, `images_2/`, `sparse/0`) with a
test-only gin config that `include`s configs/360.gin and shrinks the model. Checked:
- train -> eval -> render through subprocesses with the standard flags: the test PSNR beats a constant
  mean-colour prediction by a margin, the reference's per-image metric files agree with PSNRs recomputed here
  from the written PNGs, and render writes one H.264 mp4 per kind with one frame per camera.
- `render_job_id / render_num_jobs` split the frames, a re-run renders nothing new, and the frames are the same.
- `eval_only_once = False` exits after evaluating the final step.
- A run stopped at step k (`early_exit_steps`) and resumed gives bit-identical parameters and Adam state.
- SIGTERM saves a checkpoint and exits 0; SIGKILL while a checkpoint is being written leaves the newest one whole.
- Bad inputs: exactly one `error: ...` line on stderr, exit status 2, nothing already written changed.
- train hands `dataset.camtype` to the train step (fisheye cameras with `cast_rays_in_train_step`).

stderr policy (see mipnerf360/cli/common.py): inputs are validated before the model, tensorboard or LPIPS are
touched, so for a user error the `error:` line is the only output on stderr; the tests assert that verbatim.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mipnerf360 import checkpoints, synthetic, utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 300

TINY_GIN = """
include 'configs/360.gin'
Config.factor = 2
Config.batch_size = 256
Config.render_chunk_size = 4096
Config.max_steps = {steps}
Config.lr_init = 0.01
Config.lr_final = 0.001
Config.lr_delay_steps = 20
Config.checkpoint_every = 100
Config.print_every = 50
Config.train_render_every = 0
Model.num_prop_samples = 16
Model.num_nerf_samples = 16
PropMLP.net_depth = 1
PropMLP.net_width = 32
PropMLP.basis_shape = 'octahedron'
PropMLP.basis_subdivisions = 1
NerfMLP.net_depth = 2
NerfMLP.net_width = 64
NerfMLP.skip_layer = 4
NerfMLP.bottleneck_width = 32
NerfMLP.basis_shape = 'octahedron'
NerfMLP.basis_subdivisions = 1
"""


def _env():
    env = dict(os.environ)
    env.pop('MIPNERF360_DEBUG', None)
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def _flags(gin_file, data_dir, ckpt_dir, *bindings):
    return ([f'--gin_configs={gin_file}', f"--gin_bindings=Config.data_dir = '{data_dir}'",
             f"--gin_bindings=Config.checkpoint_dir = '{ckpt_dir}'"]
            + [f'--gin_bindings={b}' for b in bindings] + ['--logtostderr'])


def _cli(cmd, gin_file, data_dir, ckpt_dir, *bindings, timeout=240):
    """Runs `python -m <cmd>` from the repository root with the standard flags; returns CompletedProcess."""
    return subprocess.run([sys.executable, '-m', cmd] + _flags(gin_file, data_dir, ckpt_dir, *bindings),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _check_ok(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr}'


def _psnr(a, b):
    return -10 * np.log10(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def _in_process(module, argv):
    """Runs a CLI main in this process (faster than a subprocess); returns the exit code."""
    try:
        module.run(['prog'] + argv)
    except SystemExit as e:
        return e.code or 0
    return 0


@pytest.fixture(scope='module')
def workdir(tiny_360_run):
    """The folder of the session's tiny run (conftest.tiny_360_run): scene/, tiny.gin, exp/ckpt."""
    return tiny_360_run.root


@pytest.fixture(scope='module')
def trained(tiny_360_run):
    """train (conftest.tiny_360_run) -> eval -> render with the standard commands; returns (ckpt_dir, outputs)."""
    ckpt, train = tiny_360_run.ckpt, tiny_360_run.train
    gin_file, scene = str(tiny_360_run.root / 'tiny.gin'), str(tiny_360_run.root / 'scene')
    t1 = time.time()
    ev = _cli('eval', gin_file, scene, str(ckpt))
    _check_ok(ev)
    t2 = time.time()
    render = _cli('render', gin_file, scene, str(ckpt), 'Config.render_path = True',
                  'Config.render_path_frames = 4')
    _check_ok(render)
    times = {'train': tiny_360_run.seconds, 'eval': t2 - t1, 'render': time.time() - t2}
    print('end-to-end times (s):', {k: round(v, 1) for k, v in times.items()})
    return ckpt, {'train': train, 'eval': ev, 'render': render}


def _scene_images(scene):
    names = sorted(os.listdir(os.path.join(scene, 'images_2')))
    return [utils.load_img(os.path.join(scene, 'images_2', n))[..., :3] / 255. for n in names]


def test_end_to_end_quality_and_outputs(workdir, trained):
    ckpt, out = trained
    assert 'Saved checkpoint' in out['train'].stdout
    assert checkpoints.step_of(checkpoints.latest_checkpoint(str(ckpt))) == TRAIN_STEPS
    with open(ckpt / 'config.gin') as f:
        assert 'NerfMLP.net_width = 64' in f.read()  # The operative config includes the model's bindings.

    # Held-out views are every 8th image (llffhold = 8); the baseline predicts the mean training colour.
    images = _scene_images(str(workdir / 'scene'))
    test_idx = [i for i in range(len(images)) if i % 8 == 0]
    train_idx = [i for i in range(len(images)) if i % 8 != 0]
    mean_rgb = np.mean([images[i].reshape(-1, 3).mean(0) for i in train_idx], axis=0)
    baseline = float(np.mean([_psnr(images[i], np.broadcast_to(mean_rgb, images[i].shape)) for i in test_idx]))

    preds = ckpt / 'test_preds'
    with open(preds / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['step'] == TRAIN_STEPS and metrics['num_images'] == len(test_idx)
    print(f"test PSNR {metrics['psnr']:.2f} dB vs mean-colour baseline {baseline:.2f} dB")
    assert metrics['psnr'] > baseline + 2.0, (metrics['psnr'], baseline)
    assert metrics['psnr'] > 19.5

    # The reference's metric files: one value per test image, agreeing with metrics.json and with the PSNR of
    # the written 8-bit renders (metrics are computed on the quantised images).
    per_image = [float(v) for v in (preds / f'metric_psnr_{TRAIN_STEPS}.txt').read_text().split()]
    assert len(per_image) == len(test_idx)
    assert np.allclose(per_image, metrics['per_image']['psnr'])
    assert np.isclose(np.mean(per_image), metrics['psnr'])
    for k, i in enumerate(test_idx):
        png = utils.load_img(str(preds / f'color_{k:03d}.png'))[..., :3] / 255.
        assert abs(_psnr(png, images[i]) - per_image[k]) < 1e-3
    assert len((preds / f'metric_ssim_{TRAIN_STEPS}.txt').read_text().split()) == len(test_idx)
    assert len((preds / f'render_times_{TRAIN_STEPS}.txt').read_text().split()) == len(test_idx)
    # Without the lpips package eval says so once (it used to print the harness' warning a second time).
    if 'lpips' not in metrics:
        assert (out['eval'].stdout + out['eval'].stderr).count('LPIPS unavailable') == 1


def test_eval_pngs_give_the_psnr_in_metrics_json(workdir, trained):
    """Each color_XXX.png eval wrote, read back, is the 8-bit image its metrics were computed on: its PSNR against
    the ground truth as eval holds it (uint8 / 255 in float32) is metrics.json's to 1e-9 dB (one pixel one level
    off would move it by ~3e-6 dB)."""
    from mipnerf360 import image
    ckpt, _ = trained
    with open(ckpt / 'test_preds' / 'metrics.json') as f:
        per_image = json.load(f)['per_image']['psnr']
    scene = workdir / 'scene' / 'images_2'
    names = sorted(os.listdir(scene))
    test_names = [n for i, n in enumerate(names) if i % 8 == 0]
    assert len(test_names) == len(per_image)
    harness = image.MetricHarness(compute_lpips=False)
    for k, name in enumerate(test_names):
        gt = (utils.load_img(str(scene / name))[..., :3] / np.float32(255)).astype(np.float64)
        png = utils.load_img(str(ckpt / 'test_preds' / f'color_{k:03d}.png'))[..., :3].astype(np.float64) / 255
        assert abs(harness(png, gt)['psnr'] - per_image[k]) < 1e-9, (k, harness(png, gt)['psnr'], per_image[k])


def test_render_writes_h264_videos(trained):
    import imageio_ffmpeg
    ckpt, out = trained
    videos = sorted(glob.glob(str(ckpt / 'render' / '*.mp4')))
    kinds = ['color', 'acc', 'distance_mean', 'distance_median']
    for kind in kinds:
        # Named as the reference: <scene>_<experiment>_path_renders_step_<step>_<kind>.mp4.
        assert str(ckpt / 'render' / f'ckpt_exp_path_renders_step_{TRAIN_STEPS}_{kind}.mp4') in videos
    frames_dir = ckpt / 'render' / f'path_renders_step_{TRAIN_STEPS}'
    for video in videos:
        reader = imageio_ffmpeg.read_frames(video)
        meta = reader.__next__()
        assert meta['codec'] == 'h264'
        frames = [np.frombuffer(fr, np.uint8).reshape(meta['size'][1], meta['size'][0], 3) for fr in reader]
        assert len(frames) == 4
        with open(video, 'rb') as f:
            head = f.read(4096)
        assert b'ftyp' in head[:16] and b'avc1' in open(video, 'rb').read()
        if video.endswith('_color.mp4'):
            first = utils.load_img(str(frames_dir / 'color_000.png'))[..., :3].astype(np.float64)
            assert np.abs(frames[0][:first.shape[0], :first.shape[1]] - first).mean() < 6.


def test_render_jobs_split_and_resume(workdir, trained):
    ckpt, _ = trained
    gin_file, scene = str(workdir / 'tiny.gin'), str(workdir / 'scene')
    render_dir = workdir / 'split_render'
    common = ['Config.render_path = True', 'Config.render_path_frames = 4', f"Config.render_dir = '{render_dir}'"]
    frames_dir = render_dir / f'path_renders_step_{TRAIN_STEPS}'

    job0 = _cli('render', gin_file, scene, str(ckpt), *common, 'Config.render_num_jobs = 2',
                'Config.render_job_id = 0')
    _check_ok(job0)
    assert sorted(p.name for p in frames_dir.glob('acc_*.tiff')) == ['acc_000.tiff', 'acc_002.tiff']
    assert not list(render_dir.glob('*.mp4'))  # Videos wait until every job has finished.

    job1 = _cli('render', gin_file, scene, str(ckpt), *common, 'Config.render_num_jobs = 2',
                'Config.render_job_id = 1')
    _check_ok(job1)
    assert len(list(frames_dir.glob('acc_*.tiff'))) == 4
    assert len(list(render_dir.glob('*_color.mp4'))) == 1
    # Split rendering gives the same frames as one job.
    single = ckpt / 'render' / f'path_renders_step_{TRAIN_STEPS}'
    for i in range(4):
        a = utils.load_img(str(frames_dir / f'color_{i:03d}.png'))
        b = utils.load_img(str(single / f'color_{i:03d}.png'))
        assert np.array_equal(a, b)

    mtimes = {p: p.stat().st_mtime_ns for p in frames_dir.iterdir()}
    again = _cli('render', gin_file, scene, str(ckpt), *common)
    _check_ok(again)
    assert again.stdout.count('already rendered') == 4 and 'rendered in' not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in frames_dir.iterdir()} == mtimes


def test_eval_loop_exits_after_final_step(workdir, trained):
    ckpt, _ = trained
    out = workdir / 'loop_eval'
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns('test_preds', 'render', 'events.*'))
    proc = _cli('eval', str(workdir / 'tiny.gin'), str(workdir / 'scene'), str(out),
                'Config.eval_only_once = False', timeout=120)
    _check_ok(proc)
    assert proc.stdout.count('Evaluating checkpoint') == 1
    with open(out / 'test_preds' / 'metrics.json') as f:
        assert json.load(f)['step'] == TRAIN_STEPS
    assert glob.glob(str(out / 'eval' / 'events.*'))  # Looping eval logs to tensorboard.


def _params(path):
    state = checkpoints.load_checkpoint(path)
    return state['model'], state['optimizer']


def test_resume_is_exact(workdir):
    from mipnerf360.cli import train
    gin_file, scene = str(workdir / 'tiny.gin'), str(workdir / 'scene')
    straight, resumed = workdir / 'straight', workdir / 'resumed'
    steps = ['Config.max_steps = 8', 'Config.checkpoint_every = 100']
    assert _in_process(train, _flags(gin_file, scene, straight, *steps)) == 0
    assert _in_process(train, _flags(gin_file, scene, resumed, *steps, 'Config.early_exit_steps = 3')) == 0
    mid_model, _ = _params(checkpoints.latest_checkpoint(str(resumed)))
    assert checkpoints.step_of(checkpoints.latest_checkpoint(str(resumed))) == 3
    assert _in_process(train, _flags(gin_file, scene, resumed, *steps)) == 0

    a_model, a_opt = _params(checkpoints.checkpoint_path(str(straight), 8))
    b_model, b_opt = _params(checkpoints.checkpoint_path(str(resumed), 8))
    assert a_model.keys() == b_model.keys()
    for k in a_model:
        assert torch.equal(a_model[k], b_model[k]), k
    # Adam's moments and step counts too.
    for pid, sa in a_opt['state'].items():
        for name, v in sa.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b_opt['state'][pid][name])), (pid, name)
    # The resumed steps did train (so the comparison is not between untouched weights).
    assert any(not torch.equal(mid_model[k], b_model[k]) for k in b_model)


def test_train_holds_the_process_group_for_the_whole_run(workdir, monkeypatch):
    """train runs every step inside `common.distributed_group` (as eval and render do), and leaves it also when a
    step fails."""
    import contextlib
    from mipnerf360 import train_utils
    from mipnerf360.cli import common, train
    events = []

    @contextlib.contextmanager
    def group(world_size, device):
        events.append(('enter', world_size, device.type))
        try:
            yield
        finally:
            events.append(('exit',))

    real_step = train_utils.train_step

    def step(state, *args, **kwargs):
        events.append(('step', state.step))
        if fail and state.step == 0:
            raise RuntimeError('step failed')
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(common, 'distributed_group', group)
    monkeypatch.setattr(train_utils, 'train_step', step)
    for fail in (False, True):
        events.clear()
        ckpt = workdir / f'group_ckpt_{fail}'
        code = _in_process(train, _flags(str(workdir / 'tiny.gin'), str(workdir / 'scene'), ckpt,
                                         'Config.max_steps = 2', "Config.device = 'cpu'"))
        assert code == (common.EXIT_BUG if fail else 0)
        steps = [('step', 0)] if fail else [('step', 0), ('step', 1)]
        assert events == [('enter', 1, 'cpu')] + steps + [('exit',)], events


def test_train_passes_dataset_camtype(workdir, monkeypatch):
    """Fisheye cameras with rays cast in the train step: train_step gets the dataset's camtype and cameras
    on the model's device."""
    from mipnerf360 import camera_utils, train_utils
    from mipnerf360.cli import train
    scene = workdir / 'fisheye'
    shutil.copytree(workdir / 'scene', scene)
    cams = scene / 'sparse' / '0' / 'cameras.txt'
    lines = cams.read_text().splitlines()
    lines = [ln if ln.startswith('#') else ln.replace('PINHOLE', 'OPENCV_FISHEYE') + ' 0.0 0.0 0.0 0.0'
             for ln in lines]
    cams.write_text('\n'.join(lines) + '\n')
    seen = []
    real_step = train_utils.train_step

    def spy(state, batch, cameras, *args, **kwargs):
        seen.append((kwargs.get('camtype'), type(batch.rays).__name__, cameras))
        return real_step(state, batch, cameras, *args, **kwargs)

    monkeypatch.setattr(train_utils, 'train_step', spy)
    code = _in_process(train, _flags(str(workdir / 'tiny.gin'), str(scene), workdir / 'fisheye_ckpt',
                                     'Config.max_steps = 2', 'Config.cast_rays_in_train_step = True'))
    assert code == 0
    assert len(seen) == 2
    for camtype, rays_type, cameras in seen:
        assert camtype == camera_utils.ProjectionType.FISHEYE
        assert rays_type == 'Pixels'
        assert isinstance(cameras[1], torch.Tensor) and cameras[1].dtype == torch.float32


def _wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f'timed out waiting for {what}')


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_sigterm_saves_and_exits_cleanly(workdir, signum):
    """SIGTERM or a first Ctrl-C: the step finishes, a checkpoint is saved, exit 0; the same command resumes at
    the next step."""
    name = signal.Signals(signum).name
    ckpt = workdir / name.lower()
    flags = _flags(str(workdir / 'tiny.gin'), str(workdir / 'scene'), str(ckpt), 'Config.max_steps = 100000',
                   'Config.checkpoint_every = 100000', 'Config.print_every = 1')
    cmd = [sys.executable, '-m', 'train'] + flags
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = ckpt / 'train_log.txt'
        _wait_for(lambda: log.exists() and log.read_text().count('r/s') >= 3, 60, 'training steps')
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert f'Stop requested ({name})' in stdout
    newest = checkpoints.latest_checkpoint(str(ckpt))
    state = checkpoints.load_checkpoint(newest)
    assert 3 <= state['step'] < 100000
    assert f'at step {state["step"]};' in stdout
    if signum == signal.SIGINT:
        step = state['step']
        resumed = subprocess.run(cmd + [f'--gin_bindings=Config.early_exit_steps = {step + 2}'], cwd=REPO,
                                 env=_env(), capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert f'steps {step + 1}..{step + 2}.' in resumed.stdout, resumed.stdout
        assert checkpoints.step_of(checkpoints.latest_checkpoint(str(ckpt))) == step + 2
        assert checkpoints.step_of(newest) == step and os.path.exists(newest)  # The interrupted run's save stays.


def test_sigkill_during_checkpoint_write_keeps_newest_whole(workdir, tmp_path):
    """The process dies (SIGKILL) half way through writing the checkpoint of step 3: the newest checkpoint
    is still the complete one of step 2, and a resumed run continues from it and cleans up the partial file."""
    ckpt = workdir / 'sigkill'
    gin_file, scene = str(workdir / 'tiny.gin'), str(workdir / 'scene')
    # A torch.save that writes a partial file and hangs, on the checkpoint of step 3 only.
    (tmp_path / 'sitecustomize.py').write_text(
        'import time, torch\n'
        '_save = torch.save\n'
        'def _slow_save(obj, f, *a, **k):\n'
        '    if isinstance(obj, dict) and obj.get("step") == 3:\n'
        '        f.write(b"PK\\x03\\x04 partial")\n'
        '        f.flush()\n'
        '        time.sleep(120)\n'
        '    return _save(obj, f, *a, **k)\n'
        'torch.save = _slow_save\n')
    env = _env()
    env['PYTHONPATH'] = str(tmp_path) + os.pathsep + env.get('PYTHONPATH', '')
    cmd = [sys.executable, '-m', 'train'] + _flags(gin_file, scene, str(ckpt), 'Config.max_steps = 5',
                                                   'Config.checkpoint_every = 1')
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: glob.glob(str(ckpt / 'checkpoint_00000003.pt.tmp*')), 60, 'the checkpoint write')
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    newest = checkpoints.latest_checkpoint(str(ckpt))
    assert checkpoints.step_of(newest) == 2
    assert checkpoints.load_checkpoint(newest)['step'] == 2

    resumed = _cli('train', gin_file, scene, str(ckpt), 'Config.max_steps = 4', 'Config.checkpoint_every = 1')
    _check_ok(resumed)
    assert 'steps 3..4' in resumed.stdout
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(str(ckpt)))['step'] == 4
    assert not glob.glob(str(ckpt / '*.tmp*'))


def _tree_digest(path):
    """{relative path: sha1} of every file under `path` (or of the file itself)."""
    path = str(path)
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            return {'': hashlib.sha1(f.read()).hexdigest()}
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            with open(p, 'rb') as f:
                out[os.path.relpath(p, path)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def bad_runs(workdir, trained):
    """Runs every bad-input case at once (in parallel); returns ({case: (code, stdout, stderr)}, digests of the
    folders before and after, paths)."""
    ckpt, _ = trained
    gin_file, scene = str(workdir / 'tiny.gin'), str(workdir / 'scene')
    bad = workdir / 'bad'
    bad.mkdir()
    a_file = bad / 'a_file'
    a_file.write_text('keep me')
    corrupt = bad / 'corrupt'
    shutil.copytree(ckpt, corrupt, ignore=shutil.ignore_patterns('test_preds', 'render'))
    newest = checkpoints.latest_checkpoint(str(corrupt))
    with open(newest, 'r+b') as f:
        f.truncate(os.path.getsize(newest) // 2)
    empty = bad / 'empty_ckpt'
    empty.mkdir()
    other_config = bad / 'other_config'
    shutil.copytree(ckpt, other_config, ignore=shutil.ignore_patterns('test_preds', 'render'))
    blender = bad / 'blender_scene'
    synthetic.write_blender_scene(str(blender), n_train=2, n_val=1, n_test=1, width=16, height=12)
    no_images_2 = bad / 'no_images_2'
    shutil.copytree(scene, no_images_2, ignore=shutil.ignore_patterns('images_2'))
    render = ['Config.render_path = True', 'Config.render_path_frames = 4']
    cases = {
        'unquoted_string': ('train', [f'--gin_configs={gin_file}', f'--gin_bindings=Config.data_dir = {scene}',
                                      f"--gin_bindings=Config.checkpoint_dir = '{bad / 'c4'}'", '--logtostderr']),
        'misspelled_class': ('train', _flags(gin_file, scene, str(bad / 'c5'), 'NerfMPL.net_width = 8')),
        'blender_scene_to_360': ('train', _flags(gin_file, str(blender), str(bad / 'c6'))),
        'missing_images_2': ('train', _flags(gin_file, str(no_images_2), str(bad / 'c7'))),
        'eval_other_config': ('eval', _flags(gin_file, scene, str(other_config), 'NerfMLP.net_width = 32')),
        'train_other_config': ('train', _flags(gin_file, scene, str(other_config), 'NerfMLP.net_width = 32',
                                               'Config.max_steps = 400')),
        'missing_data_dir': ('train', _flags(gin_file, str(bad / 'no_such_scene'), str(bad / 'c1'))),
        'wrong_gin_file': ('train', _flags(str(bad / 'no_such.gin'), scene, str(bad / 'c2'))),
        'misspelled_binding': ('train', _flags(gin_file, scene, str(bad / 'c3'), 'Config.bach_size = 512')),
        'unknown_flag': ('eval', _flags(gin_file, scene, str(ckpt))[:-1] + ['--gin_binding=x', '--logtostderr']),
        'corrupt_eval': ('eval', _flags(gin_file, scene, str(corrupt))),
        'corrupt_train': ('train', _flags(gin_file, scene, str(corrupt), 'Config.max_steps = 400')),
        'checkpoint_dir_is_file': ('train', _flags(gin_file, scene, str(a_file))),
        'render_dir_under_file': ('render', _flags(gin_file, scene, str(ckpt), *render,
                                                   f"Config.render_dir = '{a_file}/videos'")),
        'eval_no_checkpoint': ('eval', _flags(gin_file, scene, str(empty))),
        'render_no_checkpoint': ('render', _flags(gin_file, scene, str(bad / 'never_trained'), *render)),
    }
    digested = {'corrupt': corrupt, 'a_file': a_file, 'ckpt': ckpt, 'other_config': other_config}
    before = {name: _tree_digest(path) for name, path in digested.items()}
    procs = {name: subprocess.Popen([sys.executable, '-m', cmd] + argv, cwd=REPO, env=_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (cmd, argv) in cases.items()}
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        results[name] = (p.returncode, stdout, stderr)
    after = {name: _tree_digest(path) for name, path in digested.items()}
    return results, before, after, {'bad': bad, 'corrupt': corrupt, 'newest': newest}


# case -> substrings the error line must contain (what went wrong and what to do).
_EXPECTED = {
    'missing_data_dir': ['no_such_scene', 'Config.data_dir'],
    'wrong_gin_file': ['no_such.gin', 'not found'],
    'misspelled_binding': ['bach_size', 'did you mean Config.batch_size'],
    'unquoted_string': ['Config.data_dir = ', 'Quote strings', "Config.data_dir = '/path/to/scene'"],
    'misspelled_class': ['NerfMPL', 'did you mean NerfMLP?'],
    'blender_scene_to_360': ['blender_scene', 'Blender scene', 'configs/blender_256.gin'],
    'missing_images_2': ['no_images_2/images_2', 'does not exist'],
    'eval_other_config': ['does not match this model', 'in the checkpoint, [', 'in this model', 'config.gin'],
    'train_other_config': ['does not match this model', 'in the checkpoint, [', 'in this model', 'config.gin'],
    'unknown_flag': ['gin_binding', 'gin_bindings'],
    'corrupt_eval': ['corrupt', 'checkpoint_00000300.pt', 'fall back to checkpoint_00000200.pt'],
    'corrupt_train': ['corrupt', 'checkpoint_00000300.pt', 'fall back to checkpoint_00000200.pt'],
    'checkpoint_dir_is_file': ['a_file', 'existing file'],
    'render_dir_under_file': ['a_file', 'Config.render_dir'],
    'eval_no_checkpoint': ['No checkpoint', 'train first'],
    'render_no_checkpoint': ['No checkpoint', 'train first'],
}


@pytest.mark.parametrize('case', sorted(_EXPECTED))
def test_bad_input_gives_one_error_line(bad_runs, case):
    results, before, after, paths = bad_runs
    code, stdout, stderr = results[case]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stdout[-2000:], stderr)
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr
    for s in _EXPECTED[case]:
        assert s in lines[0], (s, lines[0])
    # Nothing already written is lost or changed.
    assert before == after
    if case == 'render_no_checkpoint':
        assert not (paths['bad'] / 'never_trained').exists()
    for name in ['c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7']:
        assert not glob.glob(str(paths['bad'] / name / 'checkpoint_*'))
