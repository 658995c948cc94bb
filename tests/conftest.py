"""Generated scenes shared by the dataset tests (test_scene.py, test_sampler.py), a gin reset between test
modules, and `keep_matmul_precision` (restores the process-level TF32 settings after a test)."""

import gin
import pytest
import torch

from mipnerf360 import synthetic
from scenes import N_VIEWS


@pytest.fixture(scope='session')
def colmap_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('llff'))
    return d, synthetic.write_colmap_scene(d, n_views=N_VIEWS, width=64, height=48, factors=(2, 4), seed=1)


@pytest.fixture(scope='session')
def multicam_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('multicam'))
    info = synthetic.write_colmap_scene(d, n_views=10, width=32, height=24, factors=(2,), multi_camera=True,
                                        camera_model='OPENCV', seed=2)
    return d, info


@pytest.fixture(autouse=True, scope='module')
def _no_gin_state_across_modules():
    """Every test module starts with no gin bindings and an unlocked config, whatever the module before it (or an
    in-process CLI run inside it) left behind."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def keep_matmul_precision():
    """Restores the process-level float32 matmul settings (`models.apply_precision` sets them) after the test, so
    that a test leaving TF32 on does not loosen the CUDA-vs-CPU comparisons of the tests after it."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])
