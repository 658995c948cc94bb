"""Gradient accumulation (Config.grad_accum_steps): the summed micro-batch gradient equals the full batch's, in
float64, with every loss term and with RobustNeRF's whole-batch threshold."""

import dataclasses
import math

import pytest
import torch

from mipnerf360 import configs, train_utils, utils
from test_train_utils import _ring_scene, _tiny_model

D = torch.float64


@pytest.fixture(autouse=True)
def _no_gin_bindings():
    """In-process CLI tests leave gin bindings behind, and Config() would pick them up."""
    import gin
    gin.clear_config()


def _patch_batch(n_images=5, res=4):
    """One res x res patch per camera: rays [n, res, res, C], lossmult varying per pixel."""
    rays, rgb = _ring_scene([0.3 + 1.1 * i for i in range(n_images)], res=res)
    g = torch.Generator().manual_seed(0)
    rays = dataclasses.replace(rays, lossmult=0.5 + torch.rand(rays.lossmult.shape, generator=g))
    rays = utils.tree_map(lambda x: x.reshape(n_images, res, res, -1).to(D) if x.is_floating_point()
                          else x.reshape(n_images, res, res, -1), rays)
    return rays, rgb.reshape(n_images, res, res, 3).to(D)


def _gradients(config, rays, rgb, threshold):
    state = train_utils.create_train_state(config, _tiny_model().to(D))
    state.loss_threshold = torch.tensor(threshold, dtype=D)
    losses, stats = train_utils.compute_gradients(state, utils.Batch(rays=rays, rgb=rgb), rays, config, None, 0.5)
    grads = {name: p.grad.clone() for name, p in state.model.named_parameters()}
    return losses, stats, grads


@pytest.mark.parametrize('data_loss_type', ['charb', 'robustnerf'])
def test_accumulated_gradient_equals_full_batch_gradient(data_loss_type):
    rays, rgb = _patch_batch()
    base = dict(data_loss_type=data_loss_type, patch_size=4, enable_robustnerf_loss=True,
                robustnerf_inner_patch_size=2, distortion_loss_mult=0.5, data_coarse_loss_mult=0.3,
                weight_decay_mults={'nerf_mlp': 1e-3})
    # The previous step's threshold sits inside the errors' range, so the masks are neither all 0 nor all 1.
    errors = ((_tiny_model_rgb(rays) - rgb)**2).mean(-1)
    threshold = float(torch.quantile(errors.reshape(-1), 0.6))
    full = _gradients(configs.Config(**base), rays, rgb, threshold)
    assert set(full[0]) == {'data', 'interlevel', 'distortion', 'weight'}
    for k in (2, 3, 5):  # 5 patches in 2 + 3, 1 + 2 + 2, 1 each.
        accum = _gradients(configs.Config(grad_accum_steps=k, **base), rays, rgb, threshold)
        for name, g in full[2].items():
            assert torch.allclose(accum[2][name], g, rtol=1e-10, atol=1e-14), (k, name)
        for name, v in full[0].items():
            assert float(accum[0][name]) == pytest.approx(float(v.detach()), rel=1e-12), (k, name)
        for name in ('mses', 'loss_threshold', 'mask', 'is_inlier_loss'):
            if name in full[1]:
                assert torch.allclose(accum[1][name], full[1][name], rtol=1e-12), (k, name)
    if data_loss_type == 'robustnerf':
        assert 0.05 < float(full[1]['mask']) < 0.95
        # The whole-batch quantile, not a mean of per-micro-batch quantiles.
        assert float(full[1]['loss_threshold']) == pytest.approx(float(torch.quantile(errors.reshape(-1), 0.5)),
                                                                 rel=1e-12)


def _tiny_model_rgb(rays):
    model = _tiny_model().to(D)
    with torch.no_grad():
        return model(None, rays, train_frac=0.5, compute_extras=False, zero_glo=False)[0][-1]['rgb']


def test_train_step_with_accumulation_matches_full_batch():
    rays, rgb = _patch_batch()
    batch = utils.Batch(rays=rays, rgb=rgb)
    states = []
    for k in (1, 5):
        config = configs.Config(grad_accum_steps=k, lr_init=1e-2, lr_final=1e-2, lr_delay_steps=0)
        state = train_utils.create_train_state(config, _tiny_model().to(D))
        for _ in range(3):
            state, stats = train_utils.train_step(state, batch, None, config, None, train_frac=0.5)
        states.append((state, train_utils.stats_to_float(stats)))
    (a, sa), (b, sb) = states
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), name
    assert sb['loss'] == pytest.approx(sa['loss'], rel=1e-10) and math.isfinite(sa['loss'])


def test_bad_grad_accum_steps():
    with pytest.raises(configs.ConfigError, match='grad_accum_steps = 0'):
        train_utils.create_train_state(configs.Config(grad_accum_steps=0), _tiny_model())
    rays, rgb = _patch_batch(n_images=2)
    config = configs.Config(grad_accum_steps=3)
    state = train_utils.create_train_state(config, _tiny_model().to(D))
    with pytest.raises(ValueError, match=r'grad_accum_steps = 3 .* first dimension \(2\)'):
        train_utils.train_step(state, utils.Batch(rays=rays, rgb=rgb), None, config, None)
