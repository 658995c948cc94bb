"""Gin configs: every shipped file parses and builds a model; bad bindings fail with one clear line."""

import glob
import os

import gin
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


def test_missing_gin_file_is_a_clear_error():
    with pytest.raises(configs.ConfigError, match='not found: nope.gin'):
        configs.parse_gin(['nope.gin'], [])


def test_config_gin_is_saved(tmp_path):
    configs.parse_gin([], ['Config.batch_size = 77', f"Config.checkpoint_dir = '{tmp_path}'"])
    configs.save_config_str(str(tmp_path))
    text = (tmp_path / 'config.gin').read_text()
    assert 'Config.batch_size = 77' in text
