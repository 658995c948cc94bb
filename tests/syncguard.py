"""A guard that fails on host-device synchronisation, for tests of the hot paths (training step, sampler, rays).

`with no_host_sync(): ...` raises `HostSyncError` at the first operator whose result a host must wait for:
reading a tensor's value on the host (`.item()`, `int(t)`, `bool(t)`, `if t:`), data-dependent output shapes
(`nonzero`, boolean-mask indexing, `unique`, `masked_select`), or a copy from any tensor to the CPU. On CPU
these cost nothing, but on a GPU each one stalls the launch queue, so a CPU test of the code path catches what
would be a GPU slowdown. On CUDA the same block also runs under `torch.cuda.set_sync_debug_mode('error')`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    'aten._local_scalar_dense',  # .item(), int(t), float(t), bool(t)
    'aten.item',
    'aten.nonzero',
    'aten.nonzero_static',
    'aten.masked_select',
    'aten._unique2',
    'aten.unique_dim',
    'aten.unique_consecutive',
    'aten.equal',  # torch.equal returns a Python bool
    'aten.is_nonzero',
    'aten.allclose',
}


class HostSyncError(AssertionError):
    pass


class _SyncGuard(TorchDispatchMode):

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace('::', '.')
        if name in _SYNC_OPS:
            raise HostSyncError(f'host synchronisation: {name}')
        if name == 'aten.index':
            for idx in args[1] if len(args) > 1 else ():
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                    raise HostSyncError('host synchronisation: boolean-mask indexing (aten.index with a mask)')
        if name in ('aten._to_copy', 'aten.copy_'):
            src = args[1] if name == 'aten.copy_' else args[0]
            dst_device = kwargs.get('device') if name == 'aten._to_copy' else args[0].device
            if (isinstance(src, torch.Tensor) and dst_device is not None and torch.device(dst_device).type == 'cpu'
                    and src.device.type != 'cpu'):
                raise HostSyncError(f'host synchronisation: copy from {src.device} to the CPU')
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    """Fails (HostSyncError) on any host synchronisation inside the block."""
    cuda = torch.cuda.is_available()
    previous = torch.cuda.get_sync_debug_mode() if cuda else None
    if cuda:
        torch.cuda.set_sync_debug_mode('error')
    try:
        with _SyncGuard():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
