"""Checkpoints: atomic writes, newest-first discovery, safe loading.

A checkpoint is one file `checkpoint_<step:08d>.pt` holding a dict of tensors and plain Python values
(model and optimizer state dicts, step, config seed, ...). It is written to a temporary file in the same
folder, flushed to disk and renamed, so a run killed at any moment leaves either the previous checkpoint or
the new one, never a partial newest file. Loading uses `torch.load(weights_only=True)`.

Every checkpoint stores the sha256 of its contents (`payload_digest`, key 'checksum'), verified at load; one
without it (written before checksums) loads as it is. A state holding NaN or inf is never written. A training
run holds `TrainingLock` on its checkpoint_dir; temp files are named `.tmp<pid>@<host>` so that only those of
dead writers are cleaned up.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import socket
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mipnerf360 import utils

_PATTERN = re.compile(r'^checkpoint_(\d+)\.pt$')
_TEMP_OWNER = re.compile(r'\.pt\.tmp(\d+)(?:@(.*))?$')  # checkpoint_<step>.pt.tmp<pid>@<host>
LOCK_NAME = 'train.lock'
CHECKSUM_KEY = 'checksum'

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; training runs unlocked.
    fcntl = None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written (the message names the file and what to do)."""


class ChecksumError(CheckpointError):
    """A checkpoint whose contents differ from the checksum stored when it was written."""


def payload_digest(state: Mapping[str, Any]) -> str:
    """'sha256:<hex>' of a checkpoint's contents: every key, plain value, and tensor (dtype, shape and bytes),
    in key order; the same before saving and after loading, on any device."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f'T{t.dtype}{tuple(t.shape)}:'.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, Mapping):
            h.update(b'{')
            for k in sorted(x, key=repr):
                if k != CHECKSUM_KEY:
                    h.update(f'{k!r}:'.encode())
                    visit(x[k])
            h.update(b'}')
        elif isinstance(x, (list, tuple)):
            h.update(b'[')
            for v in x:
                visit(v)
            h.update(b']')
        else:
            h.update(f'{x!r};'.encode())

    visit(state)
    return 'sha256:' + h.hexdigest()


def checkpoint_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f'checkpoint_{step:08d}.pt')


def list_checkpoints(checkpoint_dir: str) -> List[str]:
    """Checkpoint files in `checkpoint_dir`, oldest first (by step)."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        m = _PATTERN.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(checkpoint_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(checkpoint_dir)
    return ckpts[-1] if ckpts else None


def step_of(path: str) -> int:
    m = _PATTERN.match(os.path.basename(path))
    if not m:
        raise CheckpointError(f'{path} is not named like a checkpoint (checkpoint_<step>.pt).')
    return int(m.group(1))


def ensure_dir(checkpoint_dir: str):
    """Creates `checkpoint_dir`, with a clear error when it names a file or cannot be written."""
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f'Config.checkpoint_dir = {checkpoint_dir!r} is an existing file, not a directory; '
                                                    'choose another path.')
    try:
        os.makedirs(checkpoint_dir, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f'Cannot create checkpoint_dir {checkpoint_dir!r}: {e.strerror}; '
                                                    'choose a writable path.') from None
    if not os.access(checkpoint_dir, os.W_OK):
        raise CheckpointError(f'checkpoint_dir {checkpoint_dir!r} is not writable; choose a writable path.')


def _fsync_dir(directory: str):
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _float_tensors(tree: Any, prefix: str = '') -> List[Tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)] if tree.is_floating_point() or tree.is_complex() else []
    if isinstance(tree, Mapping):
        return [e for k, v in tree.items() for e in _float_tensors(v, f'{prefix}/{k}' if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [e for i, v in enumerate(tree) for e in _float_tensors(v, f'{prefix}/{i}')]
    return []


def nonfinite_entries(tree: Any) -> List[str]:
    """The '/'-joined key paths of the floating-point tensors in `tree` holding a NaN or an infinity."""
    entries = _float_tensors(tree)
    if not entries:
        return []
    by_device: Dict[torch.device, List[int]] = {}
    for i, (_, t) in enumerate(entries):
        by_device.setdefault(t.device, []).append(i)
    finite = [True] * len(entries)
    for indices in by_device.values():  # One device-to-host copy per device, not one per tensor.
        flags = torch.stack([torch.isfinite(entries[i][1]).all() for i in indices]).cpu().tolist()
        for i, ok in zip(indices, flags):
            finite[i] = ok
    return [name for (name, _), ok in zip(entries, finite) if not ok]


def _describe(names: Sequence[str]) -> str:
    return ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')


def require_finite(state: Mapping[str, Any], path: str, keys: Sequence[str] = ('model',)):
    """Raises CheckpointError naming `path` when the entries `keys` of a loaded checkpoint hold NaN or inf."""
    bad = nonfinite_entries({k: state[k] for k in keys if k in state})
    if bad:
        raise CheckpointError(f'Checkpoint {path} holds non-finite values ({_describe(bad)}), so it cannot be '
                              f'used; {_fallback_advice(path)}.')


def save_checkpoint(checkpoint_dir: str, state: Dict[str, Any], step: int, keep: int = 3) -> str:
    """Atomically writes `state` as the checkpoint of `step`; keeps the newest `keep` checkpoints (0 = all).

    A state holding NaN or inf is refused (CheckpointError, nothing on disk changes), so the checkpoints that
    rotation keeps are always finite ones.
    """
    ensure_dir(checkpoint_dir)
    path = checkpoint_path(checkpoint_dir, step)
    bad = nonfinite_entries(state)
    if bad:
        raise CheckpointError(f'Refusing to write checkpoint {path}: non-finite values in {_describe(bad)}; the '
                              'checkpoints on disk are unchanged.')
    state = dict(state)
    state[CHECKSUM_KEY] = payload_digest(state)
    tmp = f'{path}.tmp{os.getpid()}@{socket.gethostname()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(checkpoint_dir)
    except OSError as e:
        raise CheckpointError(f'Could not write checkpoint {path}: {e.strerror}; earlier checkpoints are '
                              'intact. Free some space or choose another Config.checkpoint_dir.') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if keep > 0:
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            os.remove(old)
    _remove_stale_temps(checkpoint_dir)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's process.
        return True
    return True


def _remove_stale_temps(checkpoint_dir: str):
    """Removes temp files left by writers killed mid-write: those of dead processes on this host. A live
    writer's temp file, or one from another host (whose processes cannot be checked), is left alone."""
    host = socket.gethostname()
    for tmp in glob.glob(os.path.join(checkpoint_dir, 'checkpoint_*.pt.tmp*')):
        m = _TEMP_OWNER.search(tmp)
        if m is None or (m.group(2) or host) != host or pid_alive(int(m.group(1))):
            continue
        try:
            os.remove(tmp)
        except OSError:
            pass


class TrainingLock:
    """An exclusive lock on a checkpoint_dir for the whole of a training run: `train.lock` holds
    '<pid> <host>' and an advisory `flock`, which the OS releases when the process dies however it dies.

    `acquire` raises CheckpointError naming the running trainer when another process holds it; a lock file left
    by a dead trainer (the flock is free but the file still names it) is taken over, and `acquire` returns a
    message saying so. `release` empties the file and unlocks it.
    """

    def __init__(self, checkpoint_dir: str):
        self.path = os.path.join(checkpoint_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        if fcntl is None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 256, 0).decode(errors='replace').split()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return f'Could not lock {self.path} ({e.strerror}); make sure no other run trains here.'
            pid, host = (owner + ['?', '?'])[:2]
            raise CheckpointError(f'Another training run (pid {pid} on host {host}) is using this '
                                  f'checkpoint_dir ({self.path} is locked); wait for it to finish or stop it, or '
                                  'choose another Config.checkpoint_dir.') from None
        previous = os.pread(fd, 256, 0).decode(errors='replace').split()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if len(previous) >= 2:
            return (f'Took over the lock {self.path} of pid {previous[0]} on host {previous[1]}, which no longer '
                    'holds it (it ended without releasing it).')
        return None

    def release(self):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _fallback_advice(path: str) -> str:
    """What to do about an unusable checkpoint `path`: delete it and fall back to the previous one, if any."""
    others = [p for p in list_checkpoints(os.path.dirname(path) or '.')
              if os.path.abspath(p) != os.path.abspath(path)]
    if others:
        return (f'delete (or move away) {os.path.basename(path)} to fall back to {os.path.basename(others[-1])}, '
                'or point Config.checkpoint_dir elsewhere')
    return 'delete it to train from scratch, or point Config.checkpoint_dir elsewhere'


def _older_intact(path: str) -> Optional[str]:
    """The newest checkpoint older than `path` next to it that loads and passes its checksum."""
    older = [p for p in list_checkpoints(os.path.dirname(path) or '.') if step_of(p) < step_of(path)]
    for candidate in reversed(older):
        try:
            load_checkpoint(candidate, describe_fallback=False)
        except CheckpointError:
            continue
        return candidate
    return None


def load_checkpoint(path: str, map_location: Any = 'cpu', describe_fallback: bool = True) -> Dict[str, Any]:
    """Loads a checkpoint written by `save_checkpoint` (weights only: no code is unpickled) and verifies its
    checksum (checkpoints written before checksums existed have none and load as they are). On a mismatch the
    ChecksumError names the newest intact older checkpoint (when `describe_fallback`).

    The file is read and checked on the CPU and only then moved to `map_location`: an error of the device (out of
    memory, a CUDA fault) is raised as itself, never reported as a corrupt file to delete."""
    if not os.path.isfile(path):
        raise CheckpointError(f'Checkpoint not found: {path}.')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files.
        reason = ' '.join(str(e).split()).split('. ')[0][:160]
        raise CheckpointError(f'Checkpoint {path} is corrupt or not a mipnerf360 checkpoint ({reason}); '
                              f'{_fallback_advice(path)}.') from None
    if not isinstance(state, dict) or 'model' not in state or 'step' not in state:
        raise CheckpointError(f'Checkpoint {path} lacks model weights or step; it was not written by mipnerf360; '
                              f'{_fallback_advice(path)}.')
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is not None and expected != payload_digest(state):
        older = _older_intact(path) if describe_fallback else None
        advice = (f'the newest intact older checkpoint is {older}: set Config.resume_fallback = True to resume '
                  f'from it, or delete {os.path.basename(path)}' if older else
                  'no older intact checkpoint exists; delete it to train from scratch')
        raise ChecksumError(f'Checkpoint {path} fails its checksum (it changed on disk after it was written); '
                            f'{advice}.')
    if map_location is None or (isinstance(map_location, (str, torch.device))
                                and torch.device(map_location).type == 'cpu'):
        return state
    return utils.tree_map(lambda v: v.to(map_location) if isinstance(v, torch.Tensor) else v, state)


def load_newest_intact(checkpoint_dir: str, map_location: Any = 'cpu',
                       keys_finite: Sequence[str] = ('model',)) -> Tuple[Optional[str], Optional[Dict[str, Any]],
                                                                         List[str]]:
    """The newest checkpoint that loads, passes its checksum and holds finite `keys_finite`: (path, state,
    one message per newer checkpoint passed over); (None, None, messages) when there is none."""
    passed_over = []
    for path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            state = load_checkpoint(path, map_location, describe_fallback=False)
            require_finite(state, path, keys_finite)
        except CheckpointError as e:
            passed_over.append(f'Passing over {path}: {" ".join(str(e).split()).split("; ")[0]}.')
            continue
        return path, state, passed_over
    return None, None, passed_over
