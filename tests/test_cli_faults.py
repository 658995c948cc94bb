"""Faults in eval / render: bugs keep their traceback, signals stop cleanly, resumed renders never mix camera
paths, non-finite metrics are not reported as success.

The model is never trained here: a freshly initialised tiny model is saved as a checkpoint (the faults do not
depend on quality), on a 16 x 12 scene, so each command runs in seconds on one core.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import torch

from mipnerf360 import checkpoints, configs, models, synthetic, utils
from mipnerf360.cli import common
from mipnerf360.cli import eval as eval_cli
from mipnerf360.cli import render as render_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_GIN = """
Config.dataset_loader = 'llff'
Config.factor = 2
Config.near = 0.2
Config.far = 100.
Config.render_chunk_size = 4096
Config.max_steps = 10
Config.render_save_async = False
Model.num_levels = 2
Model.num_prop_samples = 8
Model.num_nerf_samples = 8
PropMLP.net_depth = 1
PropMLP.net_width = 16
PropMLP.basis_shape = 'octahedron'
PropMLP.basis_subdivisions = 1
NerfMLP.net_depth = 1
NerfMLP.net_width = 16
NerfMLP.bottleneck_width = 8
NerfMLP.basis_shape = 'octahedron'
NerfMLP.basis_subdivisions = 1
"""


def write_tiny_scene(root, gin_text: str = TINY_GIN):
    """A 9-view 32x24 COLMAP scene in `root`/scene and `gin_text` in `root`/tiny.gin; (scene, gin file)."""
    scene = root / 'scene'
    synthetic.write_colmap_scene(str(scene), n_views=9, width=32, height=24, factors=(2,), seed=0,
                                 write_points=False)
    gin_file = root / 'tiny.gin'
    gin_file.write_text(gin_text)
    return scene, gin_file


def write_tiny_run(root):
    """`write_tiny_scene` plus a checkpoint (step 5) of the untrained model seeded by 0 in `root`/exp/ckpt;
    (root, gin file, scene, checkpoint folder)."""
    scene, gin_file = write_tiny_scene(root)
    ckpt = root / 'exp' / 'ckpt'
    gin.clear_config()
    configs.parse_gin([str(gin_file)], [])
    torch.manual_seed(0)
    model = models.Model(config=configs.Config())
    gin.clear_config()
    checkpoints.save_checkpoint(str(ckpt), {'model': model.state_dict(), 'step': 5}, 5)
    return root, str(gin_file), str(scene), ckpt


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp('faults'))


def _flags(setup, *bindings, ckpt=None):
    root, gin_file, scene, default_ckpt = setup
    return ['prog', f'--gin_configs={gin_file}', f"--gin_bindings=Config.data_dir = '{scene}'",
            f"--gin_bindings=Config.checkpoint_dir = '{ckpt or default_ckpt}'"] + \
        [f'--gin_bindings={b}' for b in bindings]


def _run(module, argv):
    try:
        module.run(argv)
    except SystemExit as e:
        return e.code or 0
    return 0


def _env():
    env = dict(os.environ)
    env.pop('MIPNERF360_DEBUG', None)
    env['OMP_NUM_THREADS'] = '1'
    return env


def test_bug_keeps_traceback_and_exits_1(setup, monkeypatch, capsys):
    def buggy(*args, **kwargs):
        raise ValueError('an internal invariant broke')

    monkeypatch.setattr(eval_cli, 'evaluate_once', buggy)
    code = _run(eval_cli, _flags(setup))
    err = capsys.readouterr().err
    assert code == common.EXIT_BUG == 1
    assert 'Traceback (most recent call last)' in err and 'an internal invariant broke' in err
    assert err.strip().splitlines()[-1] == \
        'error: this is a bug in mipnerf360; please report it with the traceback above.'


def test_user_error_is_one_line_exit_2(setup, capsys):
    code = _run(eval_cli, _flags(setup, 'Config.checkpoint_every = 0'))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert 'Config.checkpoint_every = 0' in err and '>= 1' in err


def test_nan_metrics_are_an_error_and_json_stays_valid(setup, monkeypatch, capsys, tmp_path):
    real = models.render_image

    def nan_render(*args, **kwargs):
        out = real(*args, **kwargs)
        out['rgb'] = torch.full_like(out['rgb'], float('nan'))
        return out

    monkeypatch.setattr(models, 'render_image', nan_render)
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    for p in checkpoints.list_checkpoints(str(setup[3])):
        os.link(p, ckpt / os.path.basename(p))
    code = _run(eval_cli, _flags(setup, ckpt=ckpt))
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'non-finite metrics' in lines[0] and 'psnr' in lines[0], err

    def no_constants(name):
        raise AssertionError(f'{name} in metrics.json')

    with open(ckpt / 'test_preds' / 'metrics.json') as f:
        doc = json.load(f, parse_constant=no_constants)
    assert doc['psnr'] is None and 'psnr' in doc['non_finite']
    assert doc['per_image']['psnr'] == [None] * doc['num_images'] and doc['num_images'] == 2


def test_eval_writes_finite_metrics_and_showcase_ray_data(setup, tmp_path, capsys):
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    for p in checkpoints.list_checkpoints(str(setup[3])):
        os.link(p, ckpt / os.path.basename(p))
    code = _run(eval_cli, _flags(setup, 'Config.eval_save_ray_data = True', 'Config.num_showcase_images = 1',
                                 'Config.vis_num_rays = 3', ckpt=ckpt))
    assert code == 0, capsys.readouterr().err
    with open(ckpt / 'test_preds' / 'metrics.json') as f:
        doc = json.load(f)
    assert np.isfinite(doc['psnr']) and 'non_finite' not in doc
    # deterministic_showcase: the permutation seeded by 0 picks the same image at every step.
    idx = int(eval_cli.showcase_indices(configs.Config(num_showcase_images=1), 2, step=5)[0])
    assert idx == int(eval_cli.showcase_indices(configs.Config(num_showcase_images=1), 2, step=6)[0])
    text = (ckpt / 'test_preds' / f'ray_data_5_{idx}.txt').read_text()
    assert "'ray_sdist'" in text and "'ray_weights'" in text and "'ray_rgbs'" in text


def test_decimate_takes_every_dth_pixel():
    img = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    out = eval_cli._decimate({'rgb': img, 'ray_sdist': None, 'scalar': np.float32(1.)}, 3)
    np.testing.assert_array_equal(out['rgb'], img[::3, ::3])
    assert out['ray_sdist'] is None and out['scalar'] == 1.
    assert eval_cli._decimate({'rgb': img}, 0)['rgb'] is img


def _frames(d):
    return sorted(p.name for p in d.glob('acc_*.tiff'))


def test_render_resume_never_mixes_paths(setup, tmp_path, capsys):
    render_dir = tmp_path / 'renders'
    common_b = ['Config.render_path = True', f"Config.render_dir = '{render_dir}'"]
    frames_dir = render_dir / 'path_renders_step_5'
    assert _run(render_cli, _flags(setup, *common_b, 'Config.render_path_frames = 3')) == 0
    assert _frames(frames_dir) == ['acc_000.tiff', 'acc_001.tiff', 'acc_002.tiff']
    with open(frames_dir / render_cli.MANIFEST) as f:
        manifest = json.load(f)
    assert manifest['num_frames'] == 3 and manifest['render_path_frames'] == 3
    assert manifest['checkpoint_step'] == 5 and manifest['resolution'] == [16, 12]
    capsys.readouterr()

    # Another frame count: every old frame goes (frame 1 of a 3-frame orbit is not frame 1 of a 5-frame one).
    assert _run(render_cli, _flags(setup, *common_b, 'Config.render_path_frames = 5')) == 0
    out = capsys.readouterr().out
    assert 'render_path_frames changed 3 -> 5' in out and 're-rendering' in out
    assert 'already rendered' not in out and out.count('rendered in') == 5
    assert _frames(frames_dir) == [f'acc_{i:03d}.tiff' for i in range(5)]
    with open(frames_dir / render_cli.MANIFEST) as f:
        assert json.load(f)['render_path_frames'] == 5

    # Same settings again: everything is reused.
    assert _run(render_cli, _flags(setup, *common_b, 'Config.render_path_frames = 5')) == 0
    out = capsys.readouterr().out
    assert out.count('already rendered') == 5 and 're-rendering' not in out

    # A path setting changes: re-rendered.
    assert _run(render_cli, _flags(setup, *common_b, 'Config.render_path_frames = 5', 'Config.z_variation = 0.3'))\
        == 0
    out = capsys.readouterr().out
    assert 'z_variation changed 0.0 -> 0.3' in out and out.count('rendered in') == 5


def test_render_folder_without_manifest_is_rerendered(setup, tmp_path, capsys):
    render_dir = tmp_path / 'renders'
    frames_dir = render_dir / 'path_renders_step_5'
    frames_dir.mkdir(parents=True)
    utils.save_img_f32(np.zeros((12, 16)), str(frames_dir / 'acc_000.tiff'))
    utils.save_img_u8(np.zeros((12, 16, 3)), str(frames_dir / 'color_000.png'))
    code = _run(render_cli, _flags(setup, 'Config.render_path = True', f"Config.render_dir = '{render_dir}'",
                                   'Config.render_path_frames = 2'))
    assert code == 0
    out = capsys.readouterr().out
    assert 'no render_manifest.json' in out and out.count('rendered in') == 2


def _wait_for(pred, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize('cmd,sig,code', [('render', signal.SIGTERM, 143), ('eval', signal.SIGINT, 130)])
def test_signal_stops_with_one_line(setup, tmp_path, cmd, sig, code):
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    for p in checkpoints.list_checkpoints(str(setup[3])):
        os.link(p, ckpt / os.path.basename(p))
    out_dir = ckpt / ('render' if cmd == 'render' else 'test_preds')
    bindings = (['Config.render_path = True', 'Config.render_path_frames = 8'] if cmd == 'render'
                else ['Config.llffhold = 1'])
    argv = _flags(setup, *bindings, ckpt=ckpt)[1:]
    # Each written TIFF takes 0.5 s more, so the signal arrives while work remains.
    (tmp_path / 'sitecustomize.py').write_text(
        'import time\n'
        'from mipnerf360 import utils\n'
        '_save = utils.save_img_f32\n'
        'def _slow(*a, **k):\n'
        '    _save(*a, **k)\n'
        '    time.sleep(0.5)\n'
        'utils.save_img_f32 = _slow\n')
    env = _env()
    env['PYTHONPATH'] = os.pathsep.join([str(tmp_path), REPO, env.get('PYTHONPATH', '')])
    proc = subprocess.Popen([sys.executable, '-m', cmd] + argv, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: list(out_dir.rglob('acc_*.tiff')), 120), 'no output written'
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, (stdout[-2000:], stderr)
    # One line of ours (absl's log lines, e.g. the LPIPS notice, may precede it); no traceback, no native dump.
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(('W1', 'I1'))]
    assert len(lines) == 1 and lines[0].startswith('Stopped ('), stderr
    assert 'Traceback' not in stderr and ' @ ' not in stderr
    assert not list(out_dir.rglob('*.tmp*'))
    files = list(out_dir.rglob('*.png')) + list(out_dir.rglob('*.tiff'))
    assert files
    for f in files:  # Every file on disk is whole.
        assert utils.load_img(str(f)).shape[:2] == (12, 16)
    if cmd == 'render':
        assert not list(ckpt.rglob('*.mp4'))


@pytest.mark.parametrize('case', ['missing_render_path_file', 'corrupt_image', 'bad_rank_env', 'model_bindings',
                                  'robustnerf_patch', 'bad_device'])
def test_user_input_errors_stay_one_line(setup, tmp_path, monkeypatch, capsys, case):
    root, _, scene, _ = setup
    argv, module = _flags(setup), eval_cli
    expected = []
    if case == 'missing_render_path_file':
        module = render_cli
        argv += ['--gin_bindings=Config.render_path = True',
                 f"--gin_bindings=Config.render_path_file = '{tmp_path / 'nope.npy'}'"]
        expected = ['Config.render_path_file', 'nope.npy', 'does not exist']
    elif case == 'corrupt_image':
        bad_scene = tmp_path / 'scene'
        shutil.copytree(scene, bad_scene)
        victim = sorted((bad_scene / 'images_2').iterdir())[0]
        victim.write_bytes(b'not a png')
        argv = _flags(setup, f"Config.data_dir = '{bad_scene}'")
        expected = ['Cannot read image', victim.name]
    elif case == 'bad_rank_env':
        monkeypatch.setenv('RANK', 'zero')
        expected = ['RANK', "'zero'", 'torchrun']
    elif case == 'model_bindings':
        argv += ['--gin_bindings=NerfMLP.use_directional_enc = True']
        expected = ['Bad model bindings', 'use_directional_enc', 'enable_pred_roughness=True']
    elif case == 'robustnerf_patch':
        argv += ['--gin_bindings=Config.enable_robustnerf_loss = True', '--gin_bindings=Config.patch_size = 4']
        expected = ['Config.robustnerf_inner_patch_size = 8', 'Config.patch_size = 4']
    elif case == 'bad_device':
        argv += ["--gin_bindings=Config.device = 'gpu'"]
        expected = ["Config.device = 'gpu' is not a device", "'cuda:<index>'"]
    code = _run(module, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    for s in expected:
        assert s in lines[0], (s, lines[0])


@pytest.fixture
def opened_datasets(monkeypatch):
    """[(dataset, {'closed': bool})] for every dataset a command opens through `common.load_dataset`."""
    opened = []
    real_load = common.load_dataset

    def load(*args, **kwargs):
        dataset = real_load(*args, **kwargs)
        record, real_close = {'closed': False}, dataset.close

        def close(*a, **k):
            record['closed'] = True
            return real_close(*a, **k)

        dataset.close = close
        opened.append((dataset, record))
        return dataset

    monkeypatch.setattr(common, 'load_dataset', load)
    return opened


@pytest.mark.parametrize('command,case', [('train', 'glo_embeddings'), ('train', 'resume_without_optimizer'),
                                          ('train', 'model_bindings'), ('eval', 'model_bindings'),
                                          ('render', 'model_bindings'), ('render', 'corrupt_checkpoint')])
def test_setup_errors_close_the_datasets(setup, tmp_path, capsys, opened_datasets, command, case):
    """An error after the datasets are open (train's _setup, eval / render before their loop) closes every one
    of them (train's Prefetcher included) and is the one `error:` line with exit status 2."""
    from mipnerf360.cli import train as train_cli
    module = {'train': train_cli, 'eval': eval_cli, 'render': render_cli}[command]
    ckpt, bindings = tmp_path / 'ckpt', []
    ckpt.mkdir()
    if case == 'glo_embeddings':
        bindings, expected = ['Model.num_glo_features = 4', 'Model.num_glo_embeddings = 2'], 'num_glo_embeddings = 2'
    elif case == 'model_bindings':
        bindings, expected = ['NerfMLP.use_directional_enc = True'], 'Bad model bindings'
    if case in ('resume_without_optimizer', 'model_bindings'):  # Setup's checkpoint holds no optimizer state.
        for p in checkpoints.list_checkpoints(str(setup[3])):
            os.link(p, ckpt / os.path.basename(p))
        expected = expected if case == 'model_bindings' else 'has no optimizer state'
    elif case == 'corrupt_checkpoint':
        (ckpt / 'checkpoint_00000005.pt').write_bytes(b'not a checkpoint')
        expected = 'is corrupt'
    code = _run(module, _flags(setup, *bindings, ckpt=ckpt))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines
    assert len(opened_datasets) == (2 if command == 'train' else 1)  # train: the training and test splits.
    assert all(record['closed'] for _, record in opened_datasets)
    assert not any(getattr(d, '_thread', None) is not None and d._thread.is_alive() for d, _ in opened_datasets)


def _torchrun(cmd, argv, nproc=2):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                '-m', cmd]
    return subprocess.run(launcher + argv, cwd=REPO, env=_env(), text=True, capture_output=True, timeout=300)


@pytest.mark.slow
def test_torchrun_eval_and_render_split_the_work(setup, tmp_path, capsys):
    """2 CPU ranks (gloo): render splits the frames and rank 0 makes the video; eval splits the test images and
    rank 0 writes metrics.json with every image, equal to a single-process run."""
    single, multi = tmp_path / 'single', tmp_path / 'multi'
    for d in (single, multi):
        d.mkdir()
        for p in checkpoints.list_checkpoints(str(setup[3])):
            os.link(p, d / os.path.basename(p))
    render_b = ['Config.render_path = True', 'Config.render_path_frames = 4']
    assert _run(render_cli, _flags(setup, *render_b, ckpt=single)) == 0
    assert _run(eval_cli, _flags(setup, ckpt=single)) == 0
    capsys.readouterr()

    proc = _torchrun('render', _flags(setup, *render_b, ckpt=multi)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each frame rendered once across the ranks; the videos written once (by rank 0), one per kind.
    assert proc.stdout.count('rendered in') == 4, proc.stdout
    videos = sorted(p.name for p in (single / 'render').glob('*.mp4'))
    assert proc.stdout.count('Wrote ') == len(videos) >= 4
    frames = multi / 'render' / 'path_renders_step_5'
    assert _frames(frames) == [f'acc_{i:03d}.tiff' for i in range(4)]
    for i in range(4):
        np.testing.assert_array_equal(utils.load_img(str(frames / f'color_{i:03d}.png')),
                                      utils.load_img(str(single / 'render' / 'path_renders_step_5' /
                                                         f'color_{i:03d}.png')))
    assert [n.replace('multi_', 'single_', 1) for n in sorted(p.name for p in (multi / 'render').glob('*.mp4'))] \
        == videos

    proc = _torchrun('eval', _flags(setup, ckpt=multi)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(multi / 'test_preds' / 'metrics.json') as f:
        got = json.load(f)
    with open(single / 'test_preds' / 'metrics.json') as f:
        want = json.load(f)
    assert got['num_images'] == want['num_images'] == 2
    np.testing.assert_allclose(got['per_image']['psnr'], want['per_image']['psnr'], rtol=1e-6)
    np.testing.assert_allclose(got['psnr'], want['psnr'], rtol=1e-6)
    assert sorted(p.name for p in (multi / 'test_preds').glob('color_0*.png')) == ['color_000.png', 'color_001.png']
