"""Pieces shared by the train / eval / render entry points: flags, config, device, errors, model setup.

Error reporting: a problem the user can fix (missing folder, bad gin file or binding, corrupt checkpoint,
unwritable output, unknown flag) raises one of our own exception types (`USER_ERRORS`); it is printed as
exactly one line `error: <what and what to do>` on stderr and the process exits with status 2. Inputs are
checked before the slow and noisy parts start (model, LPIPS, tensorboard), so that line is all a user sees on
stderr. Set MIPNERF360_DEBUG=1 to get the traceback instead. Any other exception is a bug: its traceback is
printed, then one line asking to report it, and the process exits with status 1. Running out of device
memory (`torch.OutOfMemoryError`) is one line too (status 2), naming the settings that lower the memory.
SIGTERM and Ctrl-C stop with one line and status 143 / 130 (train handles them itself: it saves a checkpoint
first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import os
import re
import signal
import sys
import traceback
from typing import Callable, List, Optional, Sequence, Union

import torch
from absl import app, flags

from mipnerf360 import checkpoints, configs, datasets, utils

_FLAGS_DEFINED = False

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_SIGINT = 130  # 128 + the signal number, as a shell reports a process killed by it.
EXIT_SIGTERM = 143
BUG_MESSAGE = 'error: this is a bug in mipnerf360; please report it with the traceback above.'


class OutputError(OSError):
    """An output path that cannot be created or written (the message names it and what to do)."""


class MetricsError(RuntimeError):
    """Evaluation produced non-finite metrics (a diverged model): reported as one line, exit status 2."""


# Our own exception types for problems the user can fix. The CLI prints these as one line and exits with 2;
# every other exception is a bug in our code and keeps its traceback.
USER_ERRORS = (configs.ConfigError, checkpoints.CheckpointError, datasets.DatasetError, OutputError,
               MetricsError, utils.ImageFileError)


def define_flags():
    global _FLAGS_DEFINED
    if not _FLAGS_DEFINED:
        configs.define_common_flags()
        _FLAGS_DEFINED = True


def one_line(e: BaseException) -> str:
    return ' '.join(str(e).split()) or type(e).__name__


def user_error_exit(e: BaseException):
    print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


class Stopped(BaseException):
    """Raised by the SIGTERM handler of `run` (a BaseException, so `except Exception` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.name = signal.Signals(signum).name


def _raise_stopped(signum, frame):  # pylint: disable=unused-argument
    raise Stopped(signum)


def _install_sigterm():
    """SIGTERM raises `Stopped` in the main thread (Ctrl-C already raises KeyboardInterrupt); returns the previous
    handler (None when not in the main thread, where handlers cannot be set)."""
    try:
        # pycolmap's glog installs a SIGTERM handler that dumps a native stack when the module is first imported
        # (lazily, by the COLMAP loader); importing it first lets ours replace that one.
        import pycolmap  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        pass
    try:
        return signal.signal(signal.SIGTERM, _raise_stopped)
    except ValueError:
        return None


def _stopped_exit(what: str, code: int):
    """One line for a stop by signal. Outputs are written atomically, so every file on disk is whole."""
    print(f'Stopped ({what}); the outputs written so far are complete; re-run the same command to continue.',
          file=sys.stderr, flush=True)
    sys.exit(code)


def _parse_flags(argv: List[str]) -> List[str]:
    """absl's flag parsing, with a bad flag reported as one `error:` line (and re-runnable in one process)."""
    if flags.FLAGS.is_parsed():
        flags.FLAGS.unparse_flags()  # Multi-string flags would otherwise accumulate across in-process runs.
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        user_error_exit(ValueError(f'{one_line(e)} (run with --helpshort to list the flags)'))
        raise  # Unreachable.


def run(main: Callable[[list], None], scope: str, argv: Optional[Sequence[str]] = None):
    """Runs `main` under absl with gin scope `scope`; a user error becomes one line on stderr and exit code 2.

    `argv` (including a program name at [0]) defaults to sys.argv; like absl's app.run this ends with
    SystemExit (code 0 on success).
    """
    define_flags()
    utils.tune_glibc_malloc()  # 10-40% faster CPU steps: no page-fault churn on the large per-step tensors.

    def wrapped(argv_):
        import gin
        previous = _install_sigterm()
        try:
            with gin.config_scope(scope):
                main(argv_)
        except USER_ERRORS as e:
            if os.environ.get('MIPNERF360_DEBUG'):
                raise
            user_error_exit(e)
        except torch.OutOfMemoryError as e:
            if os.environ.get('MIPNERF360_DEBUG'):
                raise
            user_error_exit(RuntimeError(out_of_memory_message(e)))
        except KeyboardInterrupt:
            _stopped_exit('Ctrl-C', EXIT_SIGINT)
        except Stopped as e:
            _stopped_exit(e.name, EXIT_SIGTERM)
        except Exception:  # pylint: disable=broad-except
            traceback.print_exc()
            print(BUG_MESSAGE, file=sys.stderr, flush=True)
            sys.exit(EXIT_BUG)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    app.run(wrapped, argv=list(argv) if argv is not None else None, flags_parser=_parse_flags)


def out_of_memory_message(e: BaseException) -> str:
    """The one line printed for a `torch.OutOfMemoryError`: the device's words, then what to change."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else 'out of memory'
    return (f'out of memory ({first.rstrip(". ")}). Training: set Config.grad_accum_steps = \'auto\' (or a larger '
            'number: same results, less memory), or lower Config.batch_size by a factor k and multiply '
            'Config.max_steps by k (the learning rate unchanged, as the reference advises); eval / render: lower '
            'Config.render_chunk_size (None sizes it from the free memory).')


def _suggest_binding(msg: str) -> str:
    """Appends 'did you mean ...' to gin's unknown-parameter message when a close name exists."""
    m = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", msg)
    if not m:
        return msg
    owner, name = m.groups()
    candidates: List[str] = []
    if owner == 'Config':
        candidates = [f.name for f in dataclasses.fields(configs.Config)]
    else:
        from mipnerf360 import models  # pylint: disable=import-outside-toplevel
        cls = getattr(models, owner, None)
        if cls is not None:
            candidates = list(inspect.signature(cls).parameters)
            candidates += [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    close = difflib.get_close_matches(name, candidates, n=1)
    return f'{msg}; did you mean {owner}.{close[0]}?' if close else msg


def load_config(for_training: bool) -> configs.Config:
    """Parses the gin flags into a Config and checks the paths it names.

    For training, `checkpoint_dir` must be (or be creatable as) a writable directory; it is created here.
    For eval / render it must be an existing directory holding checkpoints (checked by `restore_model`).
    Nothing is written here (config.gin is saved by train once the model is built and restored).
    """
    import gin
    gin.clear_config()  # Allows several runs in one process (tests); a no-op for a fresh process.
    try:
        config = configs.load_config(save_config=False)
    except configs.ConfigError as e:
        raise configs.ConfigError(_suggest_binding(one_line(e))) from None
    if config.checkpoint_dir is None:
        raise configs.ConfigError('Config.checkpoint_dir is not set; add '
                                  '--gin_bindings="Config.checkpoint_dir = \'logs/<name>/checkpoints\'".')
    if config.data_dir is None:
        raise configs.ConfigError('Config.data_dir is not set; add '
                                  '--gin_bindings="Config.data_dir = \'<scene dir>\'".')
    if not os.path.isdir(config.data_dir):
        raise configs.ConfigError(f'Config.data_dir {config.data_dir!r} does not exist or is not a directory; '
                                'point it at a scene folder (e.g. 360_v2/garden).')
    for name, kind in (('render_path_file', 'a .npy file'), ('render_spline_keyframes', 'a text file or folder'),
                       ('vocab_tree_path', 'a file')):
        path = getattr(config, name)
        if path is not None and not os.path.exists(path):
            raise configs.ConfigError(f'Config.{name} = {path!r} does not exist; point it at {kind} or unset it.')
    if os.path.exists(config.checkpoint_dir) and not os.path.isdir(config.checkpoint_dir):
        raise checkpoints.CheckpointError(f'Config.checkpoint_dir = {config.checkpoint_dir!r} is an existing '
                                          'file, not a directory; choose another path.')
    if for_training:
        checkpoints.ensure_dir(config.checkpoint_dir)
    return config


def ensure_output_dir(path: str, what: str) -> str:
    """Creates the folder `path` (and its parents) for outputs, with a one-line error naming `what` (e.g.
    'Config.render_dir') when it cannot be created or written."""
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if probe and os.path.exists(probe) and not os.path.isdir(probe):
        raise OutputError(f'Cannot write to {path!r} ({what}): {probe!r} is an existing file, not a folder; '
                          f'set {what} to another folder.')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f'Cannot create {path!r} ({what}): {e.strerror}; set {what} to a writable folder.') \
            from None
    if not os.access(path, os.W_OK):
        raise OutputError(f'{path!r} ({what}) is not writable; set {what} to a writable folder.')
    return path


def get_device(config: configs.Config, local_rank: int = 0) -> torch.device:
    """`Config.device`, or CUDA device `local_rank` when there is one, else the CPU. A plain 'cuda' is CUDA device
    `local_rank` too: under torchrun each process takes its own GPU (not all of them GPU 0)."""
    if config.device:
        try:
            device = torch.device(config.device)
        except RuntimeError:
            raise configs.ConfigError(f"Config.device = {config.device!r} is not a device; use 'cpu', 'cuda' or "
                                      "'cuda:<index>' (or None to pick CUDA when available).") from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise configs.ConfigError(f'Config.device = {config.device!r} but CUDA is not available here; set '
                                      "Config.device = 'cpu' (or None).")
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    values = []
    for name, default in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)):
        text = os.environ.get(name, str(default))
        try:
            values.append(int(text))
        except ValueError:
            raise configs.ConfigError(f'Environment variable {name} = {text!r} is not an integer; unset it or '
                                      'start the command with torchrun.') from None
    rank, world, local = values
    if not 0 <= rank < max(world, 1):
        raise configs.ConfigError(f'RANK = {rank} must be in [0, WORLD_SIZE = {world}); start the command with '
                                  'torchrun.')
    return rank, world, local


@contextlib.contextmanager
def distributed_group(world_size: int, device: torch.device):
    """A torch.distributed process group for the duration of the block when `world_size` > 1 (torchrun): NCCL on
    CUDA, gloo on CPU. Nothing when not distributed."""
    if world_size <= 1:
        yield
        return
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast_object(obj, world_size: int):
    """Rank 0's `obj` on every rank (so the ranks agree, e.g. on which checkpoint to evaluate); `obj` itself when
    not distributed."""
    if world_size <= 1:
        return obj
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_model(config: configs.Config, device: torch.device) -> torch.nn.Module:
    """`models.Model(config=config)` on `device`, seeded by `config.seed`, at `Config.precision` and compiled as
    `Config.compile` says; a model the gin bindings make inconsistent (its constructor's ValueError) becomes a
    ConfigError."""
    from mipnerf360 import models  # pylint: disable=import-outside-toplevel
    torch.manual_seed(config.seed)
    try:
        model = models.Model(config=config)
    except ValueError as e:
        raise configs.ConfigError(f'Bad model bindings: {one_line(e)}') from None
    models.apply_precision(config.precision, device)
    return models.compile_model(model.to(device), config.compile)


@contextlib.contextmanager
def output_errors(what: str):
    """Turns an OS error while writing outputs (disk full, permissions changed) into an OutputError naming
    `what` (e.g. 'Config.render_dir')."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        where = f' {e.filename!r}' if e.filename else ''
        raise OutputError(f'Cannot write{where} ({e.strerror or one_line(e)}); free space or set {what} to a '
                          'writable folder.') from None


def load_dataset(split: str, config: configs.Config, device: torch.device, rank: int = 0, world_size: int = 1
                 ) -> Union[datasets.Prefetcher, datasets.RaySampler]:
    """The split's rays on `device`: a `Prefetcher` (training batches from a thread) for 'train', else a
    `RaySampler` (whole images)."""
    sampler = datasets.RaySampler(datasets.load_scene(config, split), config, device, rank, world_size)
    return datasets.Prefetcher(sampler) if split == 'train' else sampler


def require_checkpoint(config: configs.Config) -> str:
    """The newest checkpoint in `config.checkpoint_dir`, or a CheckpointError saying to train first."""
    path = checkpoints.latest_checkpoint(config.checkpoint_dir)
    if path is None:
        raise checkpoints.CheckpointError(
            f'No checkpoint in Config.checkpoint_dir = {config.checkpoint_dir!r}; train first (python -m train '
            'with the same flags), or point Config.checkpoint_dir at the folder train wrote.')
    return path


def state_dict_mismatch(e: RuntimeError) -> str:
    """The first problem in torch's `load_state_dict` error, short: 'nerf_mlp.x.weight is [64, 96] in the
    checkpoint, [1024, 96] in this model', or the missing / unexpected parameters (the first few named)."""
    problems = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    for line in problems:
        m = re.match(r'size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from '
                     r'checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)', line)
        if m:
            more = len([ln for ln in problems if ln.startswith('size mismatch')]) - 1
            return (f'{m.group(1)} is {m.group(2)} in the checkpoint, {m.group(3)} in this model'
                    + (f'; {more} more shapes differ' if more else ''))
    for line in problems:
        m = re.match(r'(Missing|Unexpected) key\(s\) in state_dict: (.*)', line)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(2))
            where = 'missing from the checkpoint' if m.group(1) == 'Missing' else 'not in this model'
            shown = ', '.join(keys[:3]) + (f' and {len(keys) - 3} more' if len(keys) > 3 else '')
            return f'{len(keys)} parameter(s) {where}: {shown}'
    return one_line(e)


def restore_model(model: torch.nn.Module, config: configs.Config, device: torch.device,
                  required: bool = True, path: Optional[str] = None,
                  train_state=None) -> int:
    """Loads the newest checkpoint (or `path`) into `model`, and into the whole `train_state` when given (a
    `train_utils.TrainState` of `model`: Adam state, step, seed, RobustNeRF's loss threshold); returns its step
    (0 when there is none and it is not `required`)."""
    if train_state is not None and getattr(train_state.model, 'module', train_state.model) is not model:
        raise ValueError('restore_model: train_state must be the TrainState of `model`.')
    keys_finite = ('model', 'optimizer') if train_state is not None else ('model',)
    if path is None and config.resume_fallback and checkpoints.list_checkpoints(config.checkpoint_dir):
        path, state, passed_over = checkpoints.load_newest_intact(config.checkpoint_dir, device, keys_finite)
        for msg in passed_over:
            print(f'{msg} (Config.resume_fallback = True)', flush=True)
        if path is None:
            raise checkpoints.CheckpointError(
                f'No checkpoint in Config.checkpoint_dir = {config.checkpoint_dir!r} is intact ({passed_over[0]}); '
                'move them away to train from scratch.')
    else:
        if path is None:
            path = require_checkpoint(config) if required else checkpoints.latest_checkpoint(config.checkpoint_dir)
        if path is None:
            return 0
        state = checkpoints.load_checkpoint(path, map_location=device)
        checkpoints.require_finite(state, path, keys_finite)
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as e:
        if not str(e).startswith('Error(s) in loading state_dict'):
            raise  # A device error (out of memory, a CUDA fault), not a checkpoint of another model.
        raise checkpoints.CheckpointError(
            f'Checkpoint {path} does not match this model ({state_dict_mismatch(e)}); use the gin configs it was '
            'trained with (see config.gin next to it).') from None
    if train_state is not None:
        if 'optimizer' not in state:
            raise checkpoints.CheckpointError(f'Checkpoint {path} has no optimizer state, so training cannot '
                                              'resume from it; train into a new Config.checkpoint_dir.')
        try:
            train_state.load_training_state(state)  # The weights are in already.
        except (ValueError, KeyError) as e:
            raise checkpoints.CheckpointError(
                f'Checkpoint {path} holds optimizer state for another model ({one_line(e)}); use the gin configs '
                'it was trained with (see config.gin next to it).') from None
    return int(state['step'])


@contextlib.contextmanager
def no_grad_eval(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
