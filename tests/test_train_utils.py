"""Tests of mipnerf360.train_utils (and robustnerf): loss values against hand formulas and brute force,
per-group gradient clipping, the learning-rate schedule, and training a tiny model on an analytic scene."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mipnerf360 import configs, models, robustnerf, stepfun, train_utils, utils

D = torch.float64


def _config(**kw):
    return configs.Config(**kw)


def _tiny_model(**kw):
    params = dict(
        num_levels=2, num_prop_samples=16, num_nerf_samples=12,
        nerf_mlp_params=dict(net_depth=2, net_width=32, bottleneck_width=8, net_width_viewdirs=16, max_deg_point=4,
                             basis_shape='octahedron', basis_subdivisions=1, deg_view=2),
        prop_mlp_params=dict(net_depth=1, net_width=16, max_deg_point=3, basis_shape='octahedron',
                             basis_subdivisions=1, disable_rgb=True))
    params.update(kw)
    torch.manual_seed(0)
    return models.Model(**params)


# ---------------------------------------------------------------------------------------------------------------
# Data losses.

def _data_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(6, 4, generator=g, dtype=D)  # RGBA target; alpha must be ignored.
    renderings = [{'rgb': torch.rand(6, 3, generator=g, dtype=D) * 1.2} for _ in range(3)]
    lossmult = torch.rand(6, 1, generator=g, dtype=D)
    batch = utils.Batch(rays=None, rgb=gt)
    rays = utils.Rays(origins=None, directions=None, viewdirs=None, radii=None, imageplane=None,
                      lossmult=lossmult, near=None, far=None, cam_idx=None)
    return batch, renderings, rays


@pytest.mark.parametrize('loss_type', ['mse', 'charb', 'rawnerf'])
def test_data_loss_matches_hand_formula(loss_type):
    batch, renderings, rays = _data_setup()
    config = _config(data_loss_type=loss_type, charb_padding=0.01, data_coarse_loss_mult=0.3, data_loss_mult=2.0)
    loss, stats = train_utils.compute_data_loss(batch, renderings, rays, 1.0, config)
    gt = batch.rgb[:, :3].numpy()
    lm = np.broadcast_to(rays.lossmult.numpy(), gt.shape)
    per_level, mses = [], []
    for r in renderings:
        x = r['rgb'].numpy()
        if loss_type == 'mse':
            f = (x - gt)**2
        elif loss_type == 'charb':
            f = np.sqrt((x - gt)**2 + 0.01**2)
        else:
            xc = np.minimum(x, 1.0)
            f = (xc - gt)**2 / (1e-3 + xc)**2
        per_level.append((lm * f).sum() / lm.sum())
        mses.append((lm * (x - gt)**2).sum() / lm.sum())
    expected = 0.3 * (per_level[0] + per_level[1]) + 2.0 * per_level[2]
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(stats['mses'].numpy(), mses, rtol=1e-12)


def test_data_loss_disable_multiscale_and_unknown_type():
    batch, renderings, rays = _data_setup(1)
    config = _config(data_loss_type='mse', disable_multiscale_loss=True)
    loss, _ = train_utils.compute_data_loss(batch, renderings, rays, 1.0, config)
    expected = float(((renderings[-1]['rgb'] - batch.rgb[:, :3])**2).mean())
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match='data_loss_type'):
        train_utils.compute_data_loss(batch, renderings, rays, 1.0, _config(data_loss_type='l1'))


def test_rawnerf_loss_scaling_is_stop_gradient():
    rgb = torch.tensor([[0.2, 0.5, 1.5]], dtype=D, requires_grad=True)
    gt = torch.tensor([[0.1, 0.7, 0.9]], dtype=D)
    rays = utils.Rays(None, None, None, None, None, torch.ones(1, 1, dtype=D), None, None, None)
    loss, _ = train_utils.compute_data_loss(utils.Batch(rays=None, rgb=gt), [{'rgb': rgb}], rays, 1.0,
                                            _config(data_loss_type='rawnerf'))
    loss.backward()
    # d/dx of (x - y)^2 / (1e-3 + sg(x))^2 / 3 is 2 (x - y) / (1e-3 + x)^2 / 3, and 0 where x is clipped at 1.
    x, y = rgb.detach(), gt
    expected = 2 * (x - y) / (1e-3 + x)**2 / 3
    expected[0, 2] = 0
    assert torch.allclose(rgb.grad, expected)


# ---------------------------------------------------------------------------------------------------------------
# RobustNeRF.

def _robust_mask_bruteforce(errors, threshold, f, smooth_q, inner, patch_q):
    n, h, w, _ = errors.shape
    e = errors.mean(-1)
    inlier = (e < threshold).astype(float)
    out = np.zeros_like(inlier)
    for b in range(n):
        pix = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                win = [inlier[b, ii, jj] for ii in range(i - f // 2, i + f // 2 + 1)
                       for jj in range(j - f // 2, j + f // 2 + 1) if 0 <= ii < h and 0 <= jj < w]
                neigh = sum(win) / (f * f) > 1 - smooth_q  # Zero padding outside the patch.
                pix[i, j] = float(neigh or inlier[b, i, j] > 0)
        patch_ok = pix.mean() > 1 - patch_q
        lo = (h - inner) // 2
        for i in range(h):
            for j in range(w):
                in_inner = lo <= i < lo + inner and lo <= j < lo + inner
                out[b, i, j] = float(pix[i, j] > 0 or (patch_ok and in_inner))
    return out[..., None]


def test_robustnerf_mask_matches_bruteforce():
    rng = np.random.default_rng(0)
    errors = rng.uniform(0, 0.2, (3, 6, 6, 3))
    errors[0, :4, :4] += 2.0  # A big outlier blob.
    errors[1, ::2, 1::3] += 2.0  # Scattered outliers.
    errors[2] += 1.0  # All outliers.
    config = _config(patch_size=6, enable_robustnerf_loss=True, robustnerf_inner_patch_size=2,
                     robustnerf_inlier_quantile=0.7)
    mask, stats = robustnerf.robustnerf_mask(torch.from_numpy(errors), 0.5, config)
    expected = _robust_mask_bruteforce(errors, 0.5, 3, 0.5, 2, 0.5)
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert expected[2].sum() == 0 and expected[0].sum() < 36 and 0 < expected[1].sum()
    assert float(stats['loss_threshold']) == pytest.approx(np.quantile(errors.mean(-1), 0.7), rel=1e-12)
    assert float(stats['mask']) == pytest.approx(expected.mean())


def test_robustnerf_data_loss_masks_outliers():
    errors_gt = torch.zeros(1, 4, 4, 3, dtype=D)
    rgb = errors_gt.clone()
    rgb[0, 1, 1] = 1.0  # One outlier pixel amid inliers (8 of its 9 neighbours are): it is kept...
    config = _config(data_loss_type='robustnerf', patch_size=4, enable_robustnerf_loss=True,
                     robustnerf_inner_patch_size=2)
    rays = utils.Rays(None, None, None, None, None, torch.ones(1, 4, 4, 1, dtype=D), None, None, None)
    batch = utils.Batch(rays=None, rgb=errors_gt)
    loss, stats = train_utils.compute_data_loss(batch, [{'rgb': rgb}], rays, 0.5, config)
    assert float(loss) == pytest.approx(3.0 / 48)
    # ... but not in the corner, where zero padding leaves 3/9 inlier neighbours and it is outside the inner patch.
    rgb[0, 1, 1] = 0.0
    rgb[0, 0, 0] = 1.0
    loss, stats = train_utils.compute_data_loss(batch, [{'rgb': rgb}], rays, 0.5, config)
    assert float(loss) == 0.0
    assert float(stats['mask']) == pytest.approx(15 / 16)
    # Nor is a 3x3 block of outliers in the corner is not (outside the inner patch, few inlier neighbours).
    rgb[0, :3, :3] = 1.0
    loss, stats = train_utils.compute_data_loss(batch, [{'rgb': rgb}], rays, 0.5, config)
    mask = _robust_mask_bruteforce(((rgb - errors_gt)**2).numpy(), 0.5, 3, 0.5, 2, 0.5)
    expected = (mask * ((rgb - errors_gt)**2).numpy()).sum() / 48
    assert float(loss) == pytest.approx(expected) and expected < 27 / 48


# ---------------------------------------------------------------------------------------------------------------
# Interlevel, distortion, normal losses.

def test_interlevel_loss_zero_when_proposal_equals_nerf():
    g = torch.Generator().manual_seed(0)
    s = torch.sort(torch.rand(5, 9, generator=g, dtype=D), dim=-1).values
    w = torch.softmax(torch.randn(5, 8, generator=g, dtype=D), dim=-1)
    hist = [{'sdist': s, 'weights': w}, {'sdist': s, 'weights': w.clone()}, {'sdist': s, 'weights': w.clone()}]
    loss = train_utils.interlevel_loss(hist, _config(interlevel_loss_mult=1.0))
    assert float(loss) == pytest.approx(0.0, abs=1e-25)


def test_interlevel_loss_hand_value_and_stop_gradient():
    s_prop = torch.tensor([[0.0, 1.0]], dtype=D)
    w_prop = torch.tensor([[0.5]], dtype=D, requires_grad=True)
    s_nerf = torch.tensor([[0.0, 0.5, 1.0]], dtype=D)
    w_nerf = torch.tensor([[0.6, 0.4]], dtype=D, requires_grad=True)
    hist = [{'sdist': s_prop, 'weights': w_prop}, {'sdist': s_nerf, 'weights': w_nerf}]
    loss = train_utils.interlevel_loss(hist, _config(interlevel_loss_mult=2.0))
    # Each NeRF interval lies inside the one proposal interval, whose outer measure is 0.5:
    # mean([(0.6 - 0.5)^2 / 0.6, 0]) * 2.
    assert float(loss.detach()) == pytest.approx(2 * 0.5 * 0.01 / 0.6, rel=1e-6)
    loss.backward()
    assert w_nerf.grad is None
    assert float(w_prop.grad) < 0  # Raising the proposal weight lowers the loss.


def test_distortion_loss_matches_bruteforce():
    g = torch.Generator().manual_seed(1)
    s = torch.sort(torch.rand(4, 11, generator=g, dtype=D), dim=-1).values
    w = torch.rand(4, 10, generator=g, dtype=D)
    loss = train_utils.distortion_loss([{'sdist': s, 'weights': w}], _config(distortion_loss_mult=0.01))
    # Eq. 15: sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (s_{i+1} - s_i), averaged over rays.
    m = 0.5 * (s[:, 1:] + s[:, :-1])
    brute = [sum(float(w[r, i] * w[r, j] * abs(m[r, i] - m[r, j])) for i in range(10) for j in range(10)) +
             sum(float(w[r, i]**2 * (s[r, i + 1] - s[r, i])) for i in range(10)) / 3 for r in range(4)]
    assert float(loss) == pytest.approx(0.01 * np.mean(brute), rel=1e-10)
    assert float(loss) == pytest.approx(0.01 * float(stepfun.lossfun_distortion(s, w).mean()), rel=1e-12)


def test_orientation_and_predicted_normal_losses():
    model = _tiny_model()  # num_levels = 2.
    viewdirs = torch.tensor([[0., 0., -1.], [1., 0., 0.]], dtype=D)
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=D)
    n = torch.tensor([[[0., 0., -1.], [0., 0., 1.]], [[0.6, 0.8, 0.], [-1., 0., 0.]]], dtype=D)
    n_pred = F.normalize(n + 0.3, dim=-1)
    hist = [{'weights': w, 'normals': n, 'normals_pred': n_pred} for _ in range(2)]
    rays = utils.Rays(None, None, viewdirs, None, None, None, None, None, None)
    config = _config(orientation_loss_mult=0.1, orientation_coarse_loss_mult=0.01,
                     orientation_loss_target='normals',
                     predicted_normal_loss_mult=3.0, predicted_normal_coarse_loss_mult=0.5)
    # n.(-v): ray 0: [-1 (penalised 1), 1]; ray 1: [-0.6 (penalised 0.36), 1] -> mean(0.5 * 1, 1 * 0.36).
    per_level = (0.5 + 0.36) / 2
    got = train_utils.orientation_loss(rays, model, hist, config)
    assert float(got) == pytest.approx((0.01 + 0.1) * per_level, rel=1e-12)
    pn = torch.mean((w * (1 - (n * n_pred).sum(-1))).sum(-1))
    got = train_utils.predicted_normal_loss(model, hist, config)
    assert float(got) == pytest.approx(float((0.5 + 3.0) * pn), rel=1e-12)
    hist[0]['normals'] = None
    with pytest.raises(ValueError):
        train_utils.orientation_loss(rays, model, hist, config)


# ---------------------------------------------------------------------------------------------------------------
# Gradient clipping, weight decay, learning rate.

def _set_grads(model, scale_by_group, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * scale_by_group[name.split('.')[0]]


def _group_norm(model, group):
    return float(torch.sqrt(sum((p.grad.double()**2).sum() for n, p in model.named_parameters()
                                if n.startswith(group + '.'))))


def test_clip_gradients_per_group_norm():
    model = _tiny_model(num_glo_features=2, num_glo_embeddings=4)
    _set_grads(model, {'nerf_mlp': 1.0, 'prop_mlp': 1e-6, 'glo_vecs': 0.5})
    before = {k: _group_norm(model, k) for k in ['nerf_mlp', 'prop_mlp', 'glo_vecs']}
    prop_before = [p.grad.clone() for p in model.prop_mlp.parameters()]
    norms = train_utils.clip_gradients(model, _config(grad_max_norm=1e-3, grad_max_val=0.))
    assert _group_norm(model, 'nerf_mlp') == pytest.approx(1e-3, rel=1e-5)
    assert _group_norm(model, 'glo_vecs') == pytest.approx(1e-3, rel=1e-5)
    assert before['prop_mlp'] < 1e-3  # Untouched: its own norm is below the bound.
    for a, b in zip(prop_before, model.prop_mlp.parameters()):
        assert torch.equal(a, b.grad)
    assert float(norms['nerf_mlp']) == pytest.approx(1e-3, rel=1e-5)


def test_clip_gradients_by_value_then_norm_and_nan():
    model = _tiny_model()
    _set_grads(model, {'nerf_mlp': 3.0, 'prop_mlp': 3.0})
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    next(model.prop_mlp.parameters()).grad[0, 0] = float('nan')
    train_utils.clip_gradients(model, _config(grad_max_norm=0.5, grad_max_val=1.0))
    clipped = {n: raw[n].clamp(-1, 1) for n in raw if n.startswith('nerf_mlp')}
    total = math.sqrt(sum(float((c.double()**2).sum()) for c in clipped.values()))
    for n, p in model.named_parameters():
        if n.startswith('nerf_mlp'):
            assert torch.allclose(p.grad, clipped[n] * (0.5 / total), rtol=1e-5, atol=1e-9)
        else:
            # A NaN poisons its own group's norm (as in the reference); nan_to_num then zeroes that group only.
            assert torch.all(p.grad == 0)


def test_weight_decay_prefixes_in_both_spellings():
    model = _tiny_model()
    trunk0 = sum(float((p.detach().double()**2).sum()) for p in model.nerf_mlp.trunk[0].parameters())
    prop = sum(float((p.detach().double()**2).sum()) for p in model.prop_mlp.parameters())
    assert float(train_utils.weight_l2(model, 'NerfMLP_0/Dense_0').detach()) == pytest.approx(trunk0, rel=1e-6)
    assert float(train_utils.weight_l2(model, 'nerf_mlp.trunk.0').detach()) == pytest.approx(trunk0, rel=1e-6)
    assert float(train_utils.weight_l2(model, 'PropMLP_0').detach()) == pytest.approx(prop, rel=1e-6)
    # 'NerfMLP_0/Dense_1' must not match 'Dense_10'-style names or other layers by accident.
    assert float(train_utils.weight_l2(model, 'NerfMLP_0/Dense_1').detach()) == pytest.approx(
        sum(float((p.detach().double()**2).sum()) for p in model.nerf_mlp.trunk[1].parameters()), rel=1e-6)
    with pytest.raises(ValueError, match='matches no parameter'):
        train_utils.weight_l2(model, 'NoSuchMLP')


def test_learning_rate_schedule_endpoints():
    model = _tiny_model()
    config = _config(lr_init=2e-3, lr_final=2e-5, max_steps=1000, lr_delay_steps=100, lr_delay_mult=0.01)
    optimizer, lr_fn = train_utils.create_optimizer(config, model)
    assert lr_fn(0) == pytest.approx(2e-3 * 0.01, rel=1e-9)
    assert lr_fn(1000) == pytest.approx(2e-5, rel=1e-9)
    # After the warm-up the schedule is log-linear: at step 500 the geometric mean.
    assert lr_fn(500) == pytest.approx(math.sqrt(2e-3 * 2e-5), rel=1e-9)
    assert lr_fn(50) == pytest.approx((0.01 + 0.99 * math.sin(math.pi / 4)) * 2e-3 * (1e-2)**0.05, rel=1e-9)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults['betas'] == (0.9, 0.999) and optimizer.defaults['eps'] == 1e-6


def test_stats_to_float_flattens():
    stats = {'loss': torch.tensor(1.5), 'psnrs': torch.tensor([10., 20.]), 'losses': {'data': torch.tensor(0.25)},
             'lr': 1e-3}
    assert train_utils.stats_to_float(stats) == {'loss': 1.5, 'psnrs/0': 10.0, 'psnrs/1': 20.0,
                                                  'losses/data': 0.25, 'lr': 1e-3}


# ---------------------------------------------------------------------------------------------------------------
# Training.

def _ring_scene(angles, res=16, radius=3.0, height=0.8, focal=1.2):
    """Rays from cameras on a ring looking at a unit sphere at the origin, coloured by its normal, in front of a
    white background; the colours are computed analytically."""
    origins, dirs = [], []
    for a in angles:
        pos = torch.tensor([radius * math.cos(a), radius * math.sin(a), height])
        fwd = -pos / pos.norm()
        right = F.normalize(torch.linalg.cross(fwd, torch.tensor([0., 0., 1.])), dim=0)
        up = torch.linalg.cross(right, fwd)
        u = (torch.arange(res) + 0.5) / res * 2 - 1
        yy, xx = torch.meshgrid(u, u, indexing='ij')
        d = fwd + (xx[..., None] * right - yy[..., None] * up) / focal
        origins.append(pos.expand_as(d))
        dirs.append(d)
    o = torch.stack(origins).reshape(-1, 3)
    d = torch.stack(dirs).reshape(-1, 3)
    v = F.normalize(d, dim=-1)
    b = (o * v).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 1.0)
    hit = disc > 0
    t = -b - torch.sqrt(disc.clamp_min(0))
    normal = F.normalize(o + t[:, None] * v, dim=-1)
    rgb = torch.where(hit[:, None], 0.5 + 0.45 * normal, torch.ones_like(normal))
    n = o.shape[0]
    radii = torch.full((n, 1), 2 / res / focal / math.sqrt(3))
    rays = utils.Rays(origins=o, directions=d, viewdirs=v, radii=radii,
                      imageplane=torch.zeros(n, 2), lossmult=torch.ones(n, 1), near=torch.full((n, 1), 1.0),
                      far=torch.full((n, 1), 5.0), cam_idx=torch.zeros(n, 1, dtype=torch.long))
    return rays, rgb


def _scene_model():
    torch.manual_seed(0)
    return models.Model(
        num_levels=2, num_prop_samples=24, num_nerf_samples=16,
        nerf_mlp_params=dict(net_depth=3, net_width=64, bottleneck_width=16, net_width_viewdirs=32,
                             max_deg_point=5, basis_shape='octahedron', basis_subdivisions=1, deg_view=2),
        prop_mlp_params=dict(net_depth=2, net_width=32, max_deg_point=4, basis_shape='octahedron',
                             basis_subdivisions=1, disable_rgb=True))


def test_train_step_reduces_loss_on_fixed_batch():
    model = _tiny_model()
    rays, rgb = _ring_scene([0.3, 2.0], res=8)
    batch = utils.Batch(rays=rays, rgb=rgb)
    config = _config(lr_init=2e-3, lr_final=2e-3, max_steps=40, lr_delay_steps=0)
    state = train_utils.create_train_state(config, model)
    losses = []
    for step in range(1, 41):
        state, stats = train_utils.train_step(state, batch, None, config, None, train_frac=step / 40)
        assert state.step == step
        losses.append(train_utils.stats_to_float(stats))
    assert losses[-1]['loss'] < 0.5 * losses[0]['loss']
    assert set(losses[0]) >= {'loss', 'psnr', 'losses/data', 'losses/interlevel', 'losses/distortion', 'lr',
                              'grad_norms/nerf_mlp', 'grad_norms/prop_mlp', 'weight_l2s/nerf_mlp'}
    assert losses[0]['lr'] == pytest.approx(2e-3)
    assert losses[-1]['psnr'] == pytest.approx(-10 * math.log10(losses[-1]['mses/1']), rel=1e-6)
    # Per-group clipping bounds each group's (pre-nan_to_num) norm by grad_max_norm.
    assert losses[-1]['grad_norms_clipped/nerf_mlp'] <= 1e-3 * (1 + 1e-5)


def test_train_step_casts_pixels_like_precast_rays():
    from mipnerf360 import camera_utils
    n = 24
    g = torch.Generator().manual_seed(0)
    pixels = utils.Pixels(pix_x_int=torch.randint(0, 20, (n,), generator=g),
                          pix_y_int=torch.randint(0, 10, (n,), generator=g), lossmult=torch.ones(n, 1),
                          near=torch.full((n, 1), 2.), far=torch.full((n, 1), 6.),
                          cam_idx=torch.randint(0, 2, (n, 1), generator=g))
    pixtocam = torch.linalg.inv(torch.tensor([[20., 0, 10], [0, 20, 5], [0, 0, 1]]))
    camtoworlds = torch.eye(4)[:3].repeat(2, 1, 1)
    camtoworlds[:, 2, 3] = 4.
    camtoworlds[1, 0, 3] = 0.5
    cameras = (pixtocam, camtoworlds, None, None)
    rgb = torch.rand(n, 3, generator=g)
    rays = camera_utils.cast_ray_batch(cameras, pixels, camera_utils.ProjectionType.PERSPECTIVE, xnp=torch)
    config = _config()
    results = []
    for b in [utils.Batch(rays=pixels, rgb=rgb), utils.Batch(rays=rays, rgb=rgb)]:
        model = _tiny_model()
        state = train_utils.create_train_state(config, model)
        _, stats = train_utils.train_step(state, b, cameras, config, None, train_frac=0.5)
        results.append(train_utils.stats_to_float(stats))
    assert results[0]['loss'] == pytest.approx(results[1]['loss'], rel=1e-6)
    with pytest.raises(ValueError, match='batch dimensions'):
        train_utils.train_step(state, utils.Batch(rays=rays, rgb=rgb[:5]), None, config, None, train_frac=0.5)


def test_tiny_model_learns_analytic_sphere():
    train_rays, train_rgb = _ring_scene(np.linspace(0, 2 * np.pi, 8, endpoint=False))
    test_rays, test_rgb = _ring_scene([np.pi / 8 + 0.1])
    model = _scene_model()
    steps = 400
    config = _config(lr_init=1e-3, lr_final=1e-4, max_steps=steps, lr_delay_steps=50, lr_delay_mult=0.1,
                     batch_size=256)
    state = train_utils.create_train_state(config, model)

    def test_psnr():
        with torch.no_grad():
            rgb = model(None, test_rays, 1.0, False)[0][-1]['rgb']
        return -10 * math.log10(float(((rgb - test_rgb)**2).mean()))

    psnr0 = test_psnr()
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        idx = torch.randint(0, train_rgb.shape[0], (config.batch_size,), generator=g)
        batch = utils.Batch(rays=train_rays[idx], rgb=train_rgb[idx])
        train_utils.train_step(state, batch, None, config, g, train_frac=step / steps)
    psnr1 = test_psnr()
    assert psnr1 > 19.5 and psnr1 > psnr0 + 5, (psnr0, psnr1)
