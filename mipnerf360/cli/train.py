"""`python -m train --gin_configs=... --gin_bindings=...`: trains a model, resuming from the newest checkpoint.

Multi-GPU: `torchrun --nproc_per_node=N -m train ...` (DDP; NCCL on GPUs, gloo on CPU). Each rank draws
`batch_size / N` rays per step from its own stream, so the global batch matches a single-process run.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import torch

from mipnerf360 import checkpoints, image, models, train_utils, utils, vis
from mipnerf360.cli import common


def _step_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The model's sampling randomness for one step: a pure function of (seed, step, rank), so resumes are exact."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + 0x5EED) % (2**63 - 1))
    return g


class _Stopper:
    """Turns SIGTERM into a flag checked between steps, so the loop can save a checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # Not the main thread (e.g. called from a test harness).
            pass

    def _handler(self, signum, frame):  # pylint: disable=unused-argument
        self.requested = True


def _unwrap(model):
    return model.module if hasattr(model, 'module') else model


def main(unused_argv):
    rank, world_size, local_rank = common.distributed_env()
    config = common.load_config(save_config=(rank == 0))
    device = common.get_device(config, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
        if config.batch_size % world_size:
            raise ValueError(f'Config.batch_size = {config.batch_size} must be divisible by the number of processes '
                                              f'({world_size}).')

    dataset = common.load_dataset('train', config, device, rank, world_size)
    test_dataset = common.load_dataset('test', config, device) if rank == 0 else None

    torch.manual_seed(config.seed)  # Identical initial weights on every rank.
    model = models.Model(config=config).to(device)
    base_model = model
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if base_model.num_glo_features > 0 and dataset.size > base_model.num_glo_embeddings:
        raise ValueError(f'Model.num_glo_embeddings = {base_model.num_glo_embeddings} is smaller than the number of '
                                          f'training images ({dataset.size}); raise it with --gin_bindings.')
    optimizer, lr_fn = train_utils.create_optimizer(config, model)
    last_step = common.restore_model(model, config, device, required=False, optimizer=optimizer)
    init_step = last_step + 1
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None)

    num_steps = config.early_exit_steps if config.early_exit_steps is not None else config.max_steps
    is_main = rank == 0
    writer = log_file = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(config.checkpoint_dir)
        log_file = open(os.path.join(config.checkpoint_dir, 'train_log.txt'), 'a')
    metric_harness = image.MetricHarness() if is_main else None

    def log(msg: str):
        if is_main:
            print(msg, flush=True)
            log_file.write(msg + '\n')
            log_file.flush()

    log(f'Training on {device} ({world_size} process(es)); {num_params} parameters; '
            f'{dataset.size} training images; steps {init_step}..{num_steps}.')

    def save(step: int):
        if is_main:
            state = {'model': base_model.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
                              'seed': config.seed}
            path = checkpoints.save_checkpoint(config.checkpoint_dir, state, step, keep=config.checkpoints_to_keep)
            log(f'Saved checkpoint {path}')

    stopper = _Stopper()
    cameras = getattr(dataset, 'cameras', None)
    precision = int(np.ceil(np.log10(max(config.max_steps, 2)))) + 1
    stats_buffer = []
    window_start, window_steps = time.time(), 0
    step = init_step - 1
    try:
        for step in range(init_step, num_steps + 1):
            batch = dataset.get_train_batch(step)
            train_frac = float(np.clip((step - 1) / max(config.max_steps - 1, 1), 0, 1))
            rng = _step_generator(device, config.seed, step, rank) if config.randomized else None
            stats = train_utils.train_step(model, optimizer, lr_fn, batch, cameras, train_frac, step, config, rng)
            window_steps += 1
            if is_main:
                stats_buffer.append(stats)

            if is_main and (step == init_step or step % config.print_every == 0 or step == num_steps):
                floats = [train_utils.stats_to_float(s) for s in stats_buffer]
                avg = {k: float(np.mean([f[k] for f in floats])) for k in floats[0]}
                elapsed = time.time() - window_start
                steps_per_sec = window_steps / max(elapsed, 1e-9)
                rays_per_sec = config.batch_size * steps_per_sec
                lr = float(lr_fn(step - 1))
                for k, v in avg.items():
                    writer.add_scalar(f'train_avg_{k}', v, step)
                writer.add_scalar('train_learning_rate', lr, step)
                writer.add_scalar('train_steps_per_sec', steps_per_sec, step)
                writer.add_scalar('train_rays_per_sec', rays_per_sec, step)
                writer.add_scalar('train_num_params', num_params, step)
                losses = ', '.join(f'{k[7:11]}={v:0.5f}' if 1e-4 <= v < 10 else f'{k[7:11]}={v:0.1e}'
                                                      for k, v in avg.items() if k.startswith('losses/'))
                remaining = (num_steps - step) / max(steps_per_sec, 1e-9)
                log(f'{step:{precision}d}/{config.max_steps:d}: loss={avg["loss"]:0.5f}, psnr={avg["psnr"]:6.3f}, '
                        f'lr={lr:0.2e} | {losses}, {rays_per_sec:0.0f} r/s, ETA {remaining / 60:0.1f} min')
                stats_buffer = []
                window_start, window_steps = time.time(), 0

            if step % config.checkpoint_every == 0 or step == num_steps:
                save(step)

            if (is_main and config.train_render_every > 0 and step % config.train_render_every == 0
                    and test_dataset is not None):
                _render_test_view(base_model, test_dataset, config, writer, metric_harness, train_frac, step, log)
                window_start = time.time()  # Don't count the render in rays/s.

            if stopper.requested:
                log(f'Stop requested at step {step}; saving a checkpoint.')
                if step % config.checkpoint_every != 0 and step != num_steps:
                    save(step)
                break
    except KeyboardInterrupt:
        completed = step - 1 if step >= init_step else init_step - 1  # `step` may be half done.
        if completed >= init_step:
            log(f'Interrupted; saving a checkpoint at step {completed}.')
            save(completed)
        raise SystemExit(130)
    finally:
        if is_main:
            writer.close()
            log_file.close()
        if world_size > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


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
    suite = vis.visualize_suite(rendering, gt.rays)
    writer.add_image('test_true_color', np.clip(gt.rgb, 0, 1), step, dataformats='HWC')
    for k, v in suite.items():
        v = np.asarray(v)
        writer.add_image(f'test_output_{k}', np.clip(v, 0, 1), step, dataformats='HWC' if v.ndim == 3 else 'HW')


def run(argv=None):
    common.run(main, 'train', argv)


if __name__ == '__main__':
    run()
