"""Whole-image rendering throughput of `models.render_image` (rays/s) for a gin config.

    python bench/bench_render.py --gin_configs=configs/360.gin [--gin_bindings=...] [--device=cpu|cuda]
        [--width=128 --height=96] [--repeats=3] [--precision=fp32|tf32|bf16] [--compile=none|mlp|model]
        [--chunk=N|auto] [--append]

Renders one camera of the generated scene (`mipnerf360.synthetic`) with a freshly initialised model in eval mode
(deterministic sampling, extras on, as the eval/render commands do), built as they build it (Config.precision,
Config.compile), in chunks of Config.render_chunk_size (--chunk auto: None, sized from the free CUDA memory).
Prints one line: rays/s from the median of --repeats renders after one warm-up render, and peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument('--chunk', default=None, help="Config.render_chunk_size: an integer or 'auto' (None)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mipnerf360 import models
    chunk = None if args.chunk in (None, 'auto') else int(args.chunk)
    config, device, model = benchlib.setup_model(args, train=False, render_chunk_size=chunk)
    if args.chunk == 'auto':
        config = dataclasses.replace(config, render_chunk_size=None)
    rays = benchlib.image_rays(config, device, args.width, args.height, seed=args.seed)
    render_fn = functools.partial(model, train_frac=args.train_frac, compute_extras=True)
    out = {}

    def render(_: int) -> None:
        out['r'] = models.render_image(render_fn, rays, None, config)

    benchlib.reset_peak_memory(device)
    times = benchlib.time_calls(render, device, args.warmup, args.repeats)
    num_rays = args.width * args.height
    secs = benchlib.median(times)
    rays_per_s = num_rays / secs
    mem = benchlib.peak_memory_mib(device)
    cfg = '+'.join(os.path.basename(c) for c in args.gin_configs)
    flags = benchlib.mode_flags(config, args)
    mean_rgb = float(out['r']['rgb'].double().mean())
    line = (f'render_image {cfg} device={device.type} {args.width}x{args.height} chunk={config.render_chunk_size or "auto"} '
            f'{flags}: {secs:.3f} s/image (median of {args.repeats}), {rays_per_s:.0f} rays/s, peak '
            f"{'GPU mem' if device.type == 'cuda' else 'RSS'} {mem:.0f} MiB, mean rgb {mean_rgb:.6f}")
    print(line, flush=True)
    benchlib.write_json(args, {'bench': 'render', 'config': cfg, 'flags': flags, 'size': f'{args.width}x{args.height}',
                               'ms': 1e3 * secs, 'rays_per_s': rays_per_s, 'peak_mib': mem, 'mean_rgb': mean_rgb})
    if args.append:
        mem_kind = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'RSS'
        benchlib.append_result(
            f"render_image, {cfg}{' ' + args.label if args.label else ''}", device,
            {'s/image (median)': f'{secs:.3f} ({args.width}x{args.height}, {args.repeats} renders after '
                                 f'{args.warmup} warm-up)',
             'rays/s': f'{rays_per_s:.0f}', 'chunk': str(config.render_chunk_size or 'auto'), 'flags': flags,
             'peak memory': f'{mem:.0f} MiB ({mem_kind})'})
    return rays_per_s


if __name__ == '__main__':
    main()
