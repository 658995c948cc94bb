"""Whole-image rendering throughput of `models.render_image` (rays/s) for a gin config.

    python bench/bench_render.py --gin_configs=configs/demo.gin [--gin_bindings=...] [--device=cpu|cuda]
        [--width=128 --height=96] [--repeats=3] [--compile=none|model|mlp] [--amp] [--append]

Renders one camera of the generated scene (`mipnerf360.synthetic`) with a freshly initialised model in eval mode
(deterministic sampling, extras on, as the eval/render commands do), in chunks of Config.render_chunk_size.
Prints one line: rays/s from the median of --repeats renders after one warm-up render, and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib
from mipnerf360 import utils  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gin_configs', nargs='+', default=['configs/demo.gin'])
    p.add_argument('--gin_bindings', nargs='*', default=[])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--width', type=int, default=128)
    p.add_argument('--height', type=int, default=96)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--train_frac', type=float, default=1.0)
    p.add_argument('--compile', choices=['none', 'model', 'mlp'], default='none')
    p.add_argument('--amp', action='store_true', help='bf16 autocast around rendering')
    p.add_argument('--malloc_tune', action='store_true',
                   help='keep freed memory in the process (glibc mallopt; see utils.tune_glibc_malloc)')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--append', action='store_true', help='append the result to bench/RESULTS.md')
    p.add_argument('--label', default='')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.malloc_tune and not utils.tune_glibc_malloc():
        print('warning: --malloc_tune had no effect (not glibc?)', file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mipnerf360 import models
    config = benchlib.load_config(args.gin_configs, args.gin_bindings)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = models.Model(config=config).to(device)
    model.eval()
    if args.compile == 'model':
        model.compile()
    elif args.compile == 'mlp':
        for mlp in (model.nerf_mlp, model.prop_mlp):
            if mlp is not None:
                mlp.compile()
    rays = benchlib.image_rays(config, device, args.width, args.height, seed=args.seed)
    render_fn = functools.partial(model, train_frac=args.train_frac, compute_extras=True)
    amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.amp
           else contextlib.nullcontext())
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
