"""Whole-image rendering throughput of `models.render_image` (rays/s) for a gin config.

    python bench/bench_render.py --gin_configs=configs/demo.gin [--gin_bindings=...] [--device=cpu|cuda]
        [--width=128 --height=96] [--repeats=3] [--compile=none|model|mlp] [--amp] [--append]

Renders one camera of the generated scene (`mipnerf360.synthetic`) with a freshly initialised model in eval mode
(deterministic sampling, extras on, as the eval/render commands do), in chunks of Config.render_chunk_size.
Prints one line: rays/s from the median of --repeats renders after one warm-up render, and peak memory.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p)
    p.add_argument('--width', type=int, default=128)
    p.add_argument('--height', type=int, default=96)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--train_frac', type=float, default=1.0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mipnerf360 import models
    config, device, model, amp = benchlib.setup_model(args, train=False)
    rays = benchlib.image_rays(config, device, args.width, args.height, seed=args.seed)
    render_fn = functools.partial(model, train_frac=args.train_frac, compute_extras=True)
    out = {}

    def render(_: int) -> None:
        with amp:
            out['r'] = models.render_image(render_fn, rays, None, config)

    benchlib.reset_peak_memory(device)
    times = benchlib.time_calls(render, device, args.warmup, args.repeats)
    num_rays = args.width * args.height
    secs = benchlib.median(times)
    rays_per_s = num_rays / secs
    mem = benchlib.peak_memory_mib(device)
    cfg = '+'.join(os.path.basename(c) for c in args.gin_configs)
    flags = (f"compile={args.compile}{' amp=bf16' if args.amp else ''}"
             f"{' malloc_tune' if args.malloc_tune else ''} threads={torch.get_num_threads()}")
    mean_rgb = float(out['r']['rgb'].double().mean())
    line = (f'render_image {cfg} device={device.type} {args.width}x{args.height} chunk={config.render_chunk_size} '
            f'{flags}: {secs:.3f} s/image (median of {args.repeats}), {rays_per_s:.0f} rays/s, peak '
            f"{'GPU mem' if device.type == 'cuda' else 'RSS'} {mem:.0f} MiB, mean rgb {mean_rgb:.6f}")
    print(line, flush=True)
    if args.append:
        mem_kind = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'RSS'
        benchlib.append_result(
            f"render_image, {cfg}{' ' + args.label if args.label else ''}", device,
            {'s/image (median)': f'{secs:.3f} ({args.width}x{args.height}, {args.repeats} renders after '
                                 f'{args.warmup} warm-up)',
             'rays/s': f'{rays_per_s:.0f}', 'chunk': str(config.render_chunk_size), 'flags': flags,
             'peak memory': f'{mem:.0f} MiB ({mem_kind})'})
    return rays_per_s


if __name__ == '__main__':
    main()
