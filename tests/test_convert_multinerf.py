"""Import of multinerf (JAX) checkpoints, checked against the reference itself.

tests/data/multinerf_tiny/ holds a checkpoint that google-research/multinerf trained (400 steps of
tests/data/multinerf_tiny.gin on the generated COLMAP scene), a few rays with the reference's outputs for them,
and the reference eval's per-image PSNR / SSIM; README_multinerf_checkpoint.md says how they were made. Checked:
- every parameter and Adam moment is the reference's array (kernels transposed), step = optax's count;
- our forward pass of the converted model reproduces the reference's outputs on the saved rays, per level;
- `python -m mipnerf360.convert_multinerf` then `python -m eval` on the regenerated scene reproduce the
  reference's eval PSNR within 2e-3 dB (and SSIM);
- training resumes from the converted checkpoint with the converted Adam moments;
- multinerf_raw_tiny/ (a RawNeRF checkpoint multinerf trained on the generated raw scene): our eval writes
  multinerf eval.py's metric files (psnr, ssim, cc_psnr, cc_ssim after the raw -> sRGB postprocessing, with the
  quadratic and the affine colour correction) to 1e-4 dB, and our render its spiral-path frames;
- multinerf_refnerf_tiny/ (a Ref-NeRF checkpoint multinerf trained on the generated shiny scene): our eval
  writes its metric files, normal MAEs included, within the tolerances its float32 colour correction and 8-bit
  rounding allow;
- user errors (missing path, foreign file, wrong config, orbax folder, non-empty output) are one clear line.
multinerf_360_glo_tree.json is the tree (paths, shapes, dtypes) of a checkpoint that multinerf wrote for the full
configs/360.gin model with GLO: a checkpoint of that tree, filled with distinct random values, converts for our
360 + GLO model with every value (parameters and Adam moments) in its place.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import gin
import msgpack
import numpy as np
import pytest
import torch
from PIL import Image

from mipnerf360 import checkpoints, configs, convert_multinerf, models, synthetic, train_utils, utils
from mipnerf360.cli import common
from mipnerf360.cli import eval as eval_cli
from mipnerf360.cli import render as render_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, 'tests', 'data', 'multinerf_tiny')
GIN = os.path.join(REPO, 'tests', 'data', 'multinerf_tiny.gin')
CKPT = os.path.join(DATA, 'checkpoint_400')
TREE_360_GLO = os.path.join(REPO, 'tests', 'data', 'multinerf_360_glo_tree.json')


def _flax_array(a: np.ndarray) -> msgpack.ExtType:
    """`a` as flax's msgpack writes an array: extension type 1 holding msgpack (shape, dtype name, bytes)."""
    return msgpack.ExtType(1, msgpack.packb((a.shape, a.dtype.name, a.tobytes()), use_bin_type=True))


def _config(*bindings):
    gin.clear_config()
    return configs.load_config(save_config=False, gin_configs=[GIN], gin_bindings=list(bindings))


@pytest.fixture(scope='module')
def tree():
    return convert_multinerf.read_flax_checkpoint(CKPT)


@pytest.fixture(scope='module')
def converted(tree):
    config = _config()
    model = models.construct_model(config=config)
    state = convert_multinerf.convert_state(tree, model, config, source=CKPT)
    model.load_state_dict(state['model'])
    return config, model, state


def _env():
    env = dict(os.environ)
    env.pop('MIPNERF360_DEBUG', None)
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def _flags(data_dir, ckpt_dir, *extra, bindings=(), gin=GIN):
    return ([f'--gin_configs={gin}', f"--gin_bindings=Config.data_dir = '{data_dir}'",
             f"--gin_bindings=Config.checkpoint_dir = '{ckpt_dir}'"] + [f'--gin_bindings={b}' for b in bindings]
            + list(extra))


def _subprocess(module, *flags):
    return subprocess.run([sys.executable, '-m', module] + list(flags), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _in_process(run, flags):
    """Runs a CLI's `run` in this process (a subprocess costs a torch import); returns the exit code."""
    try:
        run(['prog'] + flags)
    except SystemExit as e:
        return e.code or 0
    return 0


def _reference_rays():
    """The saved rays (float32, as JAX ran them) and the reference's outputs for them."""
    ref = np.load(os.path.join(DATA, 'reference_rays.npz'))
    fields = {k[len('rays_'):]: torch.from_numpy(ref[k].astype(np.float32)) for k in ref.files
              if k.startswith('rays_')}
    fields['cam_idx'] = fields['cam_idx'].long()
    return utils.Rays(**fields), ref


def test_parameters_and_adam_state_are_the_references(tree, converted):
    _, model, state = converted
    names = models.reference_param_names(model)
    params = tree['params']['params']
    adam = tree['opt_state']['0']
    assert set(params) == {'NerfMLP_0', 'PropMLP_0'}
    opt = state['optimizer']
    assert len(opt['state']) == len(names) == len(list(model.parameters()))
    for i, (name, p) in enumerate(model.named_parameters()):
        top, dense, leaf = names[name].split('/')
        ref = params[top][dense][leaf]
        mu, nu = adam['mu']['params'][top][dense][leaf], adam['nu']['params'][top][dense][leaf]
        tr = (lambda a: a.T) if leaf == 'kernel' else (lambda a: a)
        np.testing.assert_array_equal(p.detach().numpy(), tr(ref), err_msg=name)
        np.testing.assert_array_equal(opt['state'][i]['exp_avg'].numpy(), tr(mu), err_msg=name)
        np.testing.assert_array_equal(opt['state'][i]['exp_avg_sq'].numpy(), tr(nu), err_msg=name)
        assert float(opt['state'][i]['step']) == int(adam['count']) == 400
    assert np.abs(params['NerfMLP_0']['Dense_0']['kernel']).max() > 0  # Not an all-zero fixture.
    assert state['step'] == int(tree['step']) == 400


def test_forward_pass_matches_the_reference(converted):
    _, model, _ = converted
    rays, ref = _reference_rays()
    model.eval()
    with torch.no_grad():
        renderings, ray_history = model(None, rays, train_frac=float(ref['train_frac']), compute_extras=True)
    assert len(renderings) == len(ray_history) == 3
    for level, history in enumerate(ray_history):  # Proposal levels too: the shared PropMLP's weights.
        for key in ['sdist', 'weights']:
            np.testing.assert_allclose(history[key].numpy(), ref[f'level{level}_{key}'], rtol=0, atol=1e-5,
                                       err_msg=f'level {level} {key}')
    # Statistics that fall in the last interval (distance_mean, the 95th percentile, level 0's median) are left
    # out: its far end t = 1 / (s / far + (1 - s) / near) with far = 1e6 is ill-conditioned at s one float32 ulp
    # below 1 (a 1-ulp change of s moves t by ~20%), and s there differs from JAX's by that ulp (checked above).
    checked = 0
    for level, r in enumerate(renderings):
        keys = ['acc', 'distance_percentile_5'] + (['distance_median'] if level > 0 else [])
        for key in keys + (['rgb'] if level == 2 else []):
            want = ref[f'level{level}_{key}']
            np.testing.assert_allclose(r[key].numpy(), want, rtol=2e-5, atol=1e-5, err_msg=f'level {level} {key}')
            checked += 1
    assert checked == 9
    assert ref['level2_rgb'].std() > 0.02  # The rays see different colours, so a wrong mapping would show.


def _check_scene(paths, want_sha256: str, data: str, read=lambda f: np.asarray(Image.open(f))):
    """Asserts that the regenerated scene's pixels (`read` of each path, in sorted order) hash as when the
    reference ran on it."""
    digest = hashlib.sha256()
    for f in sorted(paths):
        digest.update(np.ascontiguousarray(read(f)).tobytes())
    assert digest.hexdigest() == want_sha256, \
        f'the synthetic scene changed; regenerate tests/data/{os.path.basename(data)} (README_multinerf_checkpoint.md)'


def _metric_file(preds: str, name: str, step: int):
    """The per-image values of eval's metric_<name>_<step>.txt (the reference's file format)."""
    with open(os.path.join(preds, f'metric_{name}_{step}.txt')) as fp:
        return [float(v) for v in fp.read().split()]


def _scene(tmp_path):
    scene = str(tmp_path / 'scene')
    synthetic.write_colmap_scene(scene)
    metrics = json.load(open(os.path.join(DATA, 'reference_metrics.json')))
    _check_scene(glob.glob(os.path.join(scene, 'images_2', '*.png')), metrics['scene_images_2_pixels_sha256'], DATA)
    return scene, metrics


def test_convert_then_eval_reproduces_reference_metrics(tmp_path):
    scene, ref = _scene(tmp_path)
    out = str(tmp_path / 'ckpt')
    assert _in_process(convert_multinerf.run, _flags(scene, out, f'--multinerf_checkpoint={DATA}')) == 0
    assert os.path.isfile(checkpoints.checkpoint_path(out, 400))
    assert os.path.isfile(os.path.join(out, 'config.gin'))
    assert _in_process(eval_cli.run, _flags(scene, out)) == 0
    ours = json.load(open(os.path.join(out, 'test_preds', 'metrics.json')))
    assert ours['step'] == 400
    # Seen here: 1.5e-6 dB and 6e-7 per image; the bars leave room for a few 8-bit rounding flips (~1e-4 dB each)
    # on another CPU's float rounding.
    assert abs(ours['psnr'] - ref['mean_psnr']) < 2e-3
    np.testing.assert_allclose(ours['per_image']['psnr'], ref['psnr'], atol=2e-3)
    np.testing.assert_allclose(ours['per_image']['ssim'], ref['ssim'], atol=1e-4)


RAW_DATA = os.path.join(REPO, 'tests', 'data', 'multinerf_raw_tiny')
RAW_GIN = os.path.join(REPO, 'tests', 'data', 'multinerf_raw_tiny.gin')


@pytest.fixture(scope='module')
def raw_run(tmp_path_factory):
    """The regenerated raw scene and multinerf's RawNeRF checkpoint converted into a run folder."""
    pytest.importorskip('pidng', reason='writing DNGs needs the optional pidng package (pip install .[raw])')
    rawpy = pytest.importorskip('rawpy', reason='reading DNGs needs the optional rawpy package (pip install .[raw])')
    root = tmp_path_factory.mktemp('raw_run')
    scene, out = str(root / 'scene'), str(root / 'ckpt')
    synthetic.write_raw_scene(scene, n_views=12, width=64, height=48, supersample=2)
    ref = json.load(open(os.path.join(RAW_DATA, 'reference_metrics.json')))

    def mosaic(path):
        with rawpy.imread(path) as raw:
            return raw.raw_image.copy()

    _check_scene(glob.glob(os.path.join(scene, 'raw', '*.dng')), ref['scene_dng_pixels_sha256'], RAW_DATA, mosaic)
    flags = _flags(scene, out, gin=RAW_GIN)
    assert _in_process(convert_multinerf.run, flags + [f'--multinerf_checkpoint={RAW_DATA}']) == 0
    return flags, out, ref


@pytest.mark.parametrize('variant, affine', [('color_correct', False), ('affine_cc', True)])
def test_raw_eval_reproduces_reference_metrics(raw_run, variant, affine):
    """RawNeRF eval (sRGB postprocessing with the scene's exposure, learned exposure scaling, quadratic or affine
    colour correction in raw space) of multinerf's own checkpoint gives multinerf eval.py's metric files."""
    flags, out, ref = raw_run
    preds = os.path.join(out, 'test_preds')
    shutil.rmtree(preds, ignore_errors=True)
    assert _in_process(eval_cli.run, flags + [f'--gin_bindings=Config.eval_raw_affine_cc = {affine}']) == 0
    for name, want in ref[variant].items():
        got = _metric_file(preds, name, ref['step'])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if name.endswith('psnr') else 5e-5, err_msg=name)


def test_raw_render_path_reproduces_reference_frames(raw_run, tmp_path):
    """render.py's spiral path frames of the same checkpoint: sRGB colour PNGs equal up to our rounding where
    multinerf truncates (ours - theirs in {0, 1}, 1 for about half the values), distances to float noise."""
    flags, _, _ = raw_run
    assert _in_process(render_cli.run, flags + [
        '--gin_bindings=Config.render_path = True', '--gin_bindings=Config.render_path_frames = 4',
        f"--gin_bindings=Config.render_dir = '{tmp_path}'"]) == 0
    ours = os.path.join(tmp_path, 'path_renders_step_300')
    ref_frames = sorted(glob.glob(os.path.join(RAW_DATA, 'render_path', '*')))
    assert len(ref_frames) == 8
    for f in ref_frames:
        want = np.asarray(Image.open(f), np.float64)
        got = np.asarray(Image.open(os.path.join(ours, os.path.basename(f))), np.float64)
        if f.endswith('.png'):
            assert set(np.unique(got - want)) <= {0., 1.}, os.path.basename(f)
            # Rounding adds 1 to about half the values (a frame 0.1 units darker or brighter leaves 0.4 / 0.6).
            assert 0.42 < (got - want).mean() < 0.58, os.path.basename(f)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=os.path.basename(f))


REFNERF_DATA = os.path.join(REPO, 'tests', 'data', 'multinerf_refnerf_tiny')
REFNERF_GIN = os.path.join(REPO, 'tests', 'data', 'multinerf_refnerf_tiny.gin')
# Tolerances against multinerf's metric files (README_multinerf_checkpoint.md says where each difference comes
# from): its colour correction solves in float32 (ours in float64), and quantised metrics flip a few 8-bit values
# that lie at a rounding boundary (~1e-4 dB each on these 32 x 32 images).
_REFNERF_ATOL = {'psnr': 1e-4, 'ssim': 5e-5, 'cc_psnr': 2e-3, 'cc_ssim': 5e-5, 'normals_mae': 1e-3,
                 'normals_pred_mae': 1e-3}
_REFNERF_QUANTIZED_ATOL = dict(_REFNERF_ATOL, psnr=2e-3, ssim=2e-4)


@pytest.mark.parametrize('quantize', [False, True])
def test_refnerf_eval_reproduces_reference_metrics(tmp_path, quantize):
    """Ref-NeRF eval of multinerf's own checkpoint (IDE, predicted normals / roughness, diffuse, tint) gives
    multinerf eval.py's metric files, including the normal MAE of the density-gradient and predicted normals."""
    scene, out = str(tmp_path / 'scene'), str(tmp_path / 'ckpt')
    synthetic.write_shiny_blender_scene(scene, n_train=16, width=32, height=32, supersample=2)
    ref = json.load(open(os.path.join(REFNERF_DATA, 'reference_metrics.json')))
    _check_scene(glob.glob(os.path.join(scene, 'test', '*.png')), ref['scene_test_pixels_sha256'], REFNERF_DATA)
    flags = _flags(scene, out, gin=REFNERF_GIN, bindings=[f'Config.eval_quantize_metrics = {quantize}'])
    assert _in_process(convert_multinerf.run, flags + [f'--multinerf_checkpoint={REFNERF_DATA}']) == 0
    assert _in_process(eval_cli.run, flags) == 0
    want_all = ref['quantized' if quantize else 'unquantized']
    atol = _REFNERF_QUANTIZED_ATOL if quantize else _REFNERF_ATOL
    assert set(want_all) == set(atol)
    for name, want in want_all.items():
        got = _metric_file(os.path.join(out, 'test_preds'), name, ref['step'])
        np.testing.assert_allclose(got, want, rtol=0, atol=atol[name], err_msg=name)


def test_training_resumes_from_converted_checkpoint(tmp_path, converted):
    _, _, state = converted
    config = _config()  # Other tests may have parsed other bindings since the fixture was built.
    checkpoints.save_checkpoint(str(tmp_path), state, state['step'])
    model = models.construct_model(config=config, seed=123)  # Other initial weights: the restore must win.
    train_state = train_utils.create_train_state(config, model)
    optimizer = train_state.optimizer
    step = common.restore_model(model, config, torch.device('cpu'), train_state=train_state,
                                path=checkpoints.latest_checkpoint(str(tmp_path)))
    assert step == 400
    params = list(model.parameters())
    before = [optimizer.state[p]['exp_avg'].clone() for p in params]
    for p, b, s in zip(params, before, state['optimizer']['state'].values()):
        torch.testing.assert_close(b, s['exp_avg'], rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[p]['exp_avg_sq'], s['exp_avg_sq'], rtol=0, atol=0)
    rays, ref = _reference_rays()
    batch = utils.Batch(rays=rays, rgb=torch.from_numpy(ref['level2_rgb']).clamp(0, 1))
    model.train()
    _, stats = train_utils.train_step(train_state, batch, None, config, torch.Generator().manual_seed(0),
                                      train_frac=1.0)
    assert np.isfinite(float(stats['loss']))
    assert float(optimizer.state[params[0]]['step']) == 401
    assert not torch.equal(optimizer.state[params[0]]['exp_avg'], before[0])


def _checkpoint_of_tree(tree_json: str, path: str, step: int) -> dict:
    """Writes a flax msgpack checkpoint with exactly the leaves of `tree_json` (in its order), each array distinct
    random values (non-negative for Adam's nu) and each int32 scalar `step`; returns {leaf path: value}."""
    rng = np.random.default_rng(0)
    tree, values = {}, {}
    for leaf, shape, dtype in json.load(open(tree_json))['leaves']:
        if dtype == 'int32':
            value = np.array(step, dtype=np.int32).reshape(shape)
        else:
            value = rng.standard_normal(shape, dtype=np.dtype(dtype))
            value = np.abs(value) if '/nu/' in leaf else value
        node = tree
        *parents, key = leaf.split('/')
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = _flax_array(value)
        values[leaf] = value
    with open(path, 'wb') as f:
        f.write(msgpack.packb(tree, use_bin_type=True))
    return values


def test_360_glo_checkpoint_tree_lands_in_our_model(tmp_path):
    values = _checkpoint_of_tree(TREE_360_GLO, str(tmp_path / 'checkpoint_7'), 7)
    gin.clear_config()
    config = configs.load_config(save_config=False, gin_configs=[os.path.join(REPO, 'configs', '360.gin')],
                                 gin_bindings=['Model.num_glo_features = 4'])
    state, _ = convert_multinerf.convert(str(tmp_path), config)
    model = models.construct_model(config=config, seed=1)
    model.load_state_dict(state['model'], strict=True)
    optimizer, _ = train_utils.create_optimizer(config, model)
    optimizer.load_state_dict(state['optimizer'])

    # The layer order the reference's flax module creates (checked against JAX's forward pass on a converted
    # 360 + GLO checkpoint): trunk, density, bottleneck, view layer, rgb; the PropMLP has no colour branch.
    expected = {f'nerf_mlp.trunk.{i}': f'NerfMLP_0/Dense_{i}' for i in range(8)}
    expected.update({'nerf_mlp.density_layer': 'NerfMLP_0/Dense_8', 'nerf_mlp.bottleneck_layer': 'NerfMLP_0/Dense_9',
                     'nerf_mlp.viewdir_layers.0': 'NerfMLP_0/Dense_10', 'nerf_mlp.rgb_layer': 'NerfMLP_0/Dense_11',
                     'prop_mlp.density_layer': 'PropMLP_0/Dense_4'})
    expected.update({f'prop_mlp.trunk.{i}': f'PropMLP_0/Dense_{i}' for i in range(4)})
    expected = {f'{ours}.{t}': f'{ref}/{r}' for ours, ref in expected.items()
                for t, r in (('weight', 'kernel'), ('bias', 'bias'))}
    expected['glo_vecs.weight'] = 'Embed_0/embedding'
    names = models.reference_param_names(model)
    assert names == expected
    assert {f'params/params/{ref}' for ref in names.values()} == {k for k in values if k.startswith('params/')}
    assert sum(p.numel() for p in model.parameters()) == 9_012_005  # 9,007,493 + GLO: 1000 x 4 + 4 x 128.

    for name, p in model.named_parameters():
        ref = names[name]
        tr = (lambda a: a.T) if ref.endswith('/kernel') else (lambda a: a)
        np.testing.assert_array_equal(p.detach().numpy(), tr(values[f'params/params/{ref}']), err_msg=name)
        moments = optimizer.state[p]
        np.testing.assert_array_equal(moments['exp_avg'].numpy(), tr(values[f'opt_state/0/mu/params/{ref}']),
                                      err_msg=name)
        np.testing.assert_array_equal(moments['exp_avg_sq'].numpy(), tr(values[f'opt_state/0/nu/params/{ref}']),
                                      err_msg=name)
        assert float(moments['step']) == 7
    assert state['step'] == 7


def test_newest_checkpoint_and_orbax_aggregate(tmp_path, tree):
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(CKPT, run / 'checkpoint_400')
    shutil.copy(CKPT, run / 'checkpoint_50')  # Newest by number, not by name.
    assert convert_multinerf.find_checkpoint(str(run)) == str(run / 'checkpoint_400')
    orbax = tmp_path / 'orbax' / 'checkpoint_400'
    orbax.mkdir(parents=True)
    shutil.copy(CKPT, orbax / 'checkpoint')  # orbax <= 0.2 keeps one aggregated msgpack file.
    again = convert_multinerf.read_flax_checkpoint(convert_multinerf.find_checkpoint(str(orbax.parent)))
    np.testing.assert_array_equal(again['params']['params']['PropMLP_0']['Dense_0']['kernel'],
                                  tree['params']['params']['PropMLP_0']['Dense_0']['kernel'])


def test_chunked_and_bfloat16_arrays_decode():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # Exact in bfloat16: small integers.
    bf16_ext = msgpack.ExtType(1, msgpack.packb((bf16.shape, 'bfloat16', bf16.tobytes()), use_bin_type=True))
    chunked = {'__msgpack_chunked_array__': True, 'shape': {'0': 2, '1': 3},
               'chunks': {'0': _flax_array(values.reshape(-1)[:4]), '1': _flax_array(values.reshape(-1)[4:])}}
    raw = msgpack.packb({'params': {'a': chunked, 'b': bf16_ext}, 'step': 3}, use_bin_type=True)
    tree = msgpack.unpackb(raw, ext_hook=convert_multinerf._ext_hook, raw=False)  # pylint: disable=protected-access
    tree = convert_multinerf._unchunk(tree)  # pylint: disable=protected-access
    np.testing.assert_array_equal(tree['params']['a'], values)
    np.testing.assert_array_equal(tree['params']['b'], values)


def test_wrong_config_names_first_parameter_and_binding(tree):
    config = _config('NerfMLP.net_width = 64')
    model = models.construct_model(config=config)
    with pytest.raises(convert_multinerf.MultinerfCheckpointError) as e:
        convert_multinerf.convert_state(tree, model, config, source=CKPT)
    msg = str(e.value)
    assert 'NerfMLP_0/Dense_0/kernel' in msg and '(72, 48)' in msg and 'NerfMLP.net_depth / net_width' in msg
    config = _config('PropMLP.net_depth = 2')
    with pytest.raises(convert_multinerf.MultinerfCheckpointError,
                       match=r'PropMLP_0/Dense_1/kernel has shape \(32, 1\) .*prop_mlp.trunk.1.weight has \(32, 32\)'):
        convert_multinerf.convert_state(tree, models.construct_model(config=config), config, source=CKPT)
    config = _config('Model.num_glo_features = 4')
    with pytest.raises(convert_multinerf.MultinerfCheckpointError, match=r'NerfMLP_0/Dense_4/kernel has shape \(51, 24\).*Model.num_glo_features'):
        convert_multinerf.convert_state(tree, models.construct_model(config=config), config, source=CKPT)


@pytest.mark.parametrize('case', ['missing', 'foreign', 'orbax', 'mismatch', 'not_empty'])
def test_user_errors_are_one_line(tmp_path, capsys, case):
    out = tmp_path / 'out'
    source, bindings = str(tmp_path / 'nothing'), ()
    if case == 'foreign':
        source = str(tmp_path / 'checkpoint_3')
        open(source, 'wb').write(b'\xc1 not msgpack at all')
    elif case == 'orbax':
        (tmp_path / 'checkpoint_7' / 'params').mkdir(parents=True)  # Per-array tensorstore layout.
        source = str(tmp_path)
    elif case == 'mismatch':
        source, bindings = CKPT, ('NerfMLP.net_width = 64',)
    elif case == 'not_empty':
        source = CKPT
        checkpoints.save_checkpoint(str(out), {'model': {}, 'step': 1}, 1)
    before = sorted(os.listdir(out)) if out.exists() else []
    flags = _flags(str(tmp_path), str(out), f'--multinerf_checkpoint={source}', bindings=bindings)
    if case == 'missing':  # Once through `python -m`, as a user runs it.
        proc = _subprocess('mipnerf360.convert_multinerf', *flags)
        code, stderr = proc.returncode, proc.stderr
    else:
        code = _in_process(convert_multinerf.run, flags)
        stderr = capsys.readouterr().err
    assert code == common.EXIT_USER_ERROR, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr
    expected = {'missing': 'does not exist', 'foreign': 'is not a multinerf (flax msgpack) checkpoint',
                'orbax': 'orbax checkpoint folder', 'mismatch': 'NerfMLP_0/Dense_0/kernel',
                'not_empty': 'already holds checkpoints'}[case]
    assert expected in lines[0]
    assert (sorted(os.listdir(out)) if out.exists() else []) == before
