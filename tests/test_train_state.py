"""train_utils.TrainState: what a checkpoint holds, and checkpoints written before TrainState existed.

tests/data/old_layout/checkpoint_00000002.pt was written by the code before TrainState (two RobustNeRF steps of
`test_train_utils._tiny_model` on `_ring_scene([0.3], res=4)`, lr 2e-3): keys 'model', 'optimizer', 'step',
'seed', 'robustnerf_loss_threshold'.
"""

import os

import pytest
import torch

from mipnerf360 import checkpoints, configs, train_utils, utils
from test_train_utils import _ring_scene, _tiny_model

OLD = os.path.join(os.path.dirname(__file__), 'data', 'old_layout', 'checkpoint_00000002.pt')


@pytest.fixture(autouse=True)
def _no_gin_bindings():
    """In-process CLI tests leave gin bindings behind, and Config() would pick them up."""
    import gin
    gin.clear_config()


def _config(**kw):
    return configs.Config(lr_init=2e-3, lr_final=2e-3, max_steps=10, lr_delay_steps=0, data_loss_type='robustnerf',
                          **kw)


def _batch():
    rays, rgb = _ring_scene([0.3], res=4)
    return utils.Batch(rays=rays, rgb=rgb)


def test_old_checkpoint_loads_into_train_state():
    old = torch.load(OLD, weights_only=True)
    assert set(old) == {'model', 'optimizer', 'step', 'seed', 'robustnerf_loss_threshold'}
    state = train_utils.create_train_state(_config(), _tiny_model())
    state.load_state_dict(checkpoints.load_checkpoint(OLD))
    assert state.step == 2 and state.seed == old['seed']
    assert float(state.loss_threshold) == pytest.approx(float(old['robustnerf_loss_threshold']), abs=0)
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, old['model'][k]), k
    for pid, s in state.optimizer.state_dict()['state'].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(old['optimizer']['state'][pid][name]))
    # Written back, the dict has the old layout and values.
    again = state.state_dict()
    assert set(again) == set(old)
    assert torch.equal(again['robustnerf_loss_threshold'], old['robustnerf_loss_threshold'])


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    """Two steps straight == one step, save, load into a fresh state, one step; the RobustNeRF threshold of step
    1 is used by step 2 in both."""
    config = _config()
    straight = train_utils.create_train_state(config, _tiny_model())
    for _ in range(2):
        straight, _ = train_utils.train_step(straight, _batch(), None, config, straight.step_generator('cpu'))
    first = train_utils.create_train_state(config, _tiny_model())
    first, _ = train_utils.train_step(first, _batch(), None, config, first.step_generator('cpu'))
    assert isinstance(first.loss_threshold, torch.Tensor) and float(first.loss_threshold) != 1.0
    path = checkpoints.save_checkpoint(str(tmp_path), first.state_dict(), first.step)
    resumed = train_utils.create_train_state(config, _tiny_model())
    resumed.load_state_dict(checkpoints.load_checkpoint(path))
    assert resumed.step == 1
    resumed, _ = train_utils.train_step(resumed, _batch(), None, config, resumed.step_generator('cpu'))
    assert resumed.step == straight.step == 2
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(straight.loss_threshold, resumed.loss_threshold)


def test_step_generator_is_a_function_of_seed_step_rank():
    def draw(seed, step, rank):
        return torch.rand(4, generator=train_utils.step_generator('cpu', seed, step, rank))
    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    assert not torch.equal(draw(1, 5, 0), draw(1, 6, 0))
    assert not torch.equal(draw(1, 5, 0), draw(1, 5, 1))
    assert not torch.equal(draw(1, 5, 0), draw(2, 5, 0))
    state = train_utils.create_train_state(configs.Config(seed=3), _tiny_model())
    state.step = 4  # The next step is 5.
    assert torch.equal(torch.rand(4, generator=state.step_generator('cpu', rank=1)), draw(3, 5, 1))
