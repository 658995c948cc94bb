"""Checkpoints: atomic writes, newest-first discovery, safe loading.

A checkpoint is one file `checkpoint_<step:08d>.pt` holding a dict of tensors and plain Python values
(model and optimizer state dicts, step, config seed, ...). It is written to a temporary file in the same
folder, flushed to disk and renamed, so a run killed at any moment leaves either the previous checkpoint or
the new one, never a partial newest file. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

_PATTERN = re.compile(r'^checkpoint_(\d+)\.pt$')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written (the message names the file and what to do)."""


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
    finite = torch.stack([torch.isfinite(t).all().cpu() for _, t in entries]).tolist()
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
    tmp = f'{path}.tmp{os.getpid()}'
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
    # Temp files left by a run killed mid-write are garbage; the finished checkpoints never are.
    for stale in glob.glob(os.path.join(checkpoint_dir, 'checkpoint_*.pt.tmp*')):
        try:
            os.remove(stale)
        except OSError:
            pass
    return path


def _fallback_advice(path: str) -> str:
    """What to do about an unusable checkpoint `path`: delete it and fall back to the previous one, if any."""
    others = [p for p in list_checkpoints(os.path.dirname(path) or '.')
              if os.path.abspath(p) != os.path.abspath(path)]
    if others:
        return (f'delete (or move away) {os.path.basename(path)} to fall back to {os.path.basename(others[-1])}, '
                'or point Config.checkpoint_dir elsewhere')
    return 'delete it to train from scratch, or point Config.checkpoint_dir elsewhere'


def load_checkpoint(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Loads a checkpoint written by `save_checkpoint` (weights only: no code is unpickled)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'Checkpoint not found: {path}.')
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files.
        reason = ' '.join(str(e).split()).split('. ')[0][:160]
        raise CheckpointError(f'Checkpoint {path} is corrupt or not a mipnerf360 checkpoint ({reason}); '
                              f'{_fallback_advice(path)}.') from None
    if not isinstance(state, dict) or 'model' not in state or 'step' not in state:
        raise CheckpointError(f'Checkpoint {path} lacks model weights or step; it was not written by mipnerf360; '
                              f'{_fallback_advice(path)}.')
    return state
