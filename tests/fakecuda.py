"""A simulated CUDA device for CPU-only machines, to run the CUDA code paths (device placement, the branches
taken only when `device.type == 'cuda'`) where no GPU exists.

Inside `with fake_cuda() as log:` tensors created on or moved to 'cuda' are `FakeCudaTensor`s: they report
`device == cuda:0`, hold their values in an ordinary CPU tensor and compute with the CPU kernels, so results
equal a CPU run's bit for bit. What a real GPU would refuse is refused here with `FakeCudaError`:
- an operator mixing CUDA tensors with CPU tensors (other than 0-dim CPU scalars, which CUDA kernels accept, and
  CPU index tensors, which CUDA indexing copies over; those copies are counted in `log.host_to_device`);
- a random draw for a CUDA tensor from a CPU torch.Generator, or for a CPU tensor from a CUDA one;
- `.numpy()` of a CUDA tensor (torch refuses it: it has no CPU storage).
`torch.cuda` answers as one idle 80 GiB device (is_available, device_count, set_device, synchronize,
mem_get_info, memory_allocated / reserved / max_memory_allocated, reset_peak_memory_stats, rng state,
get_device_name, set_sync_debug_mode), and every call is listed in `log.cuda_calls`. `log.syncs` counts values
read back on the host (`.item()`, copies to the CPU).

`torch.autocast('cuda')` works as on a GPU (its casts run on the CPU kernels; CPU autocast leaves CUDA tensors
alone, as it should).

What it cannot show: speed, memory, CUDA-kernel numerics (TF32 settings are recorded in `log.cuda_calls`, not
applied), backward passes (see `fake_cuda`), NCCL, Triton compiles.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import subprocess
import tempfile
import threading
from typing import Any, List, Optional
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device('cuda', 0)
CPU = torch.device('cpu')
TOTAL_MEMORY = 80 * 2**30
_RealGenerator = torch.Generator

# Operators that legitimately take tensors of two devices (copies between them).
_COPY_OPS = {'aten._to_copy', 'aten.copy_', 'aten._copy_from', 'aten._copy_from_and_resize', 'aten.to'}
_INDEX_OPS = {'aten.index', 'aten.index_put', 'aten.index_put_', 'aten._index_put_impl_'}


class FakeCudaError(RuntimeError):
    pass


@dataclasses.dataclass
class Log:
    cuda_calls: List[str] = dataclasses.field(default_factory=list)
    syncs: int = 0
    host_to_device: int = 0


class FakeCudaTensor(torch.Tensor):
    """A tensor that says it lives on cuda:0; `_cpu_values` holds its values on the CPU."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                  storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                  layout=inner.layout, device=CUDA,
                                                  requires_grad=inner.requires_grad)
        out._cpu_values = inner
        return out

    def __repr__(self, *, tensor_contents=None):  # pylint: disable=unused-argument
        return f'FakeCudaTensor({self._cpu_values!r})'

    def numpy(self, *args, **kwargs):
        raise FakeCudaError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            'to host memory first.')

    def __array__(self, *args, **kwargs):
        return self.numpy()

    def tolist(self):  # Reads the values back, as .item() does.
        if _LOGS:
            _LOGS[-1].syncs += 1
        return self._cpu_values.tolist()

    def untyped_storage(self):  # Memory accounting (which tensors share storage) sees the CPU values'.
        return self._cpu_values.untyped_storage()

    def data_ptr(self):
        return self._cpu_values.data_ptr()

    def __deepcopy__(self, memo):
        copied = FakeCudaTensor(self._cpu_values.detach().clone())
        copied.requires_grad_(self.requires_grad)
        if getattr(self, '_is_param', False):
            copied._is_param = True  # How torch marks a Parameter of a tensor subclass.
        memo[id(self)] = copied
        return copied

    def __reduce_ex__(self, protocol):  # torch.save writes the values (a CUDA tensor's are loadable anywhere).
        return self._cpu_values.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(_LOGS[-1] if _LOGS else Log(), func, args, kwargs)


class FakeCudaGenerator(_RealGenerator):
    """`torch.Generator(device='cuda')` inside `fake_cuda`: a CPU generator marked as the device's."""

    def __new__(cls, device: Any = 'cpu'):
        device = torch.device(device)
        gen = super().__new__(cls, CPU if device.type == 'cuda' else device)
        gen.fake_device = CUDA if device.type == 'cuda' else device
        return gen

    def __init__(self, device: Any = 'cpu'):  # pylint: disable=super-init-not-called,unused-argument
        pass


def _generator_device(gen: torch.Generator) -> torch.device:
    return getattr(gen, 'fake_device', gen.device)


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == 'cuda'


_LOGS: List[Log] = []


class _FakeCudaMode(TorchDispatchMode):

    def __init__(self, log: Log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(self.log, func, args, kwargs)


def _dispatch(log: Log, func, args, kwargs):
    """Runs one operator on the CPU values, checking devices as CUDA would and wrapping CUDA results."""
    kwargs = dict(kwargs or {})
    name = func.overloadpacket._qualified_op_name.replace('::', '.')
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    on_cuda = any(_is_fake(t) for t in tensors)
    target_cuda = _is_cuda(kwargs.get('device'))
    if name not in _COPY_OPS:
        _check_devices(log, name, args, tensors, on_cuda)
    out_cuda = target_cuda or (on_cuda and 'device' not in kwargs)
    if name == 'aten.copy_':
        out_cuda = _is_fake(args[0])
    if name in ('aten._to_copy', 'aten.copy_'):
        src = args[1] if name == 'aten.copy_' else args[0]
        if _is_fake(src) and not out_cuda:
            log.syncs += 1
    if name == 'aten._local_scalar_dense' and on_cuda:
        log.syncs += 1
    if target_cuda:
        kwargs['device'] = CPU
    inner_args, inner_kwargs = tree_map(_unwrap, (args, kwargs))
    result = func(*inner_args, **inner_kwargs)
    if not out_cuda:
        return result
    by_inner = {id(t._cpu_values): t for t in tensors if _is_fake(t)}

    def wrap(r):  # In-place operators return their argument: hand back the same wrapper.
        if not isinstance(r, torch.Tensor):
            return r
        return by_inner[id(r)] if id(r) in by_inner else FakeCudaTensor(r)
    return tree_map(wrap, result)


def _check_devices(log: Log, name: str, args, tensors, on_cuda: bool) -> None:
    index_tensors = set()
    if name in _INDEX_OPS and len(args) > 1:
        index_tensors = {id(t) for t in args[1] if isinstance(t, torch.Tensor)}
    cpu = [t for t in tensors if not _is_fake(t) and t.device.type == 'cpu' and t.dim() > 0]
    if on_cuda and cpu:
        if all(id(t) in index_tensors for t in cpu):
            log.host_to_device += len(cpu)
            return
        shapes = [tuple(t.shape) for t in cpu]
        raise FakeCudaError(f'{name}: CUDA tensors mixed with CPU tensors of shapes {shapes} (a real GPU raises '
                            '"Expected all tensors to be on the same device")')


_FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)


class _ToMode(TorchFunctionMode):
    """`Tensor.to` / `Tensor.cuda` to or from the fake device, as the operator `_to_copy` (torch's C++ `to` would
    look for a CUDA device guard first)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get('generator')
        if gen is not None:  # Checked here: the operators below see a plain copy of the Python generator.
            _check_generator(func, gen, args, kwargs)
        if func in _FROM_DATA and _is_cuda(kwargs.get('device')):  # Built in C++ on the device: build, then move.
            return func(*args, **{**kwargs, 'device': CPU}).to(CUDA)
        if func is torch.Tensor.cuda:
            func, args, kwargs = torch.Tensor.to, (args[0], CUDA), {'non_blocking': kwargs.get('non_blocking', False)}
        if func is torch.Tensor.to:
            self_, rest = args[0], args[1:]
            if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device and dtype.
                rest = (rest[0].device, rest[0].dtype) + tuple(rest[1:])
            device, dtype, _, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
            device = device if device is not None else self_.device
            dtype = dtype if dtype is not None else self_.dtype
            if torch.device(device).type == 'cuda' or _is_fake(self_):
                if torch.device(device).type == self_.device.type and dtype == self_.dtype and not kwargs.get('copy'):
                    return self_
                return torch.ops.aten._to_copy(self_, dtype=dtype, device=torch.device(device),
                                               memory_format=memory_format or torch.preserve_format)
        return func(*args, **kwargs)


def _is_fake(x) -> bool:
    # A FakeCudaTensor, or an nn.Parameter made from one (it keeps the wrapper's attributes, not its type).
    return isinstance(x, torch.Tensor) and getattr(x, '_cpu_values', None) is not None


def _check_generator(func, gen: torch.Generator, args, kwargs) -> None:
    if 'device' in kwargs:
        target_cuda = _is_cuda(kwargs['device'])
    else:
        tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        target_cuda = bool(tensors) and _is_fake(tensors[0])
    if _is_cuda(_generator_device(gen)) != target_cuda:
        raise FakeCudaError(f'{getattr(func, "__name__", func)}: a random draw for a '
                            f'{"CUDA" if target_cuda else "CPU"} tensor from a torch.Generator on '
                            f'{_generator_device(gen)}')


def _unwrap(x):
    return x._cpu_values if _is_fake(x) else x


def _cuda_api(log: Log):
    """Stand-ins for the torch.cuda functions the code calls: one idle device (a memory probe's peak: 4 MiB)."""
    def record(name, value=None):
        def fn(*args, **kwargs):
            log.cuda_calls.append(name)
            return value() if callable(value) else value
        return fn

    return {
        'is_available': record('is_available', True),
        '_lazy_init': lambda: None,
        'device_count': record('device_count', 1),
        'current_device': record('current_device', 0),
        'set_device': record('set_device'),
        'synchronize': record('synchronize'),
        'mem_get_info': record('mem_get_info', (TOTAL_MEMORY, TOTAL_MEMORY)),
        'memory_allocated': record('memory_allocated', 0),
        'memory_reserved': record('memory_reserved', 0),
        'max_memory_allocated': record('max_memory_allocated', 4 * 2**20),
        'reset_peak_memory_stats': record('reset_peak_memory_stats'),
        'empty_cache': record('empty_cache'),
        'get_device_name': record('get_device_name', 'FakeCuda (a CPU in disguise)'),
        'is_bf16_supported': record('is_bf16_supported', True),
        'get_rng_state': record('get_rng_state', lambda: torch.zeros(16, dtype=torch.uint8)),
        'set_rng_state': record('set_rng_state'),
        'manual_seed': record('manual_seed'),
        'manual_seed_all': record('manual_seed_all'),
        'set_sync_debug_mode': record('set_sync_debug_mode'),
        'get_sync_debug_mode': record('get_sync_debug_mode', 0),
    }


_GUARD_SOURCE = """
#include <c10/core/impl/FakeGuardImpl.h>
namespace { C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>); }
"""


def register_device_guard(cache_dir: Optional[str] = None) -> None:
    """Registers a no-op CUDA device guard (c10's FakeGuardImpl), which tensors on 'cuda' need to exist at all
    without CUDA: a small shared library, compiled once per torch version (a few seconds; needs g++) into
    `cache_dir` (default ~/.cache/mipnerf360) and loaded into the process. Only for CPU-only torch builds: in a
    CUDA build it would replace the real guard."""
    if torch.backends.cuda.is_built():
        raise RuntimeError('register_device_guard() is for CPU-only torch builds; this one has CUDA.')
    from torch.utils import cpp_extension  # pylint: disable=import-outside-toplevel
    cache_dir = cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'mipnerf360')
    key = hashlib.sha256((_GUARD_SOURCE + torch.__version__ + torch.__file__).encode()).hexdigest()[:16]
    library = os.path.join(cache_dir, f'fake_cuda_guard_{key}.so')
    if not os.path.exists(library):
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, 'guard.cpp')
            with open(source, 'w') as f:
                f.write(_GUARD_SOURCE)
            abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)  # pylint: disable=protected-access
            cmd = (['g++', '-shared', '-fPIC', '-O0', '-std=c++17', f'-D_GLIBCXX_USE_CXX11_ABI={abi}', source,
                    '-o', os.path.join(tmp, 'guard.so')] +
                   [f'-I{p}' for p in cpp_extension.include_paths()] +
                   [f'-L{p}' for p in cpp_extension.library_paths()] + ['-lc10'])
            subprocess.run(cmd, check=True, capture_output=True)
            os.replace(os.path.join(tmp, 'guard.so'), library)  # Atomic: other processes see all or nothing.
    ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)


def _leaves(t: torch.Tensor) -> List[torch.Tensor]:
    """The leaf tensors (parameters) whose gradients backward of `t` would accumulate."""
    leaves, seen, todo = [], set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, 'variable'):
            leaves.append(node.variable)
        todo.extend(n for n, _ in node.next_functions)
    return leaves


_real_backward = torch.Tensor.backward
_real_grad = torch.autograd.grad


def _zero_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    if not _is_fake(self):  # A CPU computation inside the block: its real gradients.
        return _real_backward(self, gradient, retain_graph, create_graph, inputs)
    with torch.no_grad():
        for leaf in _leaves(self):
            if leaf.grad is None:
                leaf.grad = torch.zeros_like(leaf)


def _zero_grad(outputs, inputs, *args, **kwargs):
    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    if not any(_is_fake(o) for o in outs):
        return _real_grad(outputs, inputs, *args, **kwargs)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return tuple(torch.zeros_like(x) for x in inputs)


def _in_modes(run, log: Log):
    """`Thread.run` entering the modes first: torch's modes are per thread."""
    def wrapped(thread):
        with _FakeCudaMode(log), _ToMode():
            run(thread)
    return wrapped


@contextlib.contextmanager
def fake_cuda():
    """Runs the block with a simulated cuda:0 (see the module docstring); yields the `Log`.

    Backward passes cannot run on it (torch's autograd engine asks the CUDA runtime for streams), so inside the
    block `Tensor.backward` and `torch.autograd.grad` of device tensors give zero gradients: the forward pass, the
    losses and the optimizer run on the device as they would, the gradients' values are not computed (CPU
    tensors' backward passes stay real).
    """
    log = Log()
    with contextlib.ExitStack() as stack:
        # TF32 is a CUDA kernel setting: recorded, not applied to the CPU kernels; restored afterwards.
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        stack.callback(lambda: (setattr(torch.backends.cuda.matmul, 'allow_tf32', saved[0]),
                                setattr(torch.backends.cudnn, 'allow_tf32', saved[1])))
        stack.enter_context(mock.patch('torch.set_float32_matmul_precision',
                                       lambda p: log.cuda_calls.append(f'set_float32_matmul_precision({p})')))
        stack.enter_context(mock.patch('torch.Tensor.backward', _zero_backward))
        stack.enter_context(mock.patch('torch.autograd.grad', _zero_grad))
        stack.enter_context(mock.patch.object(threading.Thread, 'run', _in_modes(threading.Thread.run, log)))
        for name, fn in _cuda_api(log).items():
            stack.enter_context(mock.patch(f'torch.cuda.{name}', fn))
        stack.enter_context(mock.patch('torch.Generator', FakeCudaGenerator))
        # Module.to would otherwise set `param.data` to the wrapper, leaving a Parameter that is not one.
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwrite)
        stack.enter_context(_FakeCudaMode(log))
        stack.enter_context(_ToMode())
        _LOGS.append(log)
        try:
            yield log
        finally:
            _LOGS.pop()
