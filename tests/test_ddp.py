"""`torchrun --nproc_per_node=2 -m train ...` on CPU (gloo): the ranks stay in lockstep and split the batch.

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
