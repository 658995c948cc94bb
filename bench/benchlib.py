"""Shared helpers of the benchmark scripts: config loading, a generated scene's rays, timing and reporting."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO_ROOT, 'bench', 'RESULTS.md')


def load_config(gin_configs: Sequence[str], gin_bindings: Sequence[str]):
    """Parses gin files (paths relative to the repository root allowed) and bindings; returns the Config."""
    import gin
    from mipnerf360 import configs
    gin.clear_config()
    return configs.load_config(save_config=False, gin_configs=list(gin_configs), gin_bindings=list(gin_bindings))


def scene_rays(num_rays: int, config, device: torch.device, seed: int = 0, width: int = 128, height: int = 96,
               with_rgb: bool = True):
    """`num_rays` rays through random pixels of cameras on a ring around the generated scene (`synthetic`),
    with the ray-traced colours as targets. Returns a `utils.Batch` on `device` (float32)."""
    from mipnerf360 import camera_utils, synthetic, utils
    rng = np.random.default_rng(seed)
    poses = synthetic.ring_poses(16, seed=seed)
    pixtocam = np.linalg.inv(synthetic.intrinsics(1.1 * width, width, height))
    cam = rng.integers(0, len(poses), num_rays)
    px = rng.integers(0, width, num_rays)
    py = rng.integers(0, height, num_rays)
    c2w = torch.as_tensor(poses[cam], dtype=torch.float32)
    origins, directions, viewdirs, radii, imageplane = camera_utils.pixels_to_rays(
        torch.as_tensor(px), torch.as_tensor(py), torch.as_tensor(pixtocam, dtype=torch.float32), c2w,
        xnp=torch)
    ones = torch.ones(num_rays, 1)
    rays = utils.Rays(origins=origins.float(), directions=directions.float(), viewdirs=viewdirs.float(),
                      radii=radii.float(), imageplane=imageplane.float(), lossmult=ones,
                      near=ones * config.near, far=ones * config.far,
                      cam_idx=torch.as_tensor(cam)[:, None].long())
    rgb = None
    if with_rgb:
        rgb_np, _, _ = synthetic.trace(origins.double().numpy(), directions.double().numpy())
        rgb = torch.as_tensor(rgb_np, dtype=torch.float32)
    return utils.Batch(rays=rays, rgb=rgb).to(device)


def image_rays(config, device: torch.device, width: int, height: int, seed: int = 0):
    """Rays `[height, width]` of one camera looking at the generated scene."""
    from mipnerf360 import camera_utils, synthetic
    pose = torch.as_tensor(synthetic.ring_poses(16, seed=seed)[0], dtype=torch.float32)
    rays = camera_utils.cast_pinhole_rays(pose, height, width, 1.1 * width, config.near, config.far, xnp=torch)
    return rays.to(device)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU), in MiB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB.


def time_calls(fn: Callable[[int], None], device: torch.device, warmup: int,
               steps: int, cpu_times: Optional[List[float]] = None) -> List[float]:
    """Runs fn(i) warmup times untimed, then `steps` times timed (synchronising around each); wall seconds each.

    If `cpu_times` is given, the process CPU time (user + system, all threads) of each timed call is appended to
    it: on a machine shared with other jobs this is steadier than wall time.
    """
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(warmup, warmup + steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def time_train_steps(state, config, batches: Sequence, device: torch.device, warmup: int, steps: int,
                     seed: int = 0, cpu_times: Optional[List[float]] = None):
    """Times `train_utils.train_step` on `batches` in turn (step i: batch i mod len, its own seeded generator,
    train_frac = i / (max_steps - 1)) with `time_calls`; returns (wall seconds of each timed step, the losses of
    all steps as tensors)."""
    from mipnerf360 import train_utils
    losses = []

    def step(i: int) -> None:
        rng = torch.Generator(device=device)
        rng.manual_seed(seed * 7919 + i)
        train_frac = min(i / max(config.max_steps - 1, 1), 1.)
        state.step = i
        _, stats = train_utils.train_step(state, batches[i % len(batches)], None, config, rng, train_frac=train_frac)
        losses.append(stats['loss'])

    return time_calls(step, device, warmup, steps, cpu_times), losses


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def machine_description(device: torch.device) -> str:
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                for line in f:
                    if line.startswith('model name'):
                        name = line.split(':', 1)[1].strip()
                        break
        except OSError:
            pass
        name = f'{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'
    return f'{name}; torch {torch.__version__}; python {platform.python_version()}'


def append_result(title: str, device: torch.device, figures: Dict[str, str], note: Optional[str] = None) -> None:
    """Appends one record (machine, date, command, figures) to bench/RESULTS.md."""
    command = shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])
    env_keys = ('PYTHONPATH', 'OMP_NUM_THREADS', 'MALLOC_ARENA_MAX', 'MALLOC_TRIM_THRESHOLD_',
                'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_', 'LD_PRELOAD')
    env = ' '.join(f'{k}={os.environ[k]}' for k in env_keys if k in os.environ)
    lines = [f'\n### {title}\n',
             f'- date: {datetime.date.today().isoformat()}',
             f'- machine: {machine_description(device)}',
             f'- command: `{(env + " ") if env else ""}python {command}`']
    lines += [f'- {k}: {v}' for k, v in figures.items()]
    if note:
        lines.append(f'- note: {note}')
    new_file = not os.path.exists(RESULTS_MD)
    with open(RESULTS_MD, 'a') as f:
        if new_file:
            f.write('# Benchmark results\n')
        f.write('\n'.join(lines) + '\n')


def add_common_args(p, gin_configs_default: Sequence[str] = ('configs/demo.gin',),
                    gin_configs_help: Optional[str] = None) -> None:
    """Flags shared by the benchmarks: config, device, precision/compile modes, malloc option, result recording."""
    p.add_argument('--gin_configs', nargs='+', default=list(gin_configs_default), help=gin_configs_help)
    p.add_argument('--gin_bindings', nargs='*', default=[])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--precision', choices=['fp32', 'tf32', 'bf16'], default=None,
                   help="Config.precision (default: the config's; None there is TF32 on CUDA, float32 on CPU)")
    p.add_argument('--compile', choices=['none', 'mlp', 'model'], default=None,
                   help="Config.compile (models.compile_model; default: the config's)")
    p.add_argument('--checkpoint_nerf_mlp', action='store_true', help='Config.checkpoint_nerf_mlp = True')
    p.add_argument('--malloc_tune', action='store_true',
                   help='keep freed memory in the process (glibc mallopt; see utils.tune_glibc_malloc)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--append', action='store_true', help='append the result to bench/RESULTS.md')
    p.add_argument('--label', default='', help='free text recorded with --append')
    p.add_argument('--json', default=None, help='append the figures as one JSON line to this file')


def write_json(args, row: Dict[str, object]) -> None:
    """Appends `row` (with the label) as one JSON line to `args.json`, when given (gpu_check.sh's table)."""
    if args.json:
        import json
        with open(args.json, 'a') as f:
            f.write(json.dumps({'label': args.label, **row}) + '\n')


def setup_model(args, train: bool, **overrides):
    """Applies the common flags and builds the model as train / eval / render do (`cli.common.build_model`: seeded,
    at Config.precision, compiled as Config.compile says); returns (config, device, model). `overrides` are
    further Config fields."""
    import dataclasses
    from mipnerf360 import configs, utils
    from mipnerf360.cli import common
    if args.malloc_tune and not utils.tune_glibc_malloc():
        print('warning: --malloc_tune had no effect (not glibc?)', file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.gin_configs, args.gin_bindings)
    flags = dict(precision=args.precision, compile=args.compile,
                 checkpoint_nerf_mlp=args.checkpoint_nerf_mlp or None)
    config = dataclasses.replace(config, **{k: v for k, v in {**flags, **overrides}.items() if v is not None})
    configs.validate_config(config)
    device = torch.device(args.device)
    model = common.build_model(dataclasses.replace(config, seed=args.seed), device)
    model.train(train)
    return config, device, model


def mode_flags(config, args) -> str:
    """The modes a figure was measured in, e.g. 'precision=bf16 compile=model threads=2'."""
    from mipnerf360 import models
    parts = [f'precision={models.resolve_precision(config.precision, args.device)}', f'compile={config.compile}']
    if config.checkpoint_nerf_mlp:
        parts.append('checkpoint_nerf_mlp')
    if args.malloc_tune:
        parts.append('malloc_tune')
    return ' '.join(parts + [f'threads={torch.get_num_threads()}'])
