"""Gin configs: every shipped file parses and builds a model; bad bindings and out-of-range values fail with one
clear line naming the field, its value and the allowed range."""

import dataclasses
import glob
import math
import os

import gin
import hypothesis
import hypothesis.strategies as st
import pytest
import torch

from mipnerf360 import configs, coord, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.gin')))


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _num_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_all_reference_configs_are_shipped():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    for name in ['360.gin', '360_glo4.gin', '360_robustnerf.gin', 'blender_256.gin', 'blender_512.gin',
                 'blender_refnerf.gin', 'llff_256.gin', 'llff_512.gin', 'llff_raw.gin', 'tat.gin',
                 'render_config.gin', 'debug.gin', 'demo.gin']:
        assert name in names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_parses_and_builds(path, monkeypatch):
    monkeypatch.chdir(REPO)
    configs.parse_gin([path], [])
    config = configs.Config()
    with torch.device('meta'):  # Shapes only: building the 9M-parameter models costs no memory or time.
        model = models.Model(config=config)
    assert _num_params(model) > 0


def test_360_parameter_count_matches_reference(monkeypatch):
    monkeypatch.chdir(REPO)
    configs.parse_gin(['configs/360.gin'], [])
    with torch.device('meta'):
        model = models.Model(config=configs.Config())
    assert _num_params(model) == 9_007_493
    # Samples spaced linearly in disparity: halfway in s is the harmonic midpoint of near and far.
    _, s_to_t = coord.construct_ray_warps(model.raydist_fn, torch.tensor([0.2]), torch.tensor([1e6]))
    assert torch.allclose(s_to_t(torch.tensor([0.5])), torch.tensor([1 / (0.5 / 0.2 + 0.5 / 1e6)]))


def test_360_values(monkeypatch):
    monkeypatch.chdir(REPO)
    configs.parse_gin(['configs/360.gin'], ["Config.data_dir = '/x'"])
    c = configs.Config()
    assert (c.dataset_loader, c.near, c.far, c.factor, c.data_dir) == ('llff', 0.2, 1e6, 4, '/x')
    assert (c.batch_size, c.max_steps, c.lr_init, c.lr_final, c.adam_eps, c.grad_max_norm) == \
        (16384, 250000, 0.002, 0.00002, 1e-6, 0.001)


def test_misspelled_binding_is_a_clear_error():
    with pytest.raises(configs.ConfigError, match='Config.bach_size'):
        configs.parse_gin([], ['Config.bach_size = 3'])


@pytest.mark.parametrize('binding', ['Config.data_dir = /data/360_v2/garden', "Config.data_dir = '/data/garden",
                                     'Config.render_resolution = (64, 48'])
def test_unparseable_binding_is_named_with_the_quoting_fix(binding):
    """gin says only 'Unable to parse value. (line 3)'; the error names the binding and how to quote a string."""
    with pytest.raises(configs.ConfigError) as e:
        configs.parse_gin(['configs/360.gin'], ['Config.batch_size = 8', 'Model.raydist_fn = @jnp.reciprocal',
                                                binding])
    assert str(e.value).startswith(f'Bad gin binding {binding!r}: ')
    assert '--gin_bindings="Config.data_dir = \'/path/to/scene\'"' in str(e.value)


def test_misspelled_configurable_suggests_the_name():
    with pytest.raises(configs.ConfigError, match=r"No configurable matching 'NerfMPL'.*; did you mean NerfMLP\?$"):
        configs.parse_gin([], ['NerfMPL.net_width = 8'])
    with pytest.raises(configs.ConfigError, match=r"No configurable matching 'Zzyzx'[^;]*$"):
        configs.parse_gin([], ['Zzyzx.net_width = 8'])


def test_missing_gin_file_is_a_clear_error():
    with pytest.raises(configs.ConfigError, match='not found: nope.gin'):
        configs.parse_gin(['nope.gin'], [])


def test_config_gin_is_saved(tmp_path):
    configs.parse_gin([], ['Config.batch_size = 77', f"Config.checkpoint_dir = '{tmp_path}'"])
    configs.save_config_str(str(tmp_path))
    text = (tmp_path / 'config.gin').read_text()
    assert 'Config.batch_size = 77' in text


# ---------------------------------------------------------------------------------------------------------------
# Validation of the field values (configs.validate_config, called by load_config).


def test_defaults_and_every_shipped_config_validate(monkeypatch):
    monkeypatch.chdir(REPO)
    configs.validate_config(configs.Config())
    for path in CONFIG_FILES:
        gin.clear_config()
        configs.load_config(save_config=False, gin_configs=[path], gin_bindings=[])


def test_every_ranged_name_is_a_config_field():
    fields = {f.name for f in dataclasses.fields(configs.Config)}
    assert set(configs._RANGES) <= fields and set(configs._CHOICES) <= fields and set(configs._STRINGS) <= fields


@pytest.mark.parametrize('binding,expected', [
    ('Config.checkpoint_every = 0', 'Config.checkpoint_every = 0 must be an integer >= 1'),
    ('Config.print_every = 0', 'Config.print_every = 0 must be an integer >= 1'),
    ('Config.max_steps = 0', 'Config.max_steps = 0 must be an integer >= 1'),
    ('Config.lr_init = -0.001', 'Config.lr_init = -0.001 must be a finite number > 0'),
    ('Config.batch_size = 0', 'Config.batch_size = 0 must be an integer >= 1'),
    ('Config.batch_size = 16.5', 'Config.batch_size = 16.5 must be an integer'),
    ("Config.batch_size = '512'", "Config.batch_size = '512' must be an integer"),
    ('Config.factor = -1', 'Config.factor = -1 must be an integer >= 0'),
    ('Config.render_chunk_size = 0', 'Config.render_chunk_size = 0 must be an integer >= 1'),
    ('Config.near = -1.', 'Config.near = -1.0 must be a finite number >= 0'),
    ('Config.far = 1.', 'Config.far = 1.0 must be greater than Config.near = 2.0'),
    ('Config.checkpoints_to_keep = 0', 'Config.checkpoints_to_keep = 0 must be an integer >= 1'),
    ('Config.train_render_every = -1', 'Config.train_render_every = -1 must be an integer >= 0'),
    ('Config.lr_delay_mult = 1.5', 'Config.lr_delay_mult = 1.5 must be a finite number in [0.0, 1.0]'),
    ('Config.adam_beta2 = 1.', 'Config.adam_beta2 = 1.0 must be a finite number in [0.0, 1.0)'),
    ('Config.robustnerf_inlier_quantile = -0.1', 'robustnerf_inlier_quantile = -0.1 must be a finite number in'),
    ('Config.render_video_crf = 52', 'Config.render_video_crf = 52 must be an integer in [0, 51]'),
    ('Config.render_job_id = 1', 'Config.render_job_id = 1 must be in [0, Config.render_num_jobs = 1)'),
    ("Config.data_loss_type = 'l2'",
     "Config.data_loss_type = 'l2' must be one of 'mse', 'charb', 'rawnerf', 'robustnerf'"),
    ("Config.render_camtype = 'ortho'", "Config.render_camtype = 'ortho' must be one of"),
    ('Config.randomized = 1', 'Config.randomized = 1 must be True or False'),
    ('Config.data_dir = 3', 'Config.data_dir = 3 must be a string'),
    ('Config.render_resolution = (640, 0)', 'Config.render_resolution = (640, 0) must be None or (width, height)'),
    ('Config.gc_every = 100', 'Config.gc_every = 100 has no effect in this port'),
    ('Config.enable_robustnerf_loss = True',
     'Config.robustnerf_inner_patch_size = 8 must not exceed Config.patch_size = 1'),
])
def test_out_of_range_binding_names_field_value_and_range(binding, expected):
    with pytest.raises(configs.ConfigError) as e:
        configs.load_config(save_config=False, gin_configs=[], gin_bindings=[binding])
    assert expected in str(e.value)


def test_bounds_are_inclusive_where_documented():
    ok = dict(factor=0, near=0., train_render_every=0, lr_delay_mult=0., adam_beta1=0., render_video_crf=51,
              eval_render_interval=0, max_steps=1, checkpoint_every=1, lr_final=1e-30, lr_init=1e-9,
              render_dist_percentile=0., exposure_percentile=100., early_exit_steps=None, render_focal=None,
              render_resolution=(3, 2), z_variation=-2.)
    configs.validate_config(configs.Config(**ok))
    # lr_final > lr_init is allowed (a rising schedule is unusual, not wrong).
    configs.validate_config(configs.Config(lr_init=1e-4, lr_final=1e-2))


_NUMERIC_FIELDS = sorted(configs._RANGES)
_ANY_VALUE = st.one_of(st.integers(-2**64, 2**64), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                       st.none(), st.text(max_size=3), st.tuples(st.integers(-2, 5), st.integers(-2, 5)))


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.dictionaries(st.sampled_from(_NUMERIC_FIELDS + ['render_resolution', 'batching']), _ANY_VALUE,
                                  min_size=1, max_size=3))
def test_random_values_are_valid_or_a_config_error(values):
    config = configs.Config(**values)
    try:
        configs.validate_config(config)
    except configs.ConfigError as e:
        assert str(e).startswith('Config.') and any(f'Config.{k}' in str(e) for k in values)
        return
    # Accepted: each value is of the field's kind and finite where it is a number.
    for k, v in values.items():
        if k in configs._RANGES and v is not None:
            assert not isinstance(v, bool) and math.isfinite(v)
            kind, lo, hi = configs._RANGES[k][:3]
            assert (lo is None or v >= lo) and (hi is None or v <= hi)
            assert kind == 'float' or isinstance(v, int)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.sampled_from(_NUMERIC_FIELDS),
                  st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)))
def test_random_bindings_through_load_config(field, value):
    gin.clear_config()
    try:
        configs.load_config(save_config=False, gin_configs=[], gin_bindings=[f'Config.{field} = {value!r}'])
    except configs.ConfigError as e:
        assert f'Config.{field}' in str(e) or 'Bad gin config or binding' in str(e)


def test_includes_resolve_when_run_from_another_folder(tmp_path, monkeypatch):
    """`python /path/to/repo/train.py --gin_configs=/path/to/repo/configs/demo.gin` run from elsewhere: the
    repository root is then first on sys.path, so gin's package lookup for demo.gin's `include
    'configs/360.gin'` meets configs/ as a file-less package; the include still resolves from the root."""
    repo = os.path.dirname(configs.__file__).rsplit(os.sep, 1)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(repo)
    gin.clear_config()
    try:
        configs.parse_gin([os.path.join(repo, 'configs', 'demo.gin')], [])
        assert gin.query_parameter('Config.far') == 1e6  # From 360.gin.
        assert gin.query_parameter('Config.max_steps') == 1500  # From demo.gin.
    finally:
        gin.clear_config()
