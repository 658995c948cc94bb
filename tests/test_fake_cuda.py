"""The CUDA code paths, run on a simulated CUDA device (tests/fakecuda.py) on this CPU-only machine: train, eval and
render (also with every method's config), export, the viewer and gpu_check.sh's benchmarks. Every tensor they put on
'cuda' stays there (an operator mixing devices, a CPU generator drawing for a CUDA tensor or `.numpy()` of a CUDA
tensor fails), the branches taken only on CUDA run (device selection, set_device, free-memory render chunks and
accumulation, synchronisation, bf16 autocast), a training step makes no host sync, and the outputs are the CPU's.
Speed, memory, CUDA kernels and gradients need a real GPU (tests/test_gpu.py, bench/gpu_check.sh)."""

from __future__ import annotations

import contextlib
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
from mipnerf360 import checkpoints, configs, synthetic, utils
from mipnerf360.cli import eval as eval_cli
from mipnerf360.cli import render as render_cli
from mipnerf360.cli import train as train_cli
from test_cli_faults import _run, write_tiny_run


@pytest.fixture(scope='module')
def device_guard():
    if torch.backends.cuda.is_built():  # Its device guard would replace the real one.
        pytest.skip('the simulated CUDA device is for CPU-only torch builds; tests/test_gpu.py covers real CUDA')
    try:
        fakecuda.register_device_guard()
    except Exception as e:  # pylint: disable=broad-except
        pytest.skip(f'cannot build the simulated device (its device guard needs g++): {e}')


@pytest.fixture(scope='module')
def setup(tmp_path_factory, device_guard):  # pylint: disable=unused-argument,redefined-outer-name
    return write_tiny_run(tmp_path_factory.mktemp('fake_cuda'))


def _flags(setup, ckpt, *bindings):  # pylint: disable=redefined-outer-name
    _, gin_file, scene, _ = setup
    return (['prog', f'--gin_configs={gin_file}', f"--gin_bindings=Config.data_dir = '{scene}'",
             f"--gin_bindings=Config.checkpoint_dir = '{ckpt}'"] +
            [f'--gin_bindings={b}' for b in bindings])


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
    way and a test-view render; the first step's loss (the initial weights on the first batch) is the CPU run's."""
    steps = ['Config.max_steps = 4', 'Config.checkpoint_every = 2', 'Config.print_every = 1', 'Config.batch_size = 1024',
             'Config.train_render_every = 4']
    assert _run(train_cli, _flags(setup, tmp_path / 'cpu', "Config.device = 'cpu'", *steps)) == 0, \
        capsys.readouterr().err
    cpu_out = capsys.readouterr().out
    with fakecuda.fake_cuda() as log:
        assert _run(train_cli, _flags(setup, tmp_path / 'cuda', "Config.grad_accum_steps = 'auto'", *steps)) == 0, \
            capsys.readouterr().err
    cuda_out = capsys.readouterr().out
    assert 'Training on cuda:0' in cuda_out and {'set_device', 'mem_get_info'} <= set(log.cuda_calls)
    assert re.search(r'^Eval 4: .* rays/s', cuda_out, re.M)  # The test view rendered during training.
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
        monkeypatch.undo()
        # Nor while copying the weights into the model (a RuntimeError, as torch's for another model's weights).
        from mipnerf360.cli import common  # pylint: disable=import-outside-toplevel
        gin.clear_config()
        config = configs.load_config(save_config=False, gin_configs=[setup[1]],
                                     gin_bindings=[f"Config.checkpoint_dir = '{setup[3]}'"])
        model = common.build_model(config, torch.device('cuda'))
        gin.clear_config()
        monkeypatch.setattr(model, 'load_state_dict', out_of_memory)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            common.restore_model(model, config, torch.device('cuda'))


# Each method's config file, on a tiny model: (config, scene writer, extra bindings).
TINY_MODEL = ('Config.batch_size = 256', 'Config.render_chunk_size = None', 'Config.max_steps = 2',
              'Config.checkpoint_every = 2', 'Config.print_every = 1', 'Config.train_render_every = 0',
              'Model.num_prop_samples = 8', 'Model.num_nerf_samples = 8', 'NerfMLP.net_depth = 1',
              'NerfMLP.net_width = 16', 'NerfMLP.bottleneck_width = 8', 'PropMLP.net_depth = 1',
              'PropMLP.net_width = 16')
OCTAHEDRON = ("NerfMLP.basis_shape = 'octahedron'", 'NerfMLP.basis_subdivisions = 1',
              "PropMLP.basis_shape = 'octahedron'", 'PropMLP.basis_subdivisions = 1')


def _colmap_scene(d):
    synthetic.write_colmap_scene(d, n_views=9, width=32, height=24, factors=(2,), seed=0, write_points=False)


def _raw_scene(d):
    pytest.importorskip('pidng', reason='writing DNGs needs the optional pidng package (pip install .[raw])')
    pytest.importorskip('rawpy', reason='reading DNGs needs the optional rawpy package (pip install .[raw])')
    synthetic.write_raw_scene(d, n_views=5, width=32, height=24)


METHODS = {
    'glo': ('configs/360_glo4.gin', _colmap_scene, OCTAHEDRON + ('Config.factor = 2',)),
    'robustnerf': ('configs/360_robustnerf.gin', _colmap_scene,
                   OCTAHEDRON + ('Config.factor = 0', 'Config.batch_size = 512')),
    'refnerf': ('configs/blender_refnerf.gin',
                lambda d: synthetic.write_shiny_blender_scene(d, n_train=4, n_val=1, n_test=2, width=16, height=16),
                ('NerfMLP.net_depth_viewdirs = 1',)),
    'rawnerf': ('configs/llff_raw.gin', _raw_scene, ('Config.factor = 0', 'Config.batch_size = 128')),
}


@pytest.mark.parametrize('method', sorted(METHODS))
def test_each_method_trains_and_evaluates_on_cuda(method, tmp_path, capsys, device_guard):
    """Two training steps of each method's config on the device, then eval of what it saved on the device and
    on the CPU: the same metrics. (RawNeRF: Bayer mask and exposures; RobustNeRF: patches; GLO: embeddings;
    Ref-NeRF: normals and the IDE.)"""
    # pylint: disable=unused-argument
    gin_file, write_scene, bindings = METHODS[method]
    scene = str(tmp_path / 'scene')
    write_scene(scene)
    flags = lambda ckpt, *more: (['prog', f'--gin_configs={gin_file}', f"--gin_bindings=Config.data_dir = '{scene}'",
                                  f"--gin_bindings=Config.checkpoint_dir = '{ckpt}'"] +
                                 [f'--gin_bindings={b}' for b in TINY_MODEL + bindings + more])  # noqa: E731
    ckpt = tmp_path / 'ckpt'
    with fakecuda.fake_cuda():
        assert _run(train_cli, flags(ckpt)) == 0, capsys.readouterr().err
        assert 'Training on cuda:0' in capsys.readouterr().out
        assert _run(eval_cli, flags(ckpt)) == 0, capsys.readouterr().err
    cuda = _metrics(ckpt)
    shutil.rmtree(ckpt / 'test_preds')
    assert _run(eval_cli, flags(ckpt, "Config.device = 'cpu'")) == 0, capsys.readouterr().err
    cpu = _metrics(ckpt)
    assert cuda['step'] == 2 and np.all(np.isfinite(cuda['per_image']['psnr']))
    # Ref-NeRF's normals_mae compares density-gradient normals: zero on the simulated device (no backward).
    for name in (n for n in cpu['per_image'] if not n.startswith('normals')):
        np.testing.assert_allclose(cuda['per_image'][name], cpu['per_image'][name], rtol=0, atol=1e-9,
                                   err_msg=name)


def _ply_vertices(path):
    import plyfile  # pylint: disable=import-outside-toplevel
    vertex = plyfile.PlyData.read(str(path))['vertex']
    return np.stack([vertex[k] for k in ('x', 'y', 'z')], -1)


@pytest.mark.parametrize('mode', ['pointcloud', 'density'])
def test_export_on_cuda_gives_the_cpus_geometry(setup, tmp_path, capsys, mode):
    # pylint: disable=redefined-outer-name
    pytest.importorskip('plyfile')
    from mipnerf360.cli import export as export_cli  # pylint: disable=import-outside-toplevel
    # The model is untrained (nearly transparent): every ray's depth counts, in a box around all of them, and
    # the density level is one inside its range.
    args = {'pointcloud': ['pointcloud', '--min_acc=0', '--bbox=-20,-20,-20,20,20,20'],
            'density': ['mesh', '--method=density', '--resolution=24', '--density_threshold=0.3']}[mode]
    outputs = {}
    for device in ('cpu', 'cuda'):
        out = tmp_path / f'{device}.ply'
        argv = ['prog', args[0]] + _flags(setup, setup[3])[1:] + args[1:] + [f'--output={out}']
        if device == 'cpu':
            code = _run(export_cli, argv + ["--gin_bindings=Config.device = 'cpu'"])
        else:
            with fakecuda.fake_cuda():
                code = _run(export_cli, argv)
        assert code == 0, capsys.readouterr().err
        outputs[device] = _ply_vertices(out)
    assert len(outputs['cpu']) > 10
    np.testing.assert_array_equal(outputs['cuda'], outputs['cpu'])


def test_tsdf_fusion_on_cuda_gives_the_cpus_volume(device_guard):  # pylint: disable=unused-argument
    """TSDF fusion of exact depth maps (test_export's traced views) on the device and on the CPU."""
    pytest.importorskip('skimage')
    from mipnerf360 import export  # pylint: disable=import-outside-toplevel
    from test_export import BOX, ring_views  # pylint: disable=import-outside-toplevel
    views = ring_views(6, 40, 30)
    cpu = export.tsdf_fusion(views, BOX, resolution=24, progress=False, chunk=4096)
    with fakecuda.fake_cuda():
        cuda = export.tsdf_fusion(views, BOX, resolution=24, progress=False, chunk=4096, device='cuda')
    assert (cpu.weight > 0).mean() > 0.1 and (np.abs(cpu.tsdf) < 1).any()
    for name in ('tsdf', 'weight', 'colors'):
        np.testing.assert_array_equal(getattr(cuda, name), getattr(cpu, name), err_msg=name)


def test_viewer_renders_on_cuda_as_on_the_cpu(setup):  # pylint: disable=redefined-outer-name
    """Every progressive level the viewer sends a client, rendered on the device, is the CPU's image."""
    pytest.importorskip('viser')
    from mipnerf360 import datasets, viewer  # pylint: disable=import-outside-toplevel
    from mipnerf360.cli import common  # pylint: disable=import-outside-toplevel
    from test_viewer import _FakeCamera, _FakeClient, _free_port  # pylint: disable=import-outside-toplevel

    class Recording(_FakeClient):
        def set_background_image(self, img, format):  # pylint: disable=redefined-builtin
            self.sent.append((np.array(img), format))

    root, gin_file, scene_dir, ckpt = setup
    sent = {}
    for device in ('cpu', 'cuda'):
        with fakecuda.fake_cuda() if device == 'cuda' else contextlib.nullcontext():
            gin.clear_config()
            config = configs.load_config(save_config=False, gin_configs=[str(gin_file)], gin_bindings=[
                f"Config.data_dir = '{scene_dir}'", f"Config.checkpoint_dir = '{ckpt}'",
                'Config.viewer_max_resolution = 16', 'Config.viewer_refresh_seconds = 0.'])
            dev = torch.device(device)
            model = common.build_model(config, dev)
            step = common.restore_model(model, config, dev)
            scene = datasets.load_scene(config, 'train')
            view = viewer.Viewer(model, config, scene, port=_free_port(), step=step)
            try:
                client = Recording(_FakeCamera(*viewer.camtoworld_to_viser(scene.camtoworlds[0]), .8, 64, 48))
                while view._serve(client):  # pylint: disable=protected-access
                    pass
            finally:
                view.close()
                gin.clear_config()
            sent[device] = client.sent
    assert [img.shape[:2] for img, _ in sent['cpu']] == [(2, 2), (3, 4), (6, 8), (12, 16)]
    for (a, fmt_a), (b, fmt_b) in zip(sent['cuda'], sent['cpu']):
        assert fmt_a == fmt_b and np.array_equal(a, b)


def test_training_step_makes_no_host_sync_on_cuda(setup):  # pylint: disable=redefined-outer-name
    """The sampler, ray casting, forward, losses, finite guard and Adam of a training step on the device never
    wait for it: no value read back, no copy to the host (on the CPU a `.cpu()` is no copy at all, so only a
    device shows the latter)."""
    import syncguard  # pylint: disable=import-outside-toplevel
    from mipnerf360 import datasets, train_utils  # pylint: disable=import-outside-toplevel
    from mipnerf360.cli import common  # pylint: disable=import-outside-toplevel
    _, gin_file, scene_dir, _ = setup
    gin.clear_config()
    config = configs.load_config(save_config=False, gin_configs=[str(gin_file)], gin_bindings=[
        f"Config.data_dir = '{scene_dir}'", 'Config.batch_size = 256', "Config.nan_policy = 'skip_step'",
        'Config.cast_rays_in_train_step = True'])
    with fakecuda.fake_cuda() as log:
        device = torch.device('cuda')
        sampler = datasets.RaySampler(datasets.load_scene(config, 'train'), config, device=device)
        state = train_utils.create_train_state(config, common.build_model(config, device))  # The gin MLPs.
        gin.clear_config()
        cameras = sampler.cameras
        for step in (1, 2):  # Fresh Adam state, then existing state.
            before = log.syncs
            with syncguard.no_host_sync():
                batch = sampler.get_train_batch(step)
                state, stats = train_utils.train_step(state, batch, cameras, config, state.step_generator(device),
                                                      sampler.camtype)
            assert log.syncs == before
            assert stats['loss'].device.type == 'cuda'
        assert np.isfinite(train_utils.stats_to_float(stats)['loss']) and log.syncs > before  # Logging reads.


def test_bf16_autocasts_the_mlps_on_cuda(setup, tmp_path, capsys):  # pylint: disable=redefined-outer-name
    """Config.precision = 'bf16' on the device: CUDA autocast (not the CPU's) runs the MLPs in bfloat16; the
    metrics move from float32's by bf16 rounding and agree with the CPU's bf16 run."""
    runs = {}
    for name, device, precision in (('fp32', 'cuda', 'fp32'), ('bf16', 'cuda', 'bf16'), ('cpu_bf16', 'cpu', 'bf16')):
        ckpt = _copy_checkpoint(setup, tmp_path / name)
        bindings = [f"Config.precision = '{precision}'"] + (["Config.device = 'cpu'"] if device == 'cpu' else [])
        with fakecuda.fake_cuda() if device == 'cuda' else contextlib.nullcontext():
            assert _run(eval_cli, _flags(setup, ckpt, *bindings)) == 0, capsys.readouterr().err
        runs[name] = np.array(_metrics(ckpt)['per_image']['psnr'])
    assert np.abs(runs['bf16'] - runs['fp32']).max() > 1e-4
    np.testing.assert_allclose(runs['bf16'], runs['cpu_bf16'], rtol=0, atol=0.05)
    np.testing.assert_allclose(runs['bf16'], runs['fp32'], rtol=0, atol=0.2)


def test_gpu_check_benchmarks_run_on_cuda(tmp_path, monkeypatch, capsys, device_guard):
    """bench/gpu_check.sh's train and render benchmarks, as it calls them (on a tiny config and size), on the
    device: their CUDA-only plumbing (memory figures, synchronisation, accumulation from free memory) works
    before a GPU's time is spent on it."""
    # pylint: disable=unused-argument
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(repo)
    monkeypatch.syspath_prepend(os.path.join(repo, 'bench'))
    import bench_render  # pylint: disable=import-outside-toplevel
    import bench_train  # pylint: disable=import-outside-toplevel
    table = tmp_path / 'rows.json'
    common_flags = ['--gin_configs', 'bench/bench_demo.gin', '--device', 'cuda', '--json', str(table)]
    with fakecuda.fake_cuda() as log:
        for precision, accum in (('tf32', '1'), ('bf16', 'auto')):
            bench_train.main(common_flags + ['--precision', precision, '--grad_accum_steps', accum, '--steps', '2',
                                             '--warmup', '1', '--batch_size', '64', '--num_batches', '1',
                                             '--label', f'{precision} {accum}'])
        bench_render.main(common_flags + ['--chunk', 'auto', '--width', '16', '--height', '12', '--repeats', '1',
                                          '--label', 'render'])
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert [r['bench'] for r in rows] == ['train', 'train', 'render']
    assert 'precision=tf32' in rows[0]['flags'] and 'precision=bf16' in rows[1]['flags']
    assert all(r['ms'] > 0 and r['rays_per_s'] > 0 and r['peak_mib'] == 4 for r in rows)  # The fake's 4 MiB.
    assert {'reset_peak_memory_stats', 'max_memory_allocated', 'synchronize', 'mem_get_info'} <= set(log.cuda_calls)
    assert 'device=cuda' in capsys.readouterr().out


def test_simulated_device_builds_tensors_from_data_and_keeps_cpu_backward(device_guard):
    # pylint: disable=unused-argument
    with fakecuda.fake_cuda() as log:
        x = torch.tensor([1., 2.], device='cuda')
        y = torch.as_tensor(np.array([3., 4.]), device='cuda')
        assert x.device.type == y.device.type == 'cuda' and (x * y).tolist() == [3., 8.] and log.syncs == 1
        w = torch.tensor([2.], requires_grad=True)  # On the CPU: its gradient is computed.
        (w * 3.).sum().backward()
        assert w.grad.tolist() == [3.]
        assert torch.autograd.grad((w ** 2).sum(), w)[0].tolist() == [4.]


def test_each_torchrun_process_takes_its_own_gpu(device_guard):  # pylint: disable=unused-argument
    """Config.device = 'cuda' (or None) on local rank r is cuda:r, so that DistributedDataParallel's device_ids
    name a device; an explicit index is kept."""
    from mipnerf360.cli import common  # pylint: disable=import-outside-toplevel
    with fakecuda.fake_cuda():
        for device in ('cuda', None):
            assert common.get_device(configs.Config(device=device), local_rank=1) == torch.device('cuda', 1)
        assert common.get_device(configs.Config(device='cuda:0'), local_rank=1) == torch.device('cuda', 0)
    assert common.get_device(configs.Config(device='cpu'), local_rank=1) == torch.device('cpu')
