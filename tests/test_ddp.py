"""`torchrun --nproc_per_node=2 -m train ...` on CPU (gloo): the ranks stay in lockstep and split the batch; and
two gloo processes (torch.multiprocessing) end with the parameters of one process trained on the global batch.

A `sitecustomize` on the workers' PYTHONPATH wraps `train_utils.train_step` to record, on every rank, the rays
each step sees and (at exit) the rank's final parameters, so the command itself runs unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from mipnerf360 import checkpoints, synthetic

from test_cli import REPO, TINY_GIN, _check_ok, _cli, _env, _flags

_PROBE = '''
import atexit, os
if 'LOCAL_RANK' in os.environ:
    import torch
    from mipnerf360 import train_utils
    _real = train_utils.train_step
    _seen = {'rgb': [], 'model': None}

    def _spy(state, batch, *args, **kwargs):
        model = state.model
        _seen['model'] = model.module if hasattr(model, 'module') else model
        _seen['rgb'].append(batch.rgb.detach().reshape(-1, 3).clone())
        return _real(state, batch, *args, **kwargs)

    train_utils.train_step = _spy

    @atexit.register
    def _dump():
        if _seen['model'] is not None:
            torch.save({'model': _seen['model'].state_dict(), 'rgb': _seen['rgb']},
                       os.path.join(os.environ['PROBE_DIR'], 'rank%s.pt' % os.environ['RANK']))
'''


def test_torchrun_two_ranks_on_cpu(tmp_path):
    scene = tmp_path / 'scene'
    synthetic.write_colmap_scene(str(scene), n_views=16, width=64, height=48, factors=(2,), seed=0)
    gin_file = tmp_path / 'tiny.gin'
    gin_file.write_text(TINY_GIN.format(steps=4))
    ckpt = tmp_path / 'ddp' / 'ckpt'
    probe = tmp_path / 'probe'
    probe.mkdir()
    (probe / 'sitecustomize.py').write_text(_PROBE)
    env = _env()
    env['PYTHONPATH'] = os.pathsep.join([str(probe), REPO, env.get('PYTHONPATH', '')])
    env['PROBE_DIR'] = str(probe)
    env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'train']
    proc = subprocess.run(cmd + _flags(str(gin_file), str(scene), str(ckpt), 'Config.batch_size = 256'),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    _check_ok(proc)
    assert '2 process(es), 128 rays each' in proc.stdout

    ranks = [torch.load(probe / f'rank{r}.pt', weights_only=True) for r in range(2)]
    # Each rank draws batch_size / world_size rays per step, and not the same ones.
    for r in ranks:
        assert len(r['rgb']) == 4 and all(x.shape == (128, 3) for x in r['rgb'])
    for a, b in zip(ranks[0]['rgb'], ranks[1]['rgb']):
        assert not torch.equal(a, b)
    # DDP keeps the ranks' parameters identical, and rank 0's checkpoint holds them.
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(str(ckpt)))
    assert state['step'] == 4
    for k, v in ranks[0]['model'].items():
        assert torch.equal(v, ranks[1]['model'][k]), k
        assert torch.equal(v, state['model'][k]), k

    # The checkpoint written under DDP loads for eval.
    ev = _cli('eval', str(gin_file), str(scene), str(ckpt))
    _check_ok(ev)
    with open(ckpt / 'test_preds' / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['step'] == 4 and np.isfinite(metrics['psnr']) and metrics['psnr'] > 5


# DDP proven equal: two gloo processes, each training on its half of every global batch, end with the parameters
# of one process that trains on the whole batches (float64, deterministic sampling), with and without gradient
# accumulation.
_DDP_STEPS = 3
_DDP_BATCH = 48


def _ddp_config(grad_accum_steps: int):
    from mipnerf360 import configs
    return configs.Config(randomized=False, batch_size=_DDP_BATCH, near=0.2, far=1e3, lr_init=1e-2, lr_final=1e-3,
                          lr_delay_steps=0, max_steps=_DDP_STEPS, grad_accum_steps=grad_accum_steps)


def _ddp_batch(step: int):
    from mipnerf360 import utils
    from test_models import _random_rays
    rgb = torch.rand(_DDP_BATCH, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + step))
    return utils.Batch(rays=_random_rays(_DDP_BATCH, seed=step), rgb=rgb)


def _ddp_train(model, grad_accum_steps: int, rank: int = 0, world_size: int = 1):
    """`_DDP_STEPS` train steps of `model` (DDP-wrapped or not) on this rank's share of each global batch."""
    from mipnerf360 import train_utils
    config = _ddp_config(grad_accum_steps)
    state = train_utils.create_train_state(config, model)
    share = _DDP_BATCH // world_size
    for step in range(_DDP_STEPS):
        batch = _ddp_batch(step)[rank * share:(rank + 1) * share]
        state.step = step
        train_utils.train_step(state, batch, None, config, None, train_frac=step / _DDP_STEPS)
    inner = model.module if hasattr(model, 'module') else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    from test_models import _tiny_model
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        results = {}
        for accum in (1, 2):
            ddp = torch.nn.parallel.DistributedDataParallel(_tiny_model())
            results[accum] = _ddp_train(ddp, accum, rank, world_size)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp
    from test_models import _tiny_model
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'store'), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    initial = _tiny_model().state_dict()
    single = _ddp_train(_tiny_model(), 1)
    for accum in (1, 2):
        for k, v in single.items():
            torch.testing.assert_close(ranks[0][accum][k], v, rtol=1e-9, atol=1e-12, msg=f'{k}, accum {accum}')
            assert torch.equal(ranks[0][accum][k], ranks[1][accum][k]), k
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 1e-3  # The steps changed the parameters by far more than the tolerance.


def test_every_parameter_of_every_method_gets_a_gradient(tmp_path):
    """DistributedDataParallel (as train wraps the model, without find_unused_parameters) fails at the second
    step when a parameter gets no gradient; so for each method's config every parameter must get one."""
    import gin
    import pytest
    from mipnerf360 import configs, datasets, train_utils
    from mipnerf360.cli import common
    from test_fake_cuda import METHODS, TINY_MODEL
    for name, (gin_file, write_scene, bindings) in sorted(METHODS.items()):
        scene = str(tmp_path / name)
        try:
            write_scene(scene)
        except pytest.skip.Exception:  # RawNeRF without the optional DNG packages.
            continue
        gin.clear_config()
        try:
            config = configs.load_config(save_config=False, gin_configs=[os.path.join(REPO, gin_file)],
                                         gin_bindings=[f"Config.data_dir = '{scene}'", *TINY_MODEL, *bindings])
            sampler = datasets.RaySampler(datasets.load_scene(config, 'train'), config, device='cpu')
            model = common.build_model(config, torch.device('cpu'))
        finally:
            gin.clear_config()
        state = train_utils.create_train_state(config, model)
        train_utils.train_step(state, sampler.get_train_batch(1), sampler.cameras, config,
                               state.step_generator('cpu'), sampler.camtype)
        assert sum(1 for _ in model.parameters()) > 8
        assert [k for k, p in model.named_parameters() if p.grad is None] == [], name
