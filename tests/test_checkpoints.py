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


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_training_lock_between_two_processes(tmp_path):
    """A second trainer is refused naming the first (pid, host); a lock left by a killed trainer is taken
    over with a message; a released lock is free."""
    import socket
    import time
    from test_cli import REPO, TINY_GIN, _env, _flags
    d = tmp_path / 'ckpt'
    d.mkdir()
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time\nfrom mipnerf360 import checkpoints\n'
         f'lock = checkpoints.TrainingLock({str(d)!r})\nprint(lock.acquire(), flush=True)\ntime.sleep(120)\n'],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == 'None'
        owner = f'pid {holder.pid} on host {socket.gethostname()}'
        with pytest.raises(checkpoints.CheckpointError, match=owner):
            checkpoints.TrainingLock(str(d)).acquire()
        # The real command: one line naming the holder, before anything is written.
        gin_file = tmp_path / 'tiny.gin'
        gin_file.write_text(TINY_GIN.format(steps=2))
        t0 = time.time()
        proc = subprocess.run([sys.executable, '-m', 'train'] + _flags(str(gin_file), str(tmp_path), str(d)),
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and time.time() - t0 < 60
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and owner in lines[0] and 'Config.checkpoint_dir' in lines[0], lines
        assert sorted(os.listdir(d)) == [checkpoints.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    lock = checkpoints.TrainingLock(str(d))
    msg = lock.acquire()
    assert f'pid {holder.pid} on host {socket.gethostname()}' in msg and 'Took over' in msg
    assert (d / checkpoints.LOCK_NAME).read_text().split() == [str(os.getpid()), socket.gethostname()]
    lock.release()
    assert checkpoints.TrainingLock(str(d)).acquire() is None


def test_stale_temp_cleanup_spares_live_writers(tmp_path):
    import socket
    host, dead = socket.gethostname(), _dead_pid()
    names = {'live': f'checkpoint_00000005.pt.tmp{os.getpid()}@{host}',
             'dead': f'checkpoint_00000005.pt.tmp{dead}@{host}',
             'dead_old_style': f'checkpoint_00000004.pt.tmp{dead}',
             'other_host': f'checkpoint_00000005.pt.tmp{dead}@not-{host}'}
    for name in names.values():
        (tmp_path / name).write_bytes(b'partial')
    checkpoints.save_checkpoint(str(tmp_path), _state(1), 1)
    left = set(os.listdir(tmp_path))
    assert names['live'] in left and names['other_host'] in left
    assert names['dead'] not in left and names['dead_old_style'] not in left


def _flip_tensor_byte(path, entry=0, offset=5):
    """Flips one bit of one byte inside the raw data of the `entry`-th tensor storage of a saved file."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = [i for i in z.infolist() if '/data/' in i.filename][entry]
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size > offset
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), 'little') for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len + offset)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def test_checksum_detects_a_flipped_byte_and_names_the_older_checkpoint(tmp_path):
    d = str(tmp_path)
    paths = [checkpoints.save_checkpoint(d, _state(step, float(step)), step, keep=0) for step in (1, 2, 3)]
    _flip_tensor_byte(paths[2])
    # torch itself does not notice: the tensor just holds another value.
    raw = torch.load(paths[2], weights_only=True)
    assert not torch.equal(raw['model']['w'], torch.full((4,), 3.)) and raw['checksum'].startswith('sha256:')
    with pytest.raises(checkpoints.ChecksumError) as e:
        checkpoints.load_checkpoint(paths[2])
    msg = str(e.value)
    assert paths[2] in msg and 'newest intact older checkpoint is ' + paths[1] in msg and 'resume_fallback' in msg
    _flip_tensor_byte(paths[1])
    with pytest.raises(checkpoints.ChecksumError, match='older checkpoint is ' + paths[0]):
        checkpoints.load_checkpoint(paths[2])
    path, state, passed_over = checkpoints.load_newest_intact(d)
    assert path == paths[0] and state['step'] == 1 and 'checksum' not in state
    assert [m.split(':')[0] for m in passed_over] == [f'Passing over {paths[2]}', f'Passing over {paths[1]}']


def test_checkpoint_without_checksum_still_loads(tmp_path):
    path = str(tmp_path / 'checkpoint_00000004.pt')
    torch.save(_state(4, 2.0), path)  # As written before checksums existed.
    assert torch.equal(checkpoints.load_checkpoint(path)['model']['w'], torch.full((4,), 2.))


def test_resume_with_a_corrupt_newest_checkpoint(tmp_path):
    """The real command: refused with one line naming the file and the older checkpoint; resumed from that one
    with Config.resume_fallback = True."""
    from mipnerf360 import synthetic
    from test_cli import REPO, TINY_GIN, _env, _flags
    scene, ckpt, gin_file = tmp_path / 'scene', tmp_path / 'ckpt', tmp_path / 'tiny.gin'
    synthetic.write_colmap_scene(str(scene), n_views=16, width=64, height=48, factors=(2,), seed=0)
    gin_file.write_text(TINY_GIN.format(steps=3))

    def train(*bindings):
        return subprocess.run([sys.executable, '-m', 'train'] + _flags(str(gin_file), str(scene), str(ckpt),
                                                                       'Config.checkpoint_every = 1', *bindings),
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)

    assert train('Config.early_exit_steps = 2').returncode == 0
    first, second = checkpoints.list_checkpoints(str(ckpt))
    _flip_tensor_byte(second, entry=3, offset=17)
    proc = train()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and second in lines[0] and f'older checkpoint is {first}' in lines[0], lines
    assert checkpoints.list_checkpoints(str(ckpt)) == [first, second]
    proc = train('Config.resume_fallback = True')
    assert proc.returncode == 0, proc.stderr
    assert f'Passing over {second}' in proc.stdout and 'steps 2..3' in proc.stdout
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(str(ckpt)))['step'] == 3
