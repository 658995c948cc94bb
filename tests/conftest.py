"""Generated scenes shared by the dataset tests (test_scene.py, test_sampler.py), test_cli's tiny trained model
(shared with test_export.py), a gin reset between test modules, `keep_matmul_precision` (restores the
process-level TF32 settings after a test), and the order in which `-n 2 --dist loadfile` hands files to workers."""

import collections
import os
import time
from typing import NamedTuple

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


class TinyRun(NamedTuple):
    root: object  # pathlib.Path holding scene/, tiny.gin and exp/ckpt
    ckpt: object  # root / 'exp' / 'ckpt'
    train: object  # the CompletedProcess of `python -m train`
    seconds: float


@pytest.fixture(scope='session')
def tiny_360_run(tmp_path_factory):
    """test_cli's tiny 360 model trained with `python -m train` (test_cli.TRAIN_STEPS steps) on its 16-view scene.
    test_cli checks this training and then evaluates and renders the checkpoint; test_export only needs a
    trained model. Both files go to the same xdist worker (`_SAME_WORKER`), so it is trained once."""
    from test_cli import TINY_GIN, TRAIN_STEPS, _check_ok, _cli  # pylint: disable=import-outside-toplevel
    root = tmp_path_factory.mktemp('cli')
    synthetic.write_colmap_scene(str(root / 'scene'), n_views=16, width=64, height=48, factors=(2,), seed=0)
    (root / 'tiny.gin').write_text(TINY_GIN.format(steps=TRAIN_STEPS))
    ckpt = root / 'exp' / 'ckpt'
    t0 = time.time()
    train = _cli('train', str(root / 'tiny.gin'), str(root / 'scene'), str(ckpt))
    _check_ok(train)
    return TinyRun(root, ckpt, train, time.time() - t0)


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


# -- Scheduling under `pytest -n 2 --dist loadfile` (make test). ------------------------------------------------
# xdist hands out whole files, by default those with the most tests first, which puts the few-test end-to-end
# files (each a minute or two of training) last: one worker was left alone with them at the end. Instead the
# files start longest first. Seconds per file, all its tests and fixtures, from `make test --durations=0` on the
# 2-core machine (2026-12-01; the machine was shared, so they are relative costs); the files not named take a
# few seconds each and keep their order after these. A passing run stores what it measured in pytest's cache
# (.pytest_cache), and later runs in the same checkout order by those figures (a new slow file included).
_SECONDS = {
    'test_cli.py': 162, 'test_e2e_rawnerf.py': 109, 'test_colmap_binary.py': 106, 'test_e2e_robustnerf.py': 104,
    'test_export.py': 89, 'test_photos.py': 85, 'test_sfm_training.py': 80, 'test_e2e_refnerf.py': 78,
    'test_ddp.py': 54, 'test_viewer.py': 54, 'test_memory.py': 46, 'test_e2e_glo.py': 44, 'test_cli_faults.py': 40,
    'test_fake_cuda.py': 35, 'test_colmap.py': 33, 'test_photos_steps.py': 32, 'test_train_faults.py': 30,
    'test_compile.py': 30, 'test_checkpoints.py': 29, 'test_convert_multinerf.py': 27, 'test_train_utils.py': 24,
}
# Files that share a session fixture run on one worker (one work unit), so that the fixture runs once.
_SAME_WORKER = {'test_export.py': 'test_cli.py'}  # tiny_360_run


_CACHE_KEY = 'mipnerf360/seconds_per_file'
_measured = collections.defaultdict(float)


def _seconds_per_file(config):
    cache = getattr(config, 'cache', None)  # None with -p no:cacheprovider.
    return {**_SECONDS, **(cache.get(_CACHE_KEY, {}) if cache is not None else {})}


def _unit(path):
    """The work unit (a test file's name) that the test file at `path` belongs to."""
    name = os.path.basename(path)
    return _SAME_WORKER.get(name, name)


def _unit_seconds(unit, seconds):
    return seconds.get(unit, 0) + sum(seconds.get(f, 0) for f, u in _SAME_WORKER.items() if u == unit)


def pytest_collection_modifyitems(config, items):
    """On an xdist worker: the files of a work unit together, the units longest first (a stable sort, so the
    tests of a file keep their order). The scheduler below keeps this order."""
    if not hasattr(config, 'workerinput'):
        return
    seconds = _seconds_per_file(config)
    items.sort(key=lambda item: -_unit_seconds(_unit(str(item.path)), seconds))


def pytest_runtest_logreport(report):
    """On the controller (or a run without xdist): the seconds of each file's setups, calls and teardowns."""
    if 'PYTEST_XDIST_WORKER' not in os.environ:
        _measured[os.path.basename(report.nodeid.split('::', 1)[0])] += report.duration


def pytest_sessionfinish(session, exitstatus):
    cache = getattr(session.config, 'cache', None)
    if exitstatus == 0 and _measured and cache is not None and 'PYTEST_XDIST_WORKER' not in os.environ:
        cache.set(_CACHE_KEY, {**cache.get(_CACHE_KEY, {}), **{f: round(t, 1) for f, t in _measured.items()}})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption('dist') != 'loadfile':
        return None
    from xdist.scheduler import LoadFileScheduling  # pylint: disable=import-outside-toplevel

    class LongestFirst(LoadFileScheduling):
        """loadfile with `_SAME_WORKER`'s files in one unit, handed out in the workers' collection order."""

        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return os.path.join(os.path.dirname(path), _unit(path))

    config.option.loadscopereorder = False  # Keep the collection order (longest first), not the most tests first.
    return LongestFirst(config, log)
