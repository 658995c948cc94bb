"""Config.precision: bf16 autocast of the MLPs' matrix products only (geometry, sampling and compositing stay
float32), set on the model so every forward pass uses it, and the process-level TF32 setting."""

import pytest
import torch

from mipnerf360 import configs, models, train_utils, utils
from test_models import _random_rays
from test_train_utils import _ring_scene, _tiny_model


def _model(precision):
    return _tiny_model().set_precision(precision)


def test_precision_comes_from_config_and_reaches_every_mlp():
    model = models.Model(config=configs.Config(precision='bf16'), num_levels=2)
    assert model.precision == 'bf16'
    assert model.nerf_mlp.precision == 'bf16' and model.prop_mlp.precision == 'bf16'
    model.set_precision('fp32')
    assert model.nerf_mlp.precision == 'fp32' and model.prop_mlp.precision == 'fp32'
    assert models.Model(num_levels=2).precision is None
    with pytest.raises(configs.ConfigError, match="Config.precision = 'fp16'"):
        model.set_precision('fp16')


def test_bf16_forward_is_close_to_fp32_and_geometry_stays_float32():
    rays = _random_rays(32, dtype=torch.float32, near=0.5, far=6.0)
    model = _model(None)
    with torch.no_grad():
        ref, ref_hist = model(None, rays, 0.5, True)
    inputs, outputs = [], []
    model.set_precision('bf16')
    for mlp in (model.nerf_mlp, model.prop_mlp):
        mlp.trunk[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0].dtype))
        mlp.trunk[0].register_forward_hook(lambda m, a, o: outputs.append(o.dtype))
    with torch.no_grad():
        out, hist = model(None, rays, 0.5, True)
    # The encodings reach the first layer in float32; its product runs in bf16.
    assert inputs == [torch.float32] * 2 and outputs == [torch.bfloat16] * 2
    for h in hist:
        for k in ('sdist', 'weights', 'density', 'rgb'):
            assert h[k].dtype == torch.float32, k
    for r in out:
        for k, v in r.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32, k
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 per product): colours agree to a few 1e-3.
    assert not torch.equal(out[-1]['rgb'], ref[-1]['rgb'])
    assert float((out[-1]['rgb'] - ref[-1]['rgb']).abs().max()) < 1e-2
    assert float((out[-1]['acc'] - ref[-1]['acc']).abs().max()) < 1e-2
    dens, ref_dens = hist[-1]['density'], ref_hist[-1]['density']
    assert float(((dens - ref_dens).abs() / (ref_dens.abs() + 1e-2)).max()) < 0.05


def test_fp32_precision_ignores_an_outer_autocast_and_none_follows_it():
    rays = _random_rays(8, dtype=torch.float32)
    model = _model('fp32')
    with torch.no_grad():
        plain = model(None, rays, 0.5, False)[0][-1]['rgb']
        with torch.autocast('cpu', dtype=torch.bfloat16):
            inside = model(None, rays, 0.5, False)[0][-1]['rgb']
            default = model.set_precision(None)(None, rays, 0.5, False)[0][-1]['rgb']
        bf16 = model.set_precision('bf16')(None, rays, 0.5, False)[0][-1]['rgb']
    assert torch.equal(plain, inside)
    assert torch.equal(default, bf16) and not torch.equal(default, plain)


def test_bf16_gradients_finite_and_training_decreases_loss_like_fp32():
    rays, rgb = _ring_scene([0.3, 2.0], res=8)
    batch = utils.Batch(rays=rays, rgb=rgb)
    config = configs.Config(lr_init=2e-3, lr_final=2e-3, max_steps=30, lr_delay_steps=0)
    curves = {}
    for precision in ('fp32', 'bf16'):
        model = _model(precision)
        state = train_utils.create_train_state(config, model)
        losses = []
        for step in range(1, 31):
            state, stats = train_utils.train_step(state, batch, None, config, None, train_frac=step / 30)
            if step == 1:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
                assert all(g.dtype == torch.float32 for g in grads)
            losses.append(float(stats['loss']))
        curves[precision] = losses
    fp32, bf16 = curves['fp32'], curves['bf16']
    assert fp32[-1] < 0.5 * fp32[0]
    assert bf16[-1] < 0.5 * bf16[0]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05)
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.1)


def test_resolve_and_apply_precision(keep_matmul_precision):
    assert models.resolve_precision(None, 'cpu') == 'fp32'
    assert models.resolve_precision(None, 'cuda') == 'tf32'
    assert models.resolve_precision('bf16', 'cpu') == 'bf16'
    with pytest.raises(configs.ConfigError, match='Config.precision'):
        models.resolve_precision('half', 'cpu')
    assert models.apply_precision('tf32', 'cpu') == 'tf32'
    assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == 'high'
    assert models.apply_precision(None, 'cuda') == 'tf32' and torch.backends.cuda.matmul.allow_tf32
    assert models.apply_precision(None, 'cpu') == 'fp32'
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == 'highest'
    assert models.apply_precision('bf16', 'cuda') == 'bf16' and torch.backends.cuda.matmul.allow_tf32
    assert models.apply_precision('fp32', 'cuda') == 'fp32' and not torch.backends.cudnn.allow_tf32
