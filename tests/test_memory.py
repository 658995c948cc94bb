"""Memory: saved-activation bytes (closed forms), activation checkpointing of the NerfMLP (same gradients, fewer
saved bytes), Config.grad_accum_steps = 'auto', the render chunk picked when Config.render_chunk_size is None,
and the one-line out-of-memory error of the CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mipnerf360 import configs, memory, models, train_utils, utils
from mipnerf360.cli import common

from syncguard import no_host_sync
from test_models import _random_rays, _tiny_model


def test_saved_tensor_bytes_closed_forms():
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    assert memory.saved_tensor_bytes(lambda: x.exp()) == 800  # exp saves its result.
    assert memory.saved_tensor_bytes(lambda: x.sin().exp()) == 1600  # sin saves x, exp its result.
    assert memory.saved_tensor_bytes(lambda: x.sin() + x.cos()) == 800  # x, saved twice, is counted once.
    assert memory.saved_tensor_bytes(lambda: x[:10].sin()) == 800  # A view keeps its whole storage.
    layer = torch.nn.Linear(100, 7, dtype=torch.float64)
    inp = torch.randn(5, 100, dtype=torch.float64)
    assert memory.saved_tensor_bytes(lambda: layer(inp), exclude=layer) == 5 * 100 * 8  # Not the weight.
    with torch.no_grad():
        assert memory.saved_tensor_bytes(lambda: x.exp()) == 0


def _noisy_model(**kw):
    """The tiny model with density and bottleneck noise, so that the checkpointed recompute must see the same
    random numbers as the forward pass."""
    params = _tiny_model().nerf_mlp_params
    return _tiny_model(nerf_mlp_params={**params, 'density_noise': 1.0, 'bottleneck_noise': 0.5, **kw})


def _grads(model, rays):
    model.zero_grad(set_to_none=True)
    rng = torch.Generator().manual_seed(7)
    renderings, _ = model(rng, rays, train_frac=0.5, compute_extras=False)
    renderings[-1]['rgb'].square().sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('density_normals', [False, True])
def test_checkpoint_nerf_mlp_same_gradients_fewer_saved_bytes(density_normals):
    model = _noisy_model(disable_density_normals=not density_normals)
    rays = _random_rays(32)
    plain = _grads(model, rays)
    plain_bytes = memory.saved_bytes_per_ray(model, configs.Config(near=0.2, far=1e3), 16)
    model.nerf_mlp.checkpoint_trunk = True
    checkpointed = _grads(model, rays)
    checkpointed_bytes = memory.saved_bytes_per_ray(model, configs.Config(near=0.2, far=1e3), 16)
    assert plain.keys() == checkpointed.keys() and any(k.startswith('nerf_mlp.trunk') for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-12, atol=1e-14, msg=k)
    # The trunk's hidden activations, float64 (its last output, the features, is kept by the heads either way).
    trunk = (model.nerf_mlp.net_depth - 1) * model.nerf_mlp.net_width * 8 * model.num_nerf_samples
    if density_normals:
        # The density gradient's own graph (create_graph) keeps the recomputed trunk: no saving, no loss.
        assert checkpointed_bytes <= plain_bytes
    else:
        assert checkpointed_bytes <= plain_bytes - trunk


def test_checkpointed_forward_and_backward_hold_no_host_sync():
    model = _noisy_model()
    model.nerf_mlp.checkpoint_trunk = True
    rays = _random_rays(8)
    with no_host_sync():
        _grads(model, rays)


def test_config_checkpoint_nerf_mlp_reaches_the_nerf_mlp():
    model = models.Model(config=configs.Config(checkpoint_nerf_mlp=True), num_prop_samples=4, num_nerf_samples=4,
                         nerf_mlp_params=dict(net_depth=1, net_width=8, max_deg_point=2),
                         prop_mlp_params=dict(net_depth=1, net_width=8, max_deg_point=2))
    assert model.nerf_mlp.checkpoint_trunk and not model.prop_mlp.checkpoint_trunk


def test_saved_bytes_per_ray_is_linear_and_smaller_in_bf16():
    model = _tiny_model().float()
    config = configs.Config(near=0.2, far=1e3)
    per_ray = memory.saved_bytes_per_ray(model, config, 8)
    assert per_ray == memory.saved_bytes_per_ray(model, config, 24)  # Every per-ray tensor grows with the rays.
    model.set_precision('bf16')
    assert memory.saved_bytes_per_ray(model, config, 8) < per_ray


def test_auto_grad_accum_steps(monkeypatch):
    model = _tiny_model().float()
    config = configs.Config(near=0.2, far=1e3, batch_size=4096, grad_accum_steps='auto')
    assert memory.auto_grad_accum_steps(model, config, 4096) == 1  # Off CUDA.
    per_ray = memory.saved_bytes_per_ray(model, config)
    free = 1000 * per_ray / memory.TRAIN_MEMORY_FRACTION  # Room for the activations of 1000 rays.
    monkeypatch.setattr(models, 'free_device_memory', lambda device: free)
    assert memory.auto_grad_accum_steps(model, config, 4096) == 5  # ceil(4096 / 1000)
    assert memory.auto_grad_accum_steps(model, config, 1000) == 1
    resolved = memory.resolve_grad_accum_steps(config, model, world_size=2)
    assert resolved.grad_accum_steps == 3 and resolved.batch_size == 4096  # ceil(2048 / 1000)
    monkeypatch.setattr(models, 'free_device_memory', lambda device: 1.)  # Not one ray fits: one per step.
    assert memory.auto_grad_accum_steps(model, config, 64) == 64
    fixed = dataclasses.replace(config, grad_accum_steps=2)
    assert memory.resolve_grad_accum_steps(fixed, model) is fixed


def test_auto_grad_accum_steps_trains_as_an_integer(monkeypatch):
    """A resolved 'auto' runs the train step with the same gradient as one batch (float64)."""
    model = _tiny_model()
    config = configs.Config(near=0.2, far=1e3, batch_size=32, grad_accum_steps='auto', randomized=False)
    monkeypatch.setattr(models, 'free_device_memory',
                        lambda device: 10 * memory.saved_bytes_per_ray(model, config) / memory.TRAIN_MEMORY_FRACTION)
    resolved = memory.resolve_grad_accum_steps(config, model)
    assert resolved.grad_accum_steps == 4
    rays = _random_rays(32)
    batch = utils.Batch(rays=rays, rgb=torch.rand(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    grads = []
    for cfg in (dataclasses.replace(config, grad_accum_steps=1), resolved):
        state = train_utils.create_train_state(cfg, model)
        train_utils.compute_gradients(state, batch, rays, cfg, None, 0.5)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_grad_accum_steps_validation():
    assert configs.validate_config(configs.Config(grad_accum_steps='auto')).grad_accum_steps == 'auto'
    for bad in (0, 'many', 1.5, True):
        with pytest.raises(configs.ConfigError, match=r"Config.grad_accum_steps = .* must be an integer >= 1 or 'auto'"):
            configs.validate_config(configs.Config(grad_accum_steps=bad))


def test_render_chunk_none_renders_as_a_fixed_chunk():
    model = _tiny_model().float().eval()
    rays = utils.tree_map(lambda r: r.reshape(6, 5, -1), _random_rays(30, dtype=torch.float32))
    fn = lambda rng, r: model(rng, r, train_frac=1.0, compute_extras=True)  # noqa: E731
    auto = models.render_image(fn, rays, None, configs.Config(render_chunk_size=None))
    fixed = models.render_image(fn, rays, None, configs.Config(render_chunk_size=7))
    assert configs.Config().render_chunk_size is None
    assert models.auto_render_chunk_size(fn, rays, None, []) == models.DEFAULT_RENDER_CHUNK_SIZE  # Off CUDA.
    for k in ('rgb', 'acc', 'distance_mean'):
        torch.testing.assert_close(auto[k], fixed[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_render_chunk_from_free_memory_on_cuda():
    torch.manual_seed(0)
    model = _tiny_model().float().eval().cuda()
    rays = utils.tree_map(lambda r: r.reshape(40, 64, -1), _random_rays(40 * 64, dtype=torch.float32)).to('cuda')
    fn = lambda rng, r: model(rng, r, train_frac=1.0, compute_extras=True)  # noqa: E731
    chunks = []
    flat = utils.tree_map(lambda r: r.reshape(-1, r.shape[-1]), rays)
    size = models.auto_render_chunk_size(fn, flat, None, chunks)
    assert size >= 1024 and size % 1024 == 0 and chunks[0]['rgb'].shape == (models.RENDER_PROBE_RAYS, 3)
    auto = models.render_image(fn, rays, None, configs.Config(render_chunk_size=None))
    fixed = models.render_image(fn, rays, None, configs.Config(render_chunk_size=500))
    torch.testing.assert_close(auto['rgb'], fixed['rgb'], rtol=1e-5, atol=1e-6)


def test_out_of_memory_is_one_line_naming_the_settings(capsys):
    def main(argv):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.5 GiB free.')

    with pytest.raises(SystemExit) as e:
        common.run(main, 'train', ['prog'])
    err = capsys.readouterr().err.strip()
    assert e.value.code == common.EXIT_USER_ERROR
    assert err.splitlines() == [err] and err.startswith('error: out of memory (CUDA out of memory. Tried to')
    for name in ('Config.grad_accum_steps', 'Config.batch_size', 'Config.max_steps', 'Config.render_chunk_size',
                 'learning rate unchanged'):
        assert name in err


def test_checkpointed_model_compiles_whole_with_the_same_gradients():
    import torch._dynamo
    from test_compile import _tiny_model as _compile_model, explain_render_rays
    torch._dynamo.reset()
    try:
        model = _compile_model()
        model.nerf_mlp.checkpoint_trunk = True
        explained = explain_render_rays(model)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        rays = _random_rays(6, dtype=torch.float32)
        grads = []
        for compiled in (False, True):
            if compiled:
                models.compile_model(model, 'model', backend='aot_eager')
            model.zero_grad(set_to_none=True)
            renderings, _ = model(torch.Generator().manual_seed(3), rays, 0.3, compute_extras=False, zero_glo=False)
            renderings[-1]['rgb'].sum().backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        for k in grads[0]:
            torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)
    finally:
        torch._dynamo.reset()
