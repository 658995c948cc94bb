"""Bytes of activations a training forward pass keeps for backward, per ray (`memory.saved_bytes_per_ray`).

    python bench/bench_memory.py [--gin_configs=configs/360.gin] [--gin_bindings=...] [--device=cpu|cuda]
        [--precision fp32 bf16] [--checkpoint_nerf_mlp] [--probe_rays=64] [--batch_size=16384] [--append]

For each precision, prints one line: saved bytes per ray (the difference of two probe batches of random rays,
so constant parts cancel), and what a batch of --batch_size rays keeps (default Config.batch_size). The figure is
the same on any device (it counts tensors, not allocator pages); the peak memory of a step adds the transient
buffers of forward and backward, the gradients and Adam's moments (see bench_train.py for peaks on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gin_configs', nargs='+', default=['configs/360.gin'])
    p.add_argument('--gin_bindings', nargs='*', default=[])
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'tf32', 'bf16'])
    p.add_argument('--checkpoint_nerf_mlp', action='store_true', help='also measure with Config.checkpoint_nerf_mlp')
    p.add_argument('--probe_rays', type=int, default=64)
    p.add_argument('--batch_size', type=int, default=None, help='default: Config.batch_size')
    p.add_argument('--append', action='store_true', help='append the result to bench/RESULTS.md')
    p.add_argument('--label', default='')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mipnerf360 import memory, models
    config = benchlib.load_config(args.gin_configs, args.gin_bindings)
    device = torch.device(args.device)
    batch = args.batch_size or config.batch_size
    cfg = '+'.join(os.path.basename(c) for c in args.gin_configs)
    results = {}
    for checkpointed in [False, True] if args.checkpoint_nerf_mlp else [False]:
        torch.manual_seed(0)
        model = models.Model(config=dataclasses.replace(config, checkpoint_nerf_mlp=checkpointed)).to(device)
        for precision in args.precision:
            model.set_precision(precision)
            per_ray = memory.saved_bytes_per_ray(model, config, args.probe_rays)
            name = precision + (' + checkpoint_nerf_mlp' if checkpointed else '')
            results[name] = per_ray
            print(f'saved activations {cfg} {name}: {per_ray / 1024:.1f} KiB/ray, {per_ray * batch / 2**30:.2f} GiB '
                  f'for {batch} rays', flush=True)
    if args.append:
        benchlib.append_result(
            f"saved activations per ray, {cfg}{' ' + args.label if args.label else ''}", device,
            {name: f'{b / 1024:.1f} KiB/ray ({b * batch / 2**30:.2f} GiB at batch {batch})'
             for name, b in results.items()})
    return results


if __name__ == '__main__':
    main()
