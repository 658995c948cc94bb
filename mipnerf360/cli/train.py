"""`python -m train --gin_configs=... --gin_bindings=...`: trains a model, resuming from the newest checkpoint.

Multi-GPU: `torchrun --nproc_per_node=N -m train ...` (DDP; NCCL on GPUs, gloo on CPU). Each rank draws
`batch_size / N` rays per step from its own stream (the dataset is built with the rank and world size), and
DDP averages the gradients, so one step sees a global batch of `batch_size` rays as a single-process run does.

Resuming is exact: the batch and the sampling randomness of a step are pure functions of (seed, step, rank),
and a checkpoint holds the model, the Adam state and the step, so a run stopped at step k and resumed to n
ends with the same parameters as a run straight to n (on the same device and thread count).

Stopping: SIGTERM or a first Ctrl-C finishes the current step, saves a checkpoint and exits with status 0;
a second Ctrl-C stops at once (exit 130), leaving the newest checkpoint on disk as it was. Checkpoints are
written atomically, so a SIGKILL never leaves a partial newest checkpoint.

Divergence: the first non-finite loss term or gradient norm stops the run with one `error:` line naming the
step, the terms and the newest good checkpoint (exit 2), or, with `Config.nan_policy = 'skip_step'`, that
update is skipped and counted (see `train_utils.FiniteGuard`). Nothing non-finite is ever saved.

One trainer per checkpoint_dir: the run holds `train.lock` (see `checkpoints.TrainingLock`); a second one
exits at once naming the first (pid, host).

Watching: with `Config.viewer_port` set, rank 0 serves the live browser viewer (`mipnerf360.viewer`) for the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from typing import Any, Optional

import numpy as np
import tqdm
import torch

from mipnerf360 import checkpoints, configs, image, memory, models, train_utils, utils, viewer, vis
from mipnerf360.cli import common
from mipnerf360.cli.eval import _decimate

# Under DDP the ranks agree on stopping (SIGTERM) every this many steps (a collective and a host sync).
_STOP_CHECK_EVERY_DDP = 10


class _Stopper:
    """SIGTERM and a first SIGINT set a flag checked between steps (the loop saves a checkpoint and exits);
    a second SIGINT raises KeyboardInterrupt at once. Handlers are restored by `uninstall`."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # Not the main thread (e.g. a test harness): no graceful stop.
                pass

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame):  # pylint: disable=unused-argument
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


def _any_rank(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist
    t = torch.tensor([1. if flag else 0.], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclasses.dataclass
class _Run:
    """What the training loop works with, built by `_setup`."""
    config: configs.Config
    device: torch.device
    rank: int
    world_size: int
    dataset: Any
    test_dataset: Any
    state: train_utils.TrainState
    base_model: models.Model
    cameras: Any
    init_step: int
    num_steps: int
    num_params: int
    last_saved: int
    num_skipped: int = 0  # Non-finite steps skipped so far (as last read from the guard).
    viewer: Any = None  # The live browser viewer (Config.viewer_port), rank 0 only.

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _Logger:
    """Plain log lines (stdout and train_log.txt), tensorboard scalars, and a live progress bar (loss, PSNR,
    rays/s, ETA) when stderr is a terminal. Only rank 0 writes."""

    def __init__(self, run: _Run):
        self.enabled = run.is_main
        self.writer = self.log_file = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(run.config.checkpoint_dir)
            try:
                self.log_file = open(os.path.join(run.config.checkpoint_dir, 'train_log.txt'), 'a')
            except BaseException:
                self.writer.close()  # Its writing thread.
                raise
        self.bar = tqdm.tqdm(total=max(run.num_steps - run.init_step + 1, 0), initial=0, unit='step',
                             dynamic_ncols=True, disable=not (self.enabled and sys.stderr.isatty()), leave=False)
        self.stats_buffer = []
        self.window_start, self.window_steps = time.time(), 0
        self.precision = int(np.ceil(np.log10(max(run.config.max_steps, 2)))) + 1

    def __call__(self, msg: str):
        if self.enabled:
            if self.bar.disable:
                print(msg, flush=True)
            else:
                self.bar.write(msg, file=sys.stdout)
            self.to_file(msg)

    def to_file(self, msg: str):
        if self.enabled:
            self.log_file.write(msg + '\n')
            self.log_file.flush()

    def record(self, stats):
        """Counts a step, and keeps its statistics (on the device) for the next `log_stats`."""
        self.window_steps += 1
        self.bar.update(1)
        if self.enabled:
            self.stats_buffer.append(stats)

    def restart_clock(self):
        self.window_start = time.time()

    def log_stats(self, run: _Run, step: int):
        """The averages of the buffered steps as scalars and one log line (host syncs happen here only)."""
        config = run.config
        floats = [train_utils.stats_to_float(s) for s in self.stats_buffer]
        avg = {k: float(np.mean([f[k] for f in floats])) for k in floats[0]}
        steps_per_sec = self.window_steps / max(time.time() - self.window_start, 1e-9)
        rays_per_sec = config.batch_size * steps_per_sec
        lr = float(run.state.lr_fn(step - 1))
        scalars = {f'train_avg_{k}': v for k, v in avg.items()}
        scalars.update(train_learning_rate=lr, train_steps_per_sec=steps_per_sec, train_rays_per_sec=rays_per_sec,
                       train_num_params=run.num_params)
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        losses = ', '.join(f'{k[7:11]}={v:0.5f}' if 1e-4 <= v < 10 else f'{k[7:11]}={v:0.1e}'
                           for k, v in avg.items() if k.startswith('losses/'))
        remaining = (run.num_steps - step) / max(steps_per_sec, 1e-9)
        self(f'{step:{self.precision}d}/{config.max_steps:d}: loss={avg["loss"]:0.5f}, psnr={avg["psnr"]:6.3f}, '
             f'lr={lr:0.2e} | {losses}, {rays_per_sec:0.0f} r/s, ETA {remaining / 60:0.1f} min')
        self.bar.set_postfix_str(f'loss={avg["loss"]:0.4f} psnr={avg["psnr"]:0.2f} {rays_per_sec:0.0f} r/s',
                                 refresh=False)
        self.stats_buffer = []
        self.window_start, self.window_steps = time.time(), 0

    def close(self):
        self.bar.close()
        if self.enabled:
            self.writer.close()
            self.log_file.close()


def _setup(config: configs.Config, rank: int, world_size: int, local_rank: int,
           resources: contextlib.ExitStack) -> _Run:
    """Datasets, model, train state (restored from the newest checkpoint). Everything is built and restored
    before anything is written, so a bad checkpoint or dataset loses nothing. What it opens is closed by
    `resources`, also when it raises."""
    device = common.get_device(config, local_rank)
    if world_size > 1 and config.batch_size % world_size:
        raise configs.ConfigError(f'Config.batch_size = {config.batch_size} must be divisible by the number of '
                                  f'processes ({world_size}).')
    dataset = common.load_dataset('train', config, device, rank, world_size)
    resources.callback(dataset.close)
    test_dataset = None
    if rank == 0 and config.train_render_every > 0:
        test_dataset = common.load_dataset('test', config, device)
        resources.callback(test_dataset.close)
    model = common.build_model(config, device)  # Seeded: identical initial weights on every rank.
    config = memory.resolve_grad_accum_steps(config, model, world_size)  # 'auto': from the free memory.
    if model.num_glo_features > 0 and dataset.size > model.num_glo_embeddings:
        raise configs.ConfigError(f'Model.num_glo_embeddings = {model.num_glo_embeddings} is smaller than '
                                  f'the number of training images ({dataset.size}); raise it with --gin_bindings.')
    state = train_utils.create_train_state(config, model)
    last_step = common.restore_model(model, config, device, required=False, train_state=state)
    if rank == 0:
        configs.save_config_str(config.checkpoint_dir)  # After the model is built: holds its bindings too.

    if device.type == 'cuda':
        torch.cuda.set_device(device)
    return _Run(config=config, device=device, rank=rank, world_size=world_size, dataset=dataset,
                test_dataset=test_dataset, state=state, base_model=model, cameras=dataset.cameras, init_step=last_step + 1,
                num_steps=config.early_exit_steps if config.early_exit_steps is not None else config.max_steps,
                num_params=sum(p.numel() for p in model.parameters() if p.requires_grad), last_saved=last_step)


def _check_finite(run: _Run, log: _Logger, step: int):
    """Reads the finite-state guard (a host sync): logs skipped steps, and raises NonFiniteError once it has
    halted (the parameters then are those of the last finite step, and nothing was saved after it)."""
    report = run.state.guard.read()
    if run.config.nan_policy == 'skip_step' and report.num_skipped > run.num_skipped:
        log(f'Skipped {report.num_skipped - run.num_skipped} non-finite update(s) by step {step} '
            f'({report.num_skipped} in all; the newest run of them began at step {report.streak_start}: '
            f'{", ".join(report.streak_terms)}); Config.nan_policy = skip_step.')
        if log.writer is not None:
            log.writer.add_scalar('train_skipped_steps', report.num_skipped, step)
        run.num_skipped = report.num_skipped
    if not report.halted:
        return
    newest = checkpoints.latest_checkpoint(run.config.checkpoint_dir)
    if run.config.nan_policy == 'stop':
        what = f'step {report.streak_start} went non-finite ({", ".join(report.streak_terms)})'
    else:
        what = (f'{report.skips_in_a_row} non-finite steps in a row from step {report.streak_start} '
                f'({", ".join(report.streak_terms)}; Config.nan_max_skips_in_a_row = '
                f'{run.config.nan_max_skips_in_a_row})')
    raise train_utils.NonFiniteError(
        f'Training stopped: {what}; the newest good checkpoint is '
        f'{newest if newest else "none (none was saved yet)"}; lower Config.lr_init or check the data, then '
        'resume with the same command.')


def _save(run: _Run, log: _Logger, step: int):
    _check_finite(run, log, step)  # Never save a state past a non-finite step.
    if run.is_main:
        path = checkpoints.save_checkpoint(run.config.checkpoint_dir, run.state.state_dict(), step,
                                           keep=run.config.checkpoints_to_keep)
        log(f'Saved checkpoint {path}')
    run.last_saved = step


def _stop_requested(run: _Run, stopper: _Stopper, step: int) -> bool:
    """Whether to stop after `step` (under DDP the ranks agree every `_STOP_CHECK_EVERY_DDP` steps)."""
    stop = stopper.requested is not None
    if run.world_size > 1:
        stop = step % _STOP_CHECK_EVERY_DDP == 0 and _any_rank(stop, run.device)
    return stop and step < run.num_steps


def _train_loop(run: _Run, log: _Logger, stopper: _Stopper) -> int:
    """Steps init_step..num_steps (or until a stop is requested); returns the last step done."""
    config = run.config
    step = run.init_step - 1
    run.dataset.set_start_step(run.init_step)  # The prefetch thread serves init_step, init_step + 1, ...
    metric_harness = image.MetricHarness() if run.test_dataset is not None else None
    for step in range(run.init_step, run.num_steps + 1):
        batch = next(run.dataset)
        rng = run.state.step_generator(run.device, run.rank) if config.randomized else None
        run.state, stats = train_utils.train_step(run.state, batch, run.cameras, config, rng,
                                                  camtype=run.dataset.camtype)
        log.record(stats)
        if run.viewer is not None:
            run.viewer.update(run.base_model, step)  # A no-op unless a browser is watching.
        if step == run.init_step or step % config.print_every == 0 or step == run.num_steps:
            _check_finite(run, log, step)
            if run.is_main:
                log.log_stats(run, step)
        if step % config.checkpoint_every == 0 or step == run.num_steps:
            _save(run, log, step)
        if (run.is_main and config.train_render_every > 0 and step % config.train_render_every == 0
                and run.test_dataset is not None):
            _render_test_view(run.base_model, run.test_dataset, config, log.writer, metric_harness,
                              train_utils.train_frac_of(step, config), step, log)
            log.restart_clock()  # Don't count the render in rays/s.
        if _stop_requested(run, stopper, step):
            log(f'Stop requested ({stopper.requested or "by another rank"}) at step {step}; '
                'resume with the same command.')
            if run.last_saved != step:
                _save(run, log, step)
            return step
    if run.init_step > run.num_steps:
        log(f'Nothing to do: the newest checkpoint is at step {run.init_step - 1} >= {run.num_steps}.')
    else:
        log(f'Finished training at step {run.num_steps}.')
    return step


def main(unused_argv):
    rank, world_size, local_rank = common.distributed_env()
    config = common.load_config(for_training=True)
    lock = checkpoints.TrainingLock(config.checkpoint_dir) if rank == 0 else None
    lock_message = lock.acquire() if lock is not None else None
    try:
        _train(config, rank, world_size, local_rank, lock_message)
    finally:
        if lock is not None:
            lock.release()


def _train(config: configs.Config, rank: int, world_size: int, local_rank: int, lock_message: Optional[str]):
    """Setup, the loop and the cleanup of a run, in a checkpoint_dir this process has locked."""
    if config.viewer_port is not None and rank == 0:
        viewer.import_viser()  # A missing viser is reported before anything slow starts.
    with contextlib.ExitStack() as resources:
        run = _setup(config, rank, world_size, local_rank, resources)
        with common.distributed_group(world_size, run.device):
            if world_size > 1:
                # Broadcasts rank 0's parameters, so every rank starts from the same (restored) weights.
                run.state.model = torch.nn.parallel.DistributedDataParallel(
                    run.base_model, device_ids=[run.device.index] if run.device.type == 'cuda' else None)
            _log_and_loop(run, lock_message)


def _log_and_loop(run: _Run, lock_message: Optional[str]):
    """The logger, the signal handlers and the viewer around the training loop."""
    config, world_size = run.config, run.world_size
    log = _Logger(run)
    stopper = _Stopper()
    stopper.install()
    try:
        if lock_message:
            log(lock_message)
        log(f'Training on {run.device} ({world_size} process(es), {config.batch_size // world_size} rays each); '
            f'{run.num_params} parameters; {run.dataset.size} training images; steps {run.init_step}..'
            f'{run.num_steps}.')
        if config.viewer_port is not None and run.is_main:
            test_scene = run.test_dataset.scene if run.test_dataset is not None else None
            run.viewer = viewer.Viewer(run.base_model, config, run.dataset.scene, config.viewer_port,
                                       step=run.init_step - 1, **viewer.initial_camera_of(test_scene))
            log(f'Viewer at {run.viewer.url}')
        _train_loop(run, log, stopper)
        _check_finite(run, log, run.state.step)
    except train_utils.NonFiniteError as e:
        log.to_file(f'error: {common.one_line(e)}')
        common.user_error_exit(e)
    except KeyboardInterrupt:
        log(f'Interrupted during step {run.state.step + 1}; the newest checkpoint on disk is step '
            f'{run.last_saved}.')
        raise SystemExit(130) from None
    finally:
        log.close()
        if run.viewer is not None:
            run.viewer.close()
        stopper.uninstall()


def _render_test_view(model, test_dataset, config, writer, metric_harness, train_frac, step, log):
    """Renders one test image and logs it, its metrics, depth and acc to tensorboard."""
    t0 = time.time()
    test_case = next(test_dataset)
    with common.no_grad_eval(model):
        rendering = models.render_image(functools.partial(model, train_frac=train_frac, compute_extras=True),
                                        test_case.rays, None, config)
    rendering = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in rendering.items()}
    num_rays = int(np.prod(rendering['rgb'].shape[:-1]))
    eval_time = time.time() - t0
    writer.add_scalar('test_rays_per_sec', num_rays / eval_time, step)
    gt = utils.tree_map(lambda x: x.cpu().numpy() if isinstance(x, torch.Tensor) else x, test_case)
    metric = metric_harness(rendering['rgb'], gt.rgb)
    for name, val in metric.items():
        if val is not None and np.isfinite(val):
            writer.add_scalar(f'train_metrics/{name}', val, step)
    log(f'Eval {step}: {eval_time:0.2f}s, {num_rays / eval_time:0.0f} rays/s, ' +
        ', '.join(f'{k}={v:.4f}' for k, v in metric.items() if v is not None and np.isfinite(v)))
    # As the reference: metrics on the full image, tensorboard images decimated by Config.vis_decimate. The
    # ray_* lists ([rays, samples], not images) stay whole: decimating their sample axis breaks their plots.
    images = _decimate({k: v for k, v in rendering.items() if not k.startswith('ray_')}, config.vis_decimate)
    rendering, gt = {**rendering, **images}, _decimate(gt, config.vis_decimate)
    suite = vis.visualize_suite(rendering, gt.rays)
    writer.add_image('test_true_color', np.clip(gt.rgb, 0, 1), step, dataformats='HWC')
    for k, v in suite.items():
        v = np.asarray(v)
        writer.add_image(f'test_output_{k}', np.clip(v, 0, 1), step, dataformats='HWC' if v.ndim == 3 else 'HW')


def run(argv=None):
    common.run(main, 'train', argv)


if __name__ == '__main__':
    run()
