"""Pieces shared by the train / eval / render entry points: flags, config, device, errors, model setup."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Optional

import torch
from absl import app, flags

from mipnerf360 import checkpoints, configs, datasets

_FLAGS_DEFINED = False

# Exceptions a user can cause by their input. The CLI prints these as one line and exits non-zero.
USER_ERRORS = (configs.ConfigError, checkpoints.CheckpointError, FileNotFoundError, NotADirectoryError,
                              PermissionError, ValueError)


def define_flags():
    global _FLAGS_DEFINED
    if not _FLAGS_DEFINED:
        configs.define_common_flags()
        _FLAGS_DEFINED = True


def user_error_exit(e: BaseException):
    msg = ' '.join(str(e).split()) or type(e).__name__
    print(f'error: {msg}', file=sys.stderr, flush=True)
    sys.exit(2)


def run(main: Callable[[list], None], scope: str, argv=None):
    """Runs `main` under absl with gin scope `scope`; a user error becomes one line on stderr and exit code 2."""
    define_flags()

    def wrapped(argv_):
        import gin
        try:
            with gin.config_scope(scope):
                main(argv_)
        except USER_ERRORS as e:
            if os.environ.get('MIPNERF360_DEBUG'):
                raise
            user_error_exit(e)

    try:
        app.run(wrapped, argv=argv)
    except flags.Error as e:  # Unknown or malformed command-line flags.
        user_error_exit(e)


def load_config(save_config: bool) -> configs.Config:
    config = configs.load_config(save_config=False)
    if config.checkpoint_dir is None:
        raise configs.ConfigError('Config.checkpoint_dir is not set; add '
                                                            '--gin_bindings="Config.checkpoint_dir = \'logs/<name>/checkpoints\'".')
    if config.data_dir is None:
        raise configs.ConfigError('Config.data_dir is not set; add --gin_bindings="Config.data_dir = \'<scene dir>\'".')
    if not os.path.isdir(config.data_dir):
        raise FileNotFoundError(f'Config.data_dir {config.data_dir!r} does not exist or is not a directory; '
                                                        'point it at a scene folder (e.g. 360_v2/garden).')
    if save_config:
        checkpoints.ensure_dir(config.checkpoint_dir)
        configs.save_config_str(config.checkpoint_dir)
    return config


def get_device(config: configs.Config, local_rank: int = 0) -> torch.device:
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    return rank, world, local


def load_dataset(split: str, config: configs.Config, device: torch.device, rank: int = 0, world_size: int = 1):
    return datasets.load_dataset(split, config.data_dir, config, device=device, rank=rank, world_size=world_size)


def restore_model(model: torch.nn.Module, config: configs.Config, device: torch.device,
                                    required: bool = True, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Loads the newest checkpoint into `model` (and `optimizer`); returns its step (0 when none and not required)."""
    path = checkpoints.latest_checkpoint(config.checkpoint_dir)
    if path is None:
        if required:
            raise checkpoints.CheckpointError(
                    f'No checkpoint in {config.checkpoint_dir!r}; train first (python -m train ... with the same flags).')
        return 0
    state = checkpoints.load_checkpoint(path, map_location=device)
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as e:
        raise checkpoints.CheckpointError(
                f'Checkpoint {path} does not match this model ({str(e).splitlines()[0]}); use the gin configs it was '
                'trained with (see config.gin next to it).') from None
    if optimizer is not None and 'optimizer' in state:
        optimizer.load_state_dict(state['optimizer'])
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
