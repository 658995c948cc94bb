"""Training memory: bytes of activations kept for the backward pass per ray, and `Config.grad_accum_steps = 'auto'`.

`saved_bytes_per_ray` measures, on any device, what one training forward pass keeps for backward (the unique
storages handed to autograd's saved-tensor hooks, parameters excluded) per ray: the difference between two
probe batches of random rays, divided by their size, so constant parts cancel. `auto_grad_accum_steps` turns it
and the free CUDA memory into the number of micro-batches (`train_utils.compute_gradients`).
"""

from __future__ import annotations

import dataclasses
import math as pymath
from typing import Any, Callable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from mipnerf360 import models, utils

PROBE_RAYS = 64  # Rays of the smaller probe batch (the larger has twice as many).
# Share of the free memory the saved activations may take: the rest is for what a step holds besides them
# (transient buffers of the forward and backward, the gradients, Adam's moments, the allocator's slack).
TRAIN_MEMORY_FRACTION = 0.6


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Optional[torch.nn.Module] = None) -> int:
    """Bytes of the storages that `fn()` saves for backward and that are still held when it returns (each
    storage counted once, whatever the number of views of it saved; parts of the graph freed during `fn`, e.g.
    behind a detach, are not counted), leaving out the parameters and buffers of `exclude`."""
    skip = set()
    if exclude is not None:
        skip = {t.untyped_storage().data_ptr() for t in list(exclude.parameters()) + list(exclude.buffers())}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved.append(((storage.device, storage.data_ptr()), storage.nbytes(), StorageWeakRef(storage)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = fn()
    held = {key: nbytes for key, nbytes, ref in saved if not ref.expired()}
    del outputs
    return sum(held.values())


def probe_rays(num_rays: int, config: Any, device: torch.device, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> utils.Rays:
    """`num_rays` random rays from points in [-1, 1]^3 in random directions, bounded by `config.near/far`."""
    gen = torch.Generator().manual_seed(seed)
    origins = 2 * torch.rand(num_rays, 3, generator=gen, dtype=dtype) - 1
    directions = torch.randn(num_rays, 3, generator=gen, dtype=dtype)
    ones = torch.ones(num_rays, 1, dtype=dtype)
    rays = utils.Rays(origins=origins, directions=directions,
                      viewdirs=directions / directions.norm(dim=-1, keepdim=True), radii=ones * 1e-3,
                      imageplane=torch.zeros(num_rays, 2, dtype=dtype), lossmult=ones, near=ones * config.near,
                      far=ones * config.far, cam_idx=torch.zeros(num_rays, 1, dtype=torch.long))
    return rays.to(device)


def saved_bytes_per_ray(model: models.Model, config: Any, num_rays: int = PROBE_RAYS) -> float:
    """Bytes a training forward pass of `model` (randomized, as `Config.randomized`) keeps for backward per ray,
    from probes of `num_rays` and 2 `num_rays` random rays on the model's device."""
    param = next(model.parameters())
    device = param.device

    def forward_bytes(n: int) -> int:
        rays = probe_rays(n, config, device, param.dtype, seed=n)
        rng = torch.Generator(device=device).manual_seed(0) if config.randomized else None
        return saved_tensor_bytes(lambda: model(rng, rays, train_frac=0.5, compute_extras=False), exclude=model)

    was_training = model.training
    model.train()
    try:
        small, large = forward_bytes(num_rays), forward_bytes(2 * num_rays)
    finally:
        model.train(was_training)
    return (large - small) / num_rays


def auto_grad_accum_steps(model: models.Model, config: Any, rays_per_process: int) -> int:
    """The number of micro-batches for `Config.grad_accum_steps = 'auto'`: the fewest whose saved activations
    fit in `TRAIN_MEMORY_FRACTION` of the free memory of the model's CUDA device (1 off CUDA). At most
    `rays_per_process`."""
    device = next(model.parameters()).device
    free = models.free_device_memory(device)
    if free is None:
        return 1
    micro_rays = max(1, int(TRAIN_MEMORY_FRACTION * free / saved_bytes_per_ray(model, config)))
    return min(rays_per_process, pymath.ceil(rays_per_process / micro_rays))


def resolve_grad_accum_steps(config: Any, model: models.Model, world_size: int = 1) -> Any:
    """`config` with `grad_accum_steps = 'auto'` replaced by `auto_grad_accum_steps` for this process's share of
    the batch; `config` itself otherwise. Call it once, before training (free memory shrinks as torch caches)."""
    if config.grad_accum_steps != 'auto':
        return config
    steps = auto_grad_accum_steps(model, config, config.batch_size // max(world_size, 1))
    return dataclasses.replace(config, grad_accum_steps=steps)
