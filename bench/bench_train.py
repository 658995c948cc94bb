"""Throughput of the real training step (`train_utils.train_step`) for a gin config.

    python bench/bench_train.py --gin_configs=configs/360.gin [--gin_bindings=...] [--device=cpu|cuda]
        [--batch_size=N] [--steps=10 --warmup=3] [--precision=fp32|tf32|bf16] [--compile=none|mlp|model]
        [--grad_accum_steps=K|auto] [--checkpoint_nerf_mlp] [--append]

Rays are drawn from cameras around the generated scene of `mipnerf360.synthetic` (targets ray-traced there),
a few different batches in turn. The model is built as `python -m train` builds it (Config.precision,
Config.compile through `models.compile_model`). Prints one line: ms/step (median over --steps after --warmup),
rays/s, peak memory (process RSS on CPU, torch.cuda.max_memory_allocated on GPU). --append also records it in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p)
    p.add_argument('--batch_size', type=int, default=None, help='overrides Config.batch_size')
    p.add_argument('--steps', type=int, default=10, help='timed steps')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first')
    p.add_argument('--num_batches', type=int, default=4, help='distinct batches cycled through')
    p.add_argument('--grad_accum_steps', default=None, help="Config.grad_accum_steps: an integer or 'auto'")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mipnerf360 import memory, train_utils
    accum = args.grad_accum_steps
    accum = None if accum is None else accum if accum == 'auto' else int(accum)
    config, device, model = benchlib.setup_model(args, train=True, batch_size=args.batch_size,
                                                 grad_accum_steps=accum)
    config = memory.resolve_grad_accum_steps(config, model)
    batch_size = config.batch_size
    state = train_utils.create_train_state(config, model)

    batches = [benchlib.scene_rays(batch_size, config, device, seed=args.seed + i)
               for i in range(args.num_batches)]

    benchlib.reset_peak_memory(device)
    cpu_times = []
    times, losses = benchlib.time_train_steps(state, config, batches, device, args.warmup, args.steps, args.seed,
                                              cpu_times)
    cpu_ms = 1e3 * benchlib.median(cpu_times)
    ms = 1e3 * benchlib.median(times)
    rays_per_s = batch_size / (ms / 1e3)
    mem = benchlib.peak_memory_mib(device)
    final_loss = float(losses[-1])
    cfg = '+'.join(os.path.basename(c) for c in args.gin_configs)
    flags = benchlib.mode_flags(config, args) + f' grad_accum_steps={config.grad_accum_steps}'
    line = (f'train_step {cfg} device={device.type} batch={batch_size} {flags}: {ms:.1f} ms/step (median of '
            f'{args.steps}, min {1e3 * min(times):.1f}; CPU time {cpu_ms:.1f} ms/step), {rays_per_s:.0f} rays/s, '
            f'peak '
            f"{'GPU mem' if device.type == 'cuda' else 'RSS'} {mem:.0f} MiB, last loss {final_loss:.6f}")
    print(line, flush=True)
    benchlib.write_json(args, {'bench': 'train', 'config': cfg, 'flags': flags, 'batch': batch_size, 'ms': ms,
                               'rays_per_s': rays_per_s, 'peak_mib': mem, 'loss': final_loss})
    if args.append:
        mem_kind = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'RSS'
        benchlib.append_result(
            f"train_step, {cfg}{' ' + args.label if args.label else ''}", device,
            {'ms/step (median)': f'{ms:.1f} (min {1e3 * min(times):.1f}, {args.steps} steps after {args.warmup} '
                                  'warm-up)',
             'CPU time/step (median, all threads)': f'{cpu_ms:.1f} ms',
             'rays/s': f'{rays_per_s:.0f}', 'batch': str(batch_size), 'flags': flags,
             'peak memory': f'{mem:.0f} MiB ({mem_kind})'})
    return ms


if __name__ == '__main__':
    main()
