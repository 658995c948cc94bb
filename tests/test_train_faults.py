"""Non-finite training steps: the finite-state guard of `train_step` (Config.nan_policy), checkpoints that refuse
NaN, and a real diverging `python -m train` run."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import syncguard
from mipnerf360 import checkpoints, configs, train_utils, utils
from mipnerf360.cli import common
from test_train_utils import _ring_scene, _tiny_model


@pytest.fixture(autouse=True)
def _no_gin_bindings():
    """In-process CLI tests leave gin bindings behind, and Config() would pick them up."""
    import gin
    gin.clear_config()


def _config(**kw):
    return configs.Config(lr_init=2e-3, lr_final=2e-3, max_steps=10, lr_delay_steps=0, **kw)


def _batch(nan=False):
    rays, rgb = _ring_scene([0.3, 2.0], res=4)
    if nan:
        rgb = rgb.clone()
        rgb[3, 1] = torch.nan
    return utils.Batch(rays=rays, rgb=rgb)


def _run(config, pattern):
    """Train steps on the batches of `pattern` ('.' finite, 'n' with a NaN target); returns the state."""
    state = train_utils.create_train_state(config, _tiny_model())
    for c in pattern:
        state, _ = train_utils.train_step(state, _batch(nan=c == 'n'), None, config, None, train_frac=0.5)
    return state


def _assert_same(a, b, adam=True):
    """Parameters and the whole Adam state (moments and step counts) bit-identical."""
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    if not adam:
        return
    sa, sb = a.optimizer.state_dict()['state'], b.optimizer.state_dict()['state']
    assert sa.keys() == sb.keys()
    for pid in sa:
        for name in sa[pid]:
            assert torch.equal(sa[pid][name], sb[pid][name]), (pid, name)


def test_stop_freezes_the_state_of_the_last_finite_step():
    config = _config()
    state = _run(config, '.n..')
    _assert_same(state, _run(config, '.'))
    report = state.guard.read()
    assert report.halted and report.streak_start == 2 and report.num_skipped == 1
    assert 'data loss' in report.streak_terms and 'gradient norm of nerf_mlp' in report.streak_terms
    assert 'interlevel loss' not in report.streak_terms  # The proposal loss does not see the targets.
    assert state.step == 4  # The host-side counter runs on; the model does not.


def test_skip_step_leaves_parameters_and_adam_state_unchanged():
    config = _config(nan_policy='skip_step')
    _assert_same(_run(config, '.n.'), _run(config, '..'))
    # A skipped first step leaves Adam's fresh state as it was (zero moments, zero count).
    first = _run(config, 'n')
    assert all(float(s['step']) == 0 and not s['exp_avg'].any() for s in first.optimizer.state.values())
    _assert_same(first, _run(config, ''), adam=False)
    _assert_same(_run(config, 'n.'), _run(config, '.'))
    report = _run(config, 'n.nn.').guard.read()
    assert not report.halted and report.num_skipped == 3 and report.skips_in_a_row == 0
    assert report.streak_start == 3


def test_skip_step_halts_after_max_in_a_row():
    config = _config(nan_policy='skip_step', nan_max_skips_in_a_row=2)
    state = _run(config, '.nn.')
    report = state.guard.read()
    assert report.halted and report.skips_in_a_row == 2 and report.streak_start == 2
    _assert_same(state, _run(config, '.'))
    assert not _run(config, '.n.n.').guard.read().halted


def test_robustnerf_threshold_kept_on_a_skipped_step():
    config = _config(nan_policy='skip_step', data_loss_type='robustnerf')
    assert torch.equal(_run(config, '.n').loss_threshold, _run(config, '.').loss_threshold)


def test_bad_policy_is_a_config_error():
    with pytest.raises(configs.ConfigError, match="nan_policy = 'ignore'"):
        train_utils.create_train_state(_config(nan_policy='ignore'), _tiny_model())
    with pytest.raises(configs.ConfigError, match='nan_max_skips_in_a_row = 0'):
        train_utils.create_train_state(_config(nan_max_skips_in_a_row=0), _tiny_model())


@pytest.mark.parametrize('field,bad', [('nan_policy', 'ignore'), ('nan_max_skips_in_a_row', 0),
                                       ('grad_accum_steps', 1.5), ('data_loss_type', 'l1'), ('lr_init', -1.),
                                       ('adam_beta1', 1.), ('seed', -1)])
def test_train_state_checks_its_fields_as_validate_config(field, bad):
    """A Config built without validate_config (tests, bench scripts) gets validate_config's own message."""
    config = dataclasses.replace(_config(), **{field: bad})
    with pytest.raises(configs.ConfigError) as from_config:
        configs.validate_config(config)
    with pytest.raises(configs.ConfigError) as from_state:
        train_utils.create_train_state(config, _tiny_model())
    assert str(from_state.value) == str(from_config.value)
    assert str(from_state.value).startswith(f'Config.{field} = {bad!r} must be ')
    assert set(configs.TRAIN_STATE_FIELDS) <= {f.name for f in dataclasses.fields(configs.Config)}


def test_train_state_needs_a_resolved_grad_accum_steps():
    with pytest.raises(configs.ConfigError, match=r"grad_accum_steps = 'auto' must be resolved .*resolve_grad_acc"):
        train_utils.create_train_state(_config(grad_accum_steps='auto'), _tiny_model())


def test_train_step_has_no_host_sync():
    config = _config(nan_policy='skip_step')
    states = [train_utils.create_train_state(config, _tiny_model()) for _ in range(2)]
    pattern = (False, True, False)  # Fresh Adam state, a skipped step, existing state.
    with syncguard.no_host_sync():
        for nan in pattern:
            states[0], _ = train_utils.train_step(states[0], _batch(nan), None, config,
                                                  states[0].step_generator('cpu'))
    for nan in pattern:
        states[1], _ = train_utils.train_step(states[1], _batch(nan), None, config, states[1].step_generator('cpu'))
    _assert_same(*states)
    assert states[0].guard.read().num_skipped == 1


def _nan_state(step):
    model = _tiny_model()
    sd = model.state_dict()
    name = next(k for k in sd if sd[k].is_floating_point())
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] = torch.nan
    return {'model': sd, 'optimizer': {}, 'step': step}, name


def test_save_checkpoint_refuses_non_finite_state(tmp_path):
    good = checkpoints.save_checkpoint(str(tmp_path), {'model': _tiny_model().state_dict(), 'step': 1}, 1, keep=1)
    state, name = _nan_state(2)
    with pytest.raises(checkpoints.CheckpointError, match=f'Refusing .*non-finite values in model/{name}'):
        checkpoints.save_checkpoint(str(tmp_path), state, 2, keep=1)
    assert checkpoints.list_checkpoints(str(tmp_path)) == [good]
    moments = {'model': {}, 'optimizer': {'state': {0: {'exp_avg': torch.tensor([torch.inf])}}}, 'step': 3}
    with pytest.raises(checkpoints.CheckpointError, match='optimizer/state/0/exp_avg'):
        checkpoints.save_checkpoint(str(tmp_path), moments, 3, keep=1)
    assert checkpoints.list_checkpoints(str(tmp_path)) == [good]


def test_restore_model_refuses_non_finite_weights(tmp_path):
    good = checkpoints.save_checkpoint(str(tmp_path), {'model': _tiny_model().state_dict(), 'step': 1}, 1, keep=0)
    state, name = _nan_state(2)
    bad = checkpoints.checkpoint_path(str(tmp_path), 2)
    torch.save(state, bad)  # As an older version could have written it.
    config = configs.Config(checkpoint_dir=str(tmp_path))
    with pytest.raises(checkpoints.CheckpointError) as e:
        common.restore_model(_tiny_model(), config, torch.device('cpu'))
    msg = str(e.value)
    assert bad in msg and name in msg and os.path.basename(good) in msg
    assert common.restore_model(_tiny_model(), config, torch.device('cpu'), path=good) == 1


def test_resume_loads_the_weights_once_and_names_bad_checkpoints(tmp_path, monkeypatch):
    """restore_model with a train state: the checkpoint's weights, Adam state and step, the weights loaded once;
    a checkpoint of another model, without optimizer state, or with another model's optimizer state is refused
    with its own message."""
    config = _config(checkpoint_dir=str(tmp_path))
    trained = _run(config, '..')
    path = checkpoints.save_checkpoint(str(tmp_path), trained.state_dict(), 2, keep=0)
    model = _tiny_model()
    with torch.no_grad():  # Not `trained.model`'s weights.
        for p in model.parameters():
            p.add_(1.)
    loads = []
    real_load = type(model).load_state_dict
    monkeypatch.setattr(type(model), 'load_state_dict', lambda m, *a, **k: loads.append(1) or real_load(m, *a, **k))
    state = train_utils.create_train_state(config, model)
    assert common.restore_model(model, config, torch.device('cpu'), train_state=state, path=path) == 2
    assert len(loads) == 1 and state.step == 2
    for k, v in trained.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    for pid, moments in trained.optimizer.state_dict()['state'].items():
        for name, v in moments.items():
            assert torch.equal(torch.as_tensor(state.optimizer.state_dict()['state'][pid][name]),
                               torch.as_tensor(v)), (pid, name)
    monkeypatch.undo()

    def refused(model, saved):
        bad = checkpoints.save_checkpoint(str(tmp_path / 'bad'), saved, 1, keep=0)
        with pytest.raises(checkpoints.CheckpointError) as e:
            common.restore_model(model, config, torch.device('cpu'), path=bad,
                                 train_state=train_utils.create_train_state(config, model))
        assert bad in str(e.value)
        return str(e.value)

    other = _tiny_model(prop_mlp_params=dict(net_depth=2, net_width=16, max_deg_point=3, basis_shape='octahedron',
                                             basis_subdivisions=1, disable_rgb=True))
    assert 'does not match this model' in refused(other, trained.state_dict())
    no_adam = {k: v for k, v in trained.state_dict().items() if k != 'optimizer'}
    assert 'has no optimizer state' in refused(_tiny_model(), no_adam)
    foreign = dict(trained.state_dict(), optimizer=train_utils.create_train_state(config, other).optimizer
                   .state_dict())
    assert 'optimizer state for another model' in refused(_tiny_model(), foreign)


def test_diverging_run_stops_with_one_line_and_keeps_good_checkpoints(tmp_path):
    from test_cli import REPO, TINY_GIN, _env, _flags
    from mipnerf360 import synthetic
    scene = tmp_path / 'scene'
    synthetic.write_colmap_scene(str(scene), n_views=16, width=64, height=48, factors=(2,), seed=0)
    gin_file = tmp_path / 'tiny.gin'
    gin_file.write_text(TINY_GIN.format(steps=30))
    diverge = ['Config.lr_init = 1e12', 'Config.lr_final = 1e12', 'Config.lr_delay_steps = 0',
               'Config.checkpoints_to_keep = 2']

    def train(ckpt, *bindings):
        return subprocess.run([sys.executable, '-m', 'train'] + _flags(str(gin_file), str(scene), str(ckpt),
                                                                       *diverge, *bindings),
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)

    # With lr 1e12 step 1 is finite and step 2's forward pass overflows.
    ckpt = tmp_path / 'stop'
    proc = train(ckpt, 'Config.checkpoint_every = 1', 'Config.print_every = 50')
    assert proc.returncode == common.EXIT_USER_ERROR, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    newest = checkpoints.checkpoint_path(str(ckpt), 1)
    assert len(lines) == 1 and 'step 2 went non-finite' in lines[0] and 'data loss' in lines[0], lines
    assert f'newest good checkpoint is {newest}' in lines[0]
    assert checkpoints.list_checkpoints(str(ckpt)) == [newest]
    assert not checkpoints.nonfinite_entries(checkpoints.load_checkpoint(newest))

    # skip_step: the same steps are skipped, counted and logged, then the run stops after 3 in a row.
    ckpt = tmp_path / 'skip'
    proc = train(ckpt, "Config.nan_policy = 'skip_step'", 'Config.nan_max_skips_in_a_row = 3',
                 'Config.checkpoint_every = 100', 'Config.print_every = 1')
    assert proc.returncode == common.EXIT_USER_ERROR, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and '3 non-finite steps in a row from step 2' in lines[0], lines
    assert 'newest good checkpoint is none' in lines[0]
    assert 'Skipped 1 non-finite update(s) by step 2 (1 in all' in proc.stdout
    assert checkpoints.list_checkpoints(str(ckpt)) == []


@pytest.mark.parametrize('fused', [True, False])
def test_guarded_optimizer_step_skips_or_applies_exactly(fused):
    """Fused Adam skips through its `found_inf`; the unfused one by restoring copies: both bit-exact."""
    def adam():
        p = torch.nn.Parameter(torch.arange(4, dtype=torch.float32))
        return p, torch.optim.Adam([p], lr=0.1, fused=fused)
    for apply in (True, False):
        p, opt = adam()
        ref_p, ref_opt = adam()
        for i in range(3):
            p.grad = ref_p.grad = torch.full((4,), 1. + i)
            skip_now = not apply and i == 1
            train_utils._guarded_optimizer_step(opt, torch.tensor(not skip_now))
            if not skip_now:
                ref_opt.step()
        assert torch.equal(p, ref_p)
        for name, v in ref_opt.state[ref_p].items():
            assert torch.equal(opt.state[p][name], v), (apply, name)
        assert not hasattr(opt, 'found_inf')
