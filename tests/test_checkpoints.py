"""Checkpoint files: atomic writes, retention, corrupt-file errors, no partial newest file."""

import os
import subprocess
import sys

import pytest
import torch

from mipnerf360 import checkpoints


def _state(step, value=1.0):
    return {'model': {'w': torch.full((4,), value)}, 'optimizer': {}, 'step': step}


def test_round_trip_and_retention(tmp_path):
    d = str(tmp_path / 'ckpt')
    for step in [10, 20, 30, 40]:
        checkpoints.save_checkpoint(d, _state(step, float(step)), step, keep=2)
    files = checkpoints.list_checkpoints(d)
    assert [checkpoints.step_of(f) for f in files] == [30, 40]
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(d))
    assert state['step'] == 40
    assert torch.equal(state['model']['w'], torch.full((4,), 40.))
    assert not [n for n in os.listdir(d) if '.tmp' in n]


def test_steps_sort_numerically(tmp_path):
    d = str(tmp_path)
    for step in [9, 100000, 1000]:
        checkpoints.save_checkpoint(d, _state(step), step, keep=0)
    assert checkpoints.step_of(checkpoints.latest_checkpoint(d)) == 100000


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    d = str(tmp_path)
    path = checkpoints.save_checkpoint(d, _state(5), 5)
    with open(path, 'r+b') as f:
        f.truncate(40)
    with pytest.raises(checkpoints.CheckpointError, match='corrupt'):
        checkpoints.load_checkpoint(path)


def test_foreign_file_rejected(tmp_path):
    path = tmp_path / 'checkpoint_00000007.pt'
    torch.save({'something': torch.zeros(1)}, path)
    with pytest.raises(checkpoints.CheckpointError, match='not written by mipnerf360'):
        checkpoints.load_checkpoint(str(path))


def test_checkpoint_dir_that_is_a_file(tmp_path):
    f = tmp_path / 'afile'
    f.write_text('keep me')
    with pytest.raises(checkpoints.CheckpointError, match='existing file'):
        checkpoints.save_checkpoint(str(f), _state(1), 1)
    assert f.read_text() == 'keep me'


def test_killed_writer_never_leaves_partial_newest(tmp_path):
    """A process killed while writing a big checkpoint leaves the previous newest checkpoint loadable."""
    d = str(tmp_path)
    checkpoints.save_checkpoint(d, _state(1), 1)
    script = (
        'import torch, sys\n'
        'from mipnerf360 import checkpoints\n'
        f'checkpoints.save_checkpoint({d!r}, {{"model": {{"w": torch.zeros(60_000_000)}}, "step": 2}}, 2)\n')
    proc = subprocess.Popen([sys.executable, '-c', script])
    # Kill it while it is (very likely) in the middle of writing 240 MB.
    deadline = 200
    import time
    for _ in range(deadline):
        time.sleep(0.05)
        if any('.tmp' in n for n in os.listdir(d)):
            break
    proc.kill()
    proc.wait()
    newest = checkpoints.latest_checkpoint(d)
    state = checkpoints.load_checkpoint(newest)  # Must not raise: either step 1 or a complete step 2.
    assert state['step'] in (1, 2)
