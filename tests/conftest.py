"""Generated scenes shared by the dataset tests (test_scene.py, test_sampler.py)."""

import pytest

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
