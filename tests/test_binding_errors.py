"""Every gin-bindable field of `Model`, `NerfMLP` and `PropMLP`, bound to random or bad values: the model
that `common.build_model` builds renders a few rays (finite colours), or the binding is refused with one
ConfigError naming it; never another exception. Also the Config values that used to fail at the first step
(`llffhold`, tiny test images for SSIM)."""

from __future__ import annotations

import dataclasses
import math

import gin
import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from mipnerf360 import configs, coord, models, utils
from mipnerf360.cli import common

# A model small enough that one forward pass of a few rays takes milliseconds.
TINY = {
        'Model.num_levels': 2, 'Model.num_prop_samples': 4, 'Model.num_nerf_samples': 4,
        'NerfMLP.net_depth': 2, 'NerfMLP.net_width': 8, 'NerfMLP.bottleneck_width': 4,
        'NerfMLP.net_width_viewdirs': 4, 'NerfMLP.max_deg_point': 2, 'NerfMLP.deg_view': 1,
        'NerfMLP.basis_shape': 'octahedron', 'NerfMLP.basis_subdivisions': 1,
        'PropMLP.net_depth': 1, 'PropMLP.net_width': 4, 'PropMLP.max_deg_point': 2, 'PropMLP.disable_rgb': True,
        'PropMLP.basis_shape': 'octahedron', 'PropMLP.basis_subdivisions': 1,
}
MODEL_FIELDS = [f'Model.{f.name}' for f in dataclasses.fields(models.Model) if f.name != 'config']
MLP_FIELDS = [f'{cls}.{f.name}' for cls in ('NerfMLP', 'PropMLP') for f in dataclasses.fields(models.MLP)]

# Values a gin file could give any field: small and odd numbers, bools, names, None, containers, functions.
ANY_VALUE = st.one_of(
        st.integers(-2, 6), st.sampled_from([0.0, 0.5, 1.5, -1.0, math.nan, math.inf]), st.booleans(), st.none(),
        st.sampled_from(['cone', 'cylinder', 'x', '', 'piecewise', 'reciprocal', 'octahedron', 'icosahedron',
                         'glorot_uniform']),
        st.sampled_from([(0.0, 1.0), (1.0, 1.0), (1.0,), [], {}, {'net_depth': 1}, {'no_such_field': 1}]),
        st.sampled_from([torch.reciprocal, torch.exp, torch.sigmoid, coord.contract, print, len]))


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _rays(n=3):
    g = torch.Generator().manual_seed(0)
    viewdirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    ones = torch.ones(n, 1)
    return utils.Rays(origins=torch.rand(n, 3, generator=g) - 0.5, directions=viewdirs, viewdirs=viewdirs,
                      radii=0.01 * ones, imageplane=torch.rand(n, 2, generator=g), lossmult=ones, near=0.2 * ones,
                      far=10 * ones, cam_idx=torch.zeros(n, 1, dtype=torch.long))


def _build_and_render(bindings):
    """Builds the model `bindings` (on top of TINY) describe and renders a few rays, with and without noise;
    returns the final colours, or the ConfigError."""
    gin.clear_config()
    for name, value in {**TINY, **bindings}.items():
        gin.bind_parameter(name, value)
    try:
        model = common.build_model(configs.Config(), torch.device('cpu'))
    except configs.ConfigError as e:
        return e
    rays = _rays()
    model(torch.Generator().manual_seed(1), rays, train_frac=0.5, compute_extras=False)
    renderings, _ = model(None, rays, train_frac=0.5, compute_extras=True)
    return renderings[-1]['rgb']


def _check_outcome(bindings, out):
    if isinstance(out, configs.ConfigError):
        msg = str(out)
        assert '\n' not in msg
        # The message names one of the bindings.
        assert any(name in msg for name in bindings), (bindings, msg)
    else:
        assert out.shape == (3, 3) and torch.isfinite(out).all(), (bindings, out)


def _near_default(binding):
    """Values close to the field's default (most of which build a working model)."""
    cls, name = binding.split('.')
    default = {f.name: f.default for f in dataclasses.fields(models.Model if cls == 'Model' else models.MLP)}[name]
    default = TINY.get(binding, default)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-1, default + 2)
    if isinstance(default, float):
        return st.sampled_from([default, 0.0, default / 2, default + 0.25])
    return st.just(default)


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.data())
def test_random_bindings_render_or_raise_config_error(data):
    fields = data.draw(st.lists(st.sampled_from(MODEL_FIELDS + MLP_FIELDS), min_size=1, max_size=3, unique=True))
    bindings = {f: data.draw(st.one_of(_near_default(f), ANY_VALUE), label=f) for f in fields}
    _check_outcome(bindings, _build_and_render(bindings))


@pytest.mark.parametrize('binding, value, expected', [
        ('Model.ray_shape', 'x', "Model.ray_shape = 'x' must be one of 'cone', 'cylinder'"),
        ('Model.raydist_fn', 'cube', "Model.raydist_fn = 'cube' must be None, 'piecewise' or one of"),
        ('Model.raydist_fn', torch.sigmoid, 'Model.raydist_fn = <built-in method sigmoid'),
        ('Model.num_prop_samples', 1, 'Model.num_prop_samples = 1 must be an integer >= 2'),
        ('Model.num_nerf_samples', 0, 'Model.num_nerf_samples = 0 must be an integer >= 2'),
        ('Model.num_levels', 0, 'Model.num_levels = 0 must be an integer >= 1'),
        ('Model.near_anneal_rate', 0.0, 'Model.near_anneal_rate = 0.0 must be a finite number > 0'),
        ('Model.bg_intensity_range', 1.0, 'Model.bg_intensity_range = 1.0 must be two finite numbers'),
        ('Model.nerf_mlp_params', {'depth': 2}, 'Model.nerf_mlp_params has unknown MLP field(s) depth'),
        ('Model.single_jitter', 1, 'Model.single_jitter = 1 must be True or False'),
        ('NerfMLP.skip_layer', 0, 'NerfMLP.skip_layer = 0 must be an integer >= 1'),
        ('PropMLP.basis_shape', 'cube', "PropMLP.basis_shape = 'cube' must be one of 'icosahedron', 'octahedron'"),
        ('PropMLP.weight_init', 'zeros', "PropMLP.weight_init = 'zeros' must be one of 'he_uniform'"),
        ('NerfMLP.density_activation', 'relu', "NerfMLP.density_activation = 'relu' must be a function"),
        ('NerfMLP.min_deg_point', 2, 'NerfMLP.min_deg_point = 2 must be less than NerfMLP.max_deg_point = 2'),
        ('NerfMLP.density_noise', math.nan, 'NerfMLP.density_noise = nan must be a finite number >= 0'),
        ('NerfMLP.num_rgb_channels', 1, 'NerfMLP.num_rgb_channels = 1 must be 3'),
])
def test_bad_binding_names_binding_value_and_range(binding, value, expected):
    out = _build_and_render({binding: value})
    assert isinstance(out, configs.ConfigError)
    assert expected in str(out) and '\n' not in str(out), str(out)


@pytest.mark.parametrize('bindings, expected', [
        ({'Model.single_mlp': True, 'Model.num_glo_features': 2},
         'Model.single_mlp = True cannot be combined with Model.num_glo_features > 0'),
        ({'NerfMLP.use_n_dot_v': True, 'NerfMLP.disable_density_normals': True},
         'NerfMLP.use_n_dot_v needs normals: set NerfMLP.enable_pred_normals=True'),
        ({'NerfMLP.use_directional_enc': True}, 'NerfMLP.use_directional_enc (the IDE) needs a roughness'),
])
def test_inconsistent_bindings_name_both_fields(bindings, expected):
    out = _build_and_render(bindings)
    assert isinstance(out, configs.ConfigError) and expected in str(out), out


def test_ide_deg_view_limit_is_a_config_error():
    out = _build_and_render({'NerfMLP.use_directional_enc': True, 'NerfMLP.enable_pred_roughness': True,
                             'NerfMLP.deg_view': 6})
    assert isinstance(out, configs.ConfigError) and 'NerfMLP.deg_view = 6 must be at most 5' in str(out)


def test_defaults_and_edge_values_render_the_same_as_before():
    """Values at the edges of the accepted ranges still build and render (the checks reject nothing that ran)."""
    for bindings in ({}, {'Model.num_levels': 1}, {'NerfMLP.net_depth': 0}, {'Model.num_nerf_samples': 2},
                     {'Model.raydist_fn': 'piecewise'}, {'Model.raydist_fn': torch.reciprocal},
                     {'Model.ray_shape': 'cylinder'}, {'NerfMLP.bottleneck_width': 0},
                     {'Model.near_anneal_rate': 0.1, 'Model.near_anneal_init': 1.0}):
        out = _build_and_render(bindings)
        assert isinstance(out, torch.Tensor) and torch.isfinite(out).all(), (bindings, out)


def test_direct_construction_raises_config_error_and_math_functions_keep_value_error():
    with pytest.raises(configs.ConfigError, match="Model.ray_shape = 'x' must be one of 'cone', 'cylinder'"):
        models.Model(ray_shape='x')
    with pytest.raises(configs.ConfigError, match='MLP.skip_layer = 0 must be an integer >= 1'):
        models.MLP(skip_layer=0)
    # The math functions' own checks are programming errors, not user errors.
    from mipnerf360 import render, stepfun
    t = torch.linspace(0, 1, 5).expand(2, 5)
    with pytest.raises(ValueError) as info:
        render.cast_rays(t, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 1), 'x')
    assert not isinstance(info.value, configs.ConfigError)
    with pytest.raises(ValueError) as info:
        stepfun.sample_intervals(None, t, torch.zeros(2, 4), 1, single_jitter=True, domain=(0., 1.))
    assert not isinstance(info.value, configs.ConfigError)
    with pytest.raises(ValueError) as info:
        coord.construct_ray_warps('cube', torch.ones(1), torch.ones(1) * 2)
    assert not isinstance(info.value, configs.ConfigError)


def test_llffhold_zero_is_refused_at_load():
    with pytest.raises(configs.ConfigError, match='Config.llffhold = 0 must be an integer >= 1'):
        configs.load_config(save_config=False, gin_configs=[], gin_bindings=['Config.llffhold = 0'])


def test_metrics_on_images_smaller_than_the_ssim_window_name_the_factor():
    from mipnerf360 import image
    harness = image.MetricHarness(compute_lpips=False)
    g = torch.Generator().manual_seed(0)
    small = torch.rand(10, 30, 3, generator=g, dtype=torch.float64)
    with pytest.raises(configs.ConfigError, match=r'30x10 pixels, smaller than the 11-pixel SSIM window; use a '
                                                  r'smaller Config.factor'):
        harness(small, small)
    # 11 x 11 is the smallest size that works; identical images have SSIM 1.
    just = torch.rand(11, 11, 3, generator=g, dtype=torch.float64)
    assert harness(just, just)['ssim'] == pytest.approx(1.0, abs=1e-12)


def test_unknown_colormap_is_a_config_error():
    from mipnerf360 import vis
    with pytest.raises(configs.ConfigError, match="'no_such_map'"):
        vis.get_colormap('no_such_map')
    np.testing.assert_allclose(vis.get_colormap('gray')(np.array([0.25]))[..., :3], [[0.25] * 3], atol=1e-2)
