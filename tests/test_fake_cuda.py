"""The CUDA code paths of train / eval / render, run on a simulated CUDA device (tests/fakecuda.py) on this
CPU-only machine: every tensor the commands put on 'cuda' stays there (an operator mixing devices, a CPU
generator drawing for a CUDA tensor or `.numpy()` of a CUDA tensor fails), the branches taken only on CUDA run
(device selection, set_device, free-memory render chunks, synchronisation), and eval / render give the CPU's
numbers. Speed, memory and CUDA kernels need a real GPU (tests/test_gpu.py, bench/gpu_check.sh)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import gin
import numpy as np
import pytest
import torch

import fakecuda
from mipnerf360 import checkpoints, configs, models, utils
from mipnerf360.cli import eval as eval_cli
from mipnerf360.cli import render as render_cli
from mipnerf360.cli import train as train_cli
from test_cli_faults import _run, write_tiny_scene

# Density-gradient normals need a backward pass, which the simulated device cannot run (see fakecuda).
NO_NORMALS = ['NerfMLP.disable_density_normals = True', 'PropMLP.disable_density_normals = True']


@pytest.fixture(scope='module')
def device_guard():
    try:
        fakecuda.register_device_guard()
    except Exception as e:  # pylint: disable=broad-except
        pytest.skip(f'cannot build the C++ extension of the simulated device (a C++ compiler and ninja): {e}')


@pytest.fixture(scope='module')
def setup(tmp_path_factory, device_guard):  # pylint: disable=unused-argument,redefined-outer-name
    root = tmp_path_factory.mktemp('fake_cuda')
    scene, gin_file = write_tiny_scene(root)
    ckpt = root / 'ckpt'
    gin.clear_config()
    configs.parse_gin([str(gin_file)], NO_NORMALS)
    torch.manual_seed(0)
    model = models.Model(config=configs.Config())
    gin.clear_config()
    checkpoints.save_checkpoint(str(ckpt), {'model': model.state_dict(), 'step': 5}, 5)
    return root, gin_file, scene, ckpt


def _flags(setup, ckpt, *bindings):  # pylint: disable=redefined-outer-name
    _, gin_file, scene, _ = setup
    return (['prog', f'--gin_configs={gin_file}', f"--gin_bindings=Config.data_dir = '{scene}'",
             f"--gin_bindings=Config.checkpoint_dir = '{ckpt}'"] +
            [f'--gin_bindings={b}' for b in NO_NORMALS + list(bindings)])


def _copy_checkpoint(setup, dest):  # pylint: disable=redefined-outer-name
    os.makedirs(dest)
    for p in checkpoints.list_checkpoints(str(setup[3])):
        shutil.copy(p, dest)
    return dest


def test_simulated_device_refuses_what_cuda_refuses(device_guard):  # pylint: disable=unused-argument
    with fakecuda.fake_cuda() as log:
        x = torch.arange(6., device='cuda').reshape(2, 3)
        assert x.device.type == 'cuda' and torch.cuda.is_available()
        y = (x * torch.tensor(2.)).sum(0)  # A 0-dim CPU tensor is a scalar to CUDA kernels.
        assert y.cpu().tolist() == [6., 10., 14.] and log.syncs == 1
        assert x[torch.tensor([1])].cpu().tolist() == [[3., 4., 5.]] and log.host_to_device == 1
        with pytest.raises(fakecuda.FakeCudaError, match='mixed with CPU tensors'):
            x + torch.ones(3)
        with pytest.raises(fakecuda.FakeCudaError, match='mixed with CPU tensors'):
            torch.searchsorted(torch.ones(3, device='cuda'), torch.ones(2))
        with pytest.raises(fakecuda.FakeCudaError, match='from a torch.Generator on cpu'):
            torch.rand(3, device='cuda', generator=torch.Generator().manual_seed(0))
        with pytest.raises(fakecuda.FakeCudaError, match='from a torch.Generator on cuda'):
            torch.rand(3, generator=torch.Generator(device='cuda'))
        with pytest.raises(fakecuda.FakeCudaError, match='numpy'):
            x.numpy()
        # Values are the CPU's: the same generator seed draws the same numbers on either device.
        gen = torch.Generator(device='cuda')
        gen.manual_seed(3)
        drawn = torch.rand(4, device='cuda', generator=gen).cpu()
        layer = torch.nn.Linear(3, 2)
        expected = layer(torch.ones(1, 3))
        out = layer.to('cuda')(torch.ones(1, 3, device='cuda'))
        assert layer.weight.device.type == 'cuda' and torch.equal(out.cpu(), expected)
    assert torch.equal(drawn, torch.rand(4, generator=torch.Generator().manual_seed(3)))


def _metrics(ckpt):
    with open(os.path.join(ckpt, 'test_preds', 'metrics.json')) as f:
        return json.load(f)


def test_eval_on_cuda_gives_the_cpus_metrics(setup, tmp_path, capsys):  # pylint: disable=redefined-outer-name
    on_cpu, on_cuda = _copy_checkpoint(setup, tmp_path / 'cpu'), _copy_checkpoint(setup, tmp_path / 'cuda')
    assert _run(eval_cli, _flags(setup, on_cpu, "Config.device = 'cpu'")) == 0, capsys.readouterr().err
    with fakecuda.fake_cuda() as log:
        assert _run(eval_cli, _flags(setup, on_cuda, 'Config.render_chunk_size = None')) == 0, \
            capsys.readouterr().err
    # The render chunk came from the free device memory, and the copies back were awaited.
    assert {'mem_get_info', 'max_memory_allocated', 'synchronize'} <= set(log.cuda_calls)
    cpu, cuda = _metrics(on_cpu), _metrics(on_cuda)
    assert cuda['num_images'] == 2 and np.isfinite(cuda['psnr'])
    for name in ('psnr', 'ssim'):
        np.testing.assert_allclose(cuda['per_image'][name], cpu['per_image'][name], rtol=0, atol=1e-9)
    np.testing.assert_allclose(cuda['cc_psnr'], cpu['cc_psnr'], rtol=0, atol=1e-9)
    for png in sorted(glob.glob(os.path.join(on_cpu, 'test_preds', 'color_*.png'))):
        other = os.path.join(on_cuda, 'test_preds', os.path.basename(png))
        assert np.array_equal(utils.load_img(png), utils.load_img(other)), png


def test_render_on_cuda_gives_the_cpus_frames(setup, tmp_path, capsys):  # pylint: disable=redefined-outer-name
    on_cpu, on_cuda = _copy_checkpoint(setup, tmp_path / 'cpu'), _copy_checkpoint(setup, tmp_path / 'cuda')
    path = ['Config.render_path = True', 'Config.render_path_frames = 2', 'Config.render_video_fps = 2']
    assert _run(render_cli, _flags(setup, on_cpu, "Config.device = 'cpu'", *path)) == 0, capsys.readouterr().err
    with fakecuda.fake_cuda():
        assert _run(render_cli, _flags(setup, on_cuda, *path)) == 0, capsys.readouterr().err
    frames = sorted(glob.glob(os.path.join(on_cpu, 'render', '*', 'color_*.png')))
    assert len(frames) == 2
    for png in frames:
        other = png.replace(str(on_cpu), str(on_cuda))
        assert np.array_equal(utils.load_img(png), utils.load_img(other)), png
    assert glob.glob(os.path.join(on_cuda, 'render', '*color.mp4'))


def test_train_runs_on_cuda(setup, tmp_path, capsys):  # pylint: disable=redefined-outer-name
    """Four steps (zero gradients: see fakecuda) with accumulation sized from free memory, a checkpoint on the
    way; the first step's loss (the initial weights on the first batch) is the CPU run's."""
    steps = ['Config.max_steps = 4', 'Config.checkpoint_every = 2', 'Config.print_every = 1']
    assert _run(train_cli, _flags(setup, tmp_path / 'cpu', "Config.device = 'cpu'", *steps)) == 0, \
        capsys.readouterr().err
    cpu_out = capsys.readouterr().out
    with fakecuda.fake_cuda() as log:
        assert _run(train_cli, _flags(setup, tmp_path / 'cuda', "Config.grad_accum_steps = 'auto'", *steps)) == 0, \
            capsys.readouterr().err
    cuda_out = capsys.readouterr().out
    assert 'Training on cuda:0' in cuda_out and {'set_device', 'mem_get_info'} <= set(log.cuda_calls)
    first_loss = lambda out: float(re.search(r'^ *1/4: loss=([0-9.]+)', out, re.M).group(1))  # noqa: E731
    assert first_loss(cuda_out) == first_loss(cpu_out)
    # What the CUDA run saved is an ordinary checkpoint: it loads on the CPU, on the initial weights.
    saved = checkpoints.load_checkpoint(checkpoints.list_checkpoints(str(tmp_path / 'cuda'))[-1])
    initial = checkpoints.load_checkpoint(checkpoints.list_checkpoints(str(setup[3]))[-1])
    assert saved['step'] == 4
    for name, value in initial['model'].items():
        assert saved['model'][name].device.type == 'cpu' and torch.equal(saved['model'][name], value), name


def test_checkpoint_loads_onto_the_device_and_device_errors_stay_device_errors(setup, monkeypatch):
    # pylint: disable=redefined-outer-name
    path = checkpoints.list_checkpoints(str(setup[3]))[-1]
    on_cpu = checkpoints.load_checkpoint(path)
    with fakecuda.fake_cuda():
        on_cuda = checkpoints.load_checkpoint(path, map_location='cuda')
        assert all(v.device.type == 'cuda' for v in on_cuda['model'].values())
        assert all(torch.equal(on_cuda['model'][k].cpu(), v) for k, v in on_cpu['model'].items())

        def out_of_memory(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB')
        # Running out of device memory while loading is not a corrupt file to delete.
        monkeypatch.setattr(torch.Tensor, 'to', out_of_memory)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            checkpoints.load_checkpoint(path, map_location='cuda')
