"""Tests for mipnerf360.render: Gaussian moments against Monte Carlo, closed forms, brute force, extremes."""

import math

import pytest
import torch

from mipnerf360 import render

F64 = torch.float64


def _perp_basis(d: torch.Tensor):
    """Two unit vectors orthogonal to d [3] and to each other."""
    u = d / torch.linalg.norm(d)
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=d.dtype) if u[0].abs() < 0.9 else torch.tensor(
        [0.0, 1.0, 0.0], dtype=d.dtype)
    e1 = torch.linalg.cross(u, helper)
    e1 = e1 / torch.linalg.norm(e1)
    return e1, torch.linalg.cross(u, e1)


def _sample_solid(gen, n, d, t0, t1, radius, shape):
    """Points uniform in volume inside a conical frustum (apex at 0, radius `radius * t` at parameter t, axis
    point t * d) or a cylinder (radius `radius`) between parameters t0 and t1."""
    u = torch.rand(3, n, generator=gen, dtype=F64)
    if shape == 'cone':
        # Cross-section area grows like t^2, so t has density proportional to t^2.
        t = (t0**3 + u[0] * (t1**3 - t0**3))**(1 / 3)
        rad = radius * t * u[1].sqrt()
    else:
        t = t0 + u[0] * (t1 - t0)
        rad = radius * u[1].sqrt()
    theta = 2 * math.pi * u[2]
    e1, e2 = _perp_basis(d)
    return t[:, None] * d + (rad * torch.cos(theta))[:, None] * e1 + (rad * torch.sin(theta))[:, None] * e2


_SOLIDS = [  # (d, t0, t1, radius)
    ([0.3, -0.2, 1.0], 1.0, 1.5, 0.1),
    ([2.0, 1.0, -1.0], 0.2, 2.0, 0.3),   # Non-unit, long interval, wide cone.
    ([0.0, 0.0, 0.5], 4.0, 4.2, 0.05),   # Thin, far interval, short direction.
]


@pytest.mark.parametrize('shape', ['cone', 'cylinder'])
@pytest.mark.parametrize('d,t0,t1,radius', _SOLIDS)
def test_gaussian_matches_monte_carlo_moments(shape, d, t0, t1, radius):
    gen = torch.Generator().manual_seed(0)
    d = torch.tensor(d, dtype=F64)
    n = 400000
    pts = _sample_solid(gen, n, d, t0, t1, radius, shape)
    mc_mean, mc_cov = pts.mean(0), torch.cov(pts.T)

    fn = render.conical_frustum_to_gaussian if shape == 'cone' else render.cylinder_to_gaussian
    t0_, t1_, r_ = (torch.tensor([v], dtype=F64) for v in (t0, t1, radius))
    mean, cov = fn(d, t0_, t1_, r_, False)
    _, cov_diag = fn(d, t0_, t1_, r_, True)
    assert mean.shape == (1, 3) and cov.shape == (1, 3, 3) and cov_diag.shape == (1, 3)

    scale = torch.diagonal(mc_cov).max()
    mean_tol = 6 * (scale / n).sqrt()
    cov_tol = 6 * scale * (2 / n)**0.5
    assert torch.all((mean[0] - mc_mean).abs() < mean_tol), (mean[0], mc_mean)
    assert torch.all((cov[0] - mc_cov).abs() < cov_tol), (cov[0], mc_cov)
    torch.testing.assert_close(cov_diag[0], torch.diagonal(cov[0]), rtol=1e-12, atol=1e-15)


def test_stable_and_unstable_frustum_agree_in_float64():
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(20, 3, generator=gen, dtype=F64)
    tdist = torch.sort(0.5 + 5 * torch.rand(20, 9, generator=gen, dtype=F64), dim=-1).values
    r = 0.01 + 0.1 * torch.rand(20, 1, generator=gen, dtype=F64)
    for diag in (True, False):
        stable = render.conical_frustum_to_gaussian(d, tdist[:, :-1], tdist[:, 1:], r, diag, stable=True)
        unstable = render.conical_frustum_to_gaussian(d, tdist[:, :-1], tdist[:, 1:], r, diag, stable=False)
        for s, u in zip(stable, unstable):
            torch.testing.assert_close(s, u, rtol=1e-8, atol=1e-10)


def test_stable_frustum_is_accurate_in_float32_far_away():
    # Thin intervals far from the origin: the stable form in float32 stays close to float64 truth.
    t0 = torch.tensor([1000.0, 5000.0, 20000.0], dtype=F64)
    t1 = t0 + torch.tensor([0.01, 0.5, 2.0], dtype=F64)
    d = torch.tensor([0.6, 0.0, 0.8], dtype=F64)
    r = torch.tensor([0.002], dtype=F64)
    truth = render.conical_frustum_to_gaussian(d, t0, t1, r, True, stable=False)
    f32 = render.conical_frustum_to_gaussian(d.float(), t0.float(), t1.float(), r.float(), True, stable=True)
    torch.testing.assert_close(f32[0].double(), truth[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(f32[1].double(), truth[1], rtol=1e-4, atol=1e-9)


def test_frustum_moments_closed_form_for_thin_interval():
    # A very thin frustum is a disc of radius r t: mean t d, axial variance ~ (t1 - t0)^2 / 12 |d|^2-scaled,
    # radial variance (r t)^2 / 4.
    d = torch.tensor([0.0, 0.0, 2.0], dtype=F64)
    t0, t1 = torch.tensor([3.0], dtype=F64), torch.tensor([3.0 + 1e-4], dtype=F64)
    r = torch.tensor([0.1], dtype=F64)
    mean, cov = render.conical_frustum_to_gaussian(d, t0, t1, r, False)
    tm = 3.0 + 0.5e-4
    torch.testing.assert_close(mean[0], tm * d, rtol=1e-9, atol=0)
    torch.testing.assert_close(cov[0, 0, 0], torch.tensor((0.1 * tm)**2 / 4, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(cov[0, 2, 2], torch.tensor(4 * 1e-8 / 12, dtype=F64), rtol=1e-3, atol=0)


def test_lift_gaussian_eigenstructure():
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(5, 3, generator=gen, dtype=F64) * 3
    t_mean = torch.rand(5, 4, generator=gen, dtype=F64)
    t_var = torch.rand(5, 4, generator=gen, dtype=F64)
    r_var = torch.rand(5, 4, generator=gen, dtype=F64)
    mean, cov = render.lift_gaussian(d, t_mean, t_var, r_var, diag=False)
    torch.testing.assert_close(mean, d[:, None, :] * t_mean[..., None])
    # cov d = t_var |d|^2 d; cov v = r_var v for v orthogonal to d.
    d_sq = (d**2).sum(-1)
    torch.testing.assert_close(cov @ d[:, None, :, None], (t_var * d_sq[:, None])[..., None, None] *
                               d[:, None, :, None])
    v = torch.linalg.cross(d, torch.randn(5, 3, generator=gen, dtype=F64))
    torch.testing.assert_close(cov @ v[:, None, :, None], r_var[..., None, None] * v[:, None, :, None])
    _, cov_diag = render.lift_gaussian(d, t_mean, t_var, r_var, diag=True)
    torch.testing.assert_close(cov_diag, torch.diagonal(cov, dim1=-2, dim2=-1))


@pytest.mark.parametrize('ray_shape', ['cone', 'cylinder'])
@pytest.mark.parametrize('diag', [True, False])
def test_cast_rays_offsets_by_origin(ray_shape, diag):
    gen = torch.Generator().manual_seed(3)
    tdist = torch.sort(torch.rand(2, 6, 17, generator=gen, dtype=F64) * 10, dim=-1).values
    origins = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    directions = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    radii = torch.rand(2, 6, 1, generator=gen, dtype=F64) * 0.01
    means, covs = render.cast_rays(tdist, origins, directions, radii, ray_shape, diag)
    fn = render.conical_frustum_to_gaussian if ray_shape == 'cone' else render.cylinder_to_gaussian
    m0, c0 = fn(directions, tdist[..., :-1], tdist[..., 1:], radii, diag)
    assert means.shape == (2, 6, 16, 3)
    assert covs.shape == ((2, 6, 16, 3) if diag else (2, 6, 16, 3, 3))
    torch.testing.assert_close(means, m0 + origins[..., None, :])
    torch.testing.assert_close(covs, c0)


def test_cast_rays_rejects_unknown_shape():
    with pytest.raises(ValueError, match='cone'):
        render.cast_rays(torch.ones(1, 3), torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 1), 'sphere')


# ---------------------------------------------------------------- compositing


def _brute_force_weights(density, tdist, dirs):
    """Per-ray Python loop: w_i = (1 - exp(-s_i d_i)) prod_{j<i} exp(-s_j d_j), d_i = (t_{i+1} - t_i) |dir|."""
    weights = torch.zeros_like(density)
    for ray in range(density.shape[0]):
        norm = torch.linalg.norm(dirs[ray])
        trans = 1.0
        for i in range(density.shape[1]):
            tau = density[ray, i] * (tdist[ray, i + 1] - tdist[ray, i]) * norm
            weights[ray, i] = (1 - torch.exp(-tau)) * trans
            trans = trans * torch.exp(-tau)
    return weights


def test_alpha_weights_match_brute_force_and_scale_with_direction_norm():
    gen = torch.Generator().manual_seed(4)
    density = torch.exp(2 * torch.randn(6, 10, generator=gen, dtype=F64))
    tdist = torch.sort(torch.rand(6, 11, generator=gen, dtype=F64) * 4, dim=-1).values
    dirs = torch.randn(6, 3, generator=gen, dtype=F64)
    weights, alpha, trans = render.compute_alpha_weights(density, tdist, dirs)
    torch.testing.assert_close(weights, _brute_force_weights(density, tdist, dirs))
    torch.testing.assert_close(weights, alpha * trans)
    torch.testing.assert_close(trans[:, 0], torch.ones(6, dtype=F64))
    # Doubling |dir| while halving the distances leaves the weights unchanged.
    w2, _, _ = render.compute_alpha_weights(density, tdist / 2, 2 * dirs)
    torch.testing.assert_close(w2, weights)


@pytest.mark.parametrize('opaque_background', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_alpha_weights_bounded_and_finite_at_extremes(opaque_background, dtype):
    gen = torch.Generator().manual_seed(5)
    density = torch.tensor([[0.0] * 8, [1e10] * 8, [0.0, 0.0, 1e10, 0.0, 1e10, 0.0, 0.0, 0.0],
                            [1e-10] * 8], dtype=dtype)
    density = torch.cat([density, torch.exp(10 * torch.randn(4, 8, generator=gen)).to(dtype)])
    tdist = torch.sort(torch.rand(8, 9, generator=gen) * 1e4, dim=-1).values.to(dtype)
    dirs = torch.randn(8, 3, generator=gen).to(dtype)
    density.requires_grad_(True)
    weights, alpha, trans = render.compute_alpha_weights(density, tdist, dirs, opaque_background)
    for x in (weights, alpha, trans):
        assert torch.all(torch.isfinite(x))
        assert torch.all((x >= 0) & (x <= 1))
    acc = weights.sum(-1)
    assert torch.all(acc <= 1 + 4 * torch.finfo(dtype).eps)
    (grad,) = torch.autograd.grad(weights.sum(), density)
    assert torch.all(torch.isfinite(grad))
    if opaque_background:
        torch.testing.assert_close(acc.detach(), torch.ones(8, dtype=dtype))
        assert torch.all(alpha[:, -1] == 1)
    else:
        assert acc[0] == 0  # Empty space.
    assert torch.all(acc[1:3] > 1 - 4 * torch.finfo(dtype).eps)  # Hits a wall of density 1e10.
    assert weights[2, 2] > 1 - 1e-6 and weights[2, 4] == 0  # Everything stops at the first wall.


# ---------------------------------------------------------------- volumetric_rendering


def test_volumetric_rendering_single_opaque_sample():
    tdist = torch.tensor([[1.0, 2.0, 3.0, 5.0, 8.0]], dtype=F64)
    density = torch.tensor([[0.0, 0.0, 1e10, 0.0]], dtype=F64)
    dirs = torch.tensor([[0.0, 0.0, -1.0]], dtype=F64)
    weights, _, _ = render.compute_alpha_weights(density, tdist, dirs)
    rgbs = torch.tensor([[[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.9, 0.3, 0.4], [0.5, 0.5, 0.5]]], dtype=F64)
    normals = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]]], dtype=F64)
    out = render.volumetric_rendering(rgbs, weights, tdist, torch.tensor([1.0, 1.0, 1.0], dtype=F64),
                                      torch.tensor([[10.0]], dtype=F64), True,
                                      {'normals': normals, 'roughness': None})
    assert set(out) == {'rgb', 'acc', 'normals', 'distance_mean', 'distance_median', 'distance_percentile_5',
                        'distance_percentile_95'}
    torch.testing.assert_close(out['rgb'], torch.tensor([[0.9, 0.3, 0.4]], dtype=F64))
    torch.testing.assert_close(out['acc'], torch.tensor([1.0], dtype=F64))
    torch.testing.assert_close(out['normals'], torch.tensor([[0.0, 0.0, 1.0]], dtype=F64))
    # All the weight is on the interval [3, 5]: its log-mean distance is the midpoint, its percentiles
    # interpolate linearly inside it.
    torch.testing.assert_close(out['distance_mean'], torch.tensor([4.0], dtype=F64))
    torch.testing.assert_close(out['distance_median'], torch.tensor([4.0], dtype=F64))
    torch.testing.assert_close(out['distance_percentile_5'], torch.tensor([3.1], dtype=F64))
    torch.testing.assert_close(out['distance_percentile_95'], torch.tensor([4.9], dtype=F64))


def test_volumetric_rendering_empty_ray_shows_background():
    tdist = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    weights = torch.zeros(1, 2, dtype=F64)
    rgbs = torch.rand(1, 2, 3, dtype=F64)
    bg = torch.tensor([[0.25, 0.5, 0.75]], dtype=F64)
    out = render.volumetric_rendering(rgbs, weights, tdist, bg, torch.tensor([[7.0]], dtype=F64), True)
    torch.testing.assert_close(out['rgb'], bg)
    assert out['acc'].item() == 0
    assert torch.all(torch.isfinite(out['distance_mean']))
    assert 1.0 <= out['distance_mean'].item() <= 3.0
    # The background's weight sits on the extra interval [3, t_far = 7].
    torch.testing.assert_close(out['distance_median'], torch.tensor([5.0], dtype=F64))


def test_volumetric_rendering_matches_brute_force():
    gen = torch.Generator().manual_seed(6)
    n_rays, n = 5, 12
    tdist = torch.sort(0.5 + 10 * torch.rand(n_rays, n + 1, generator=gen, dtype=F64), dim=-1).values
    density = torch.exp(torch.randn(n_rays, n, generator=gen, dtype=F64) - 2)
    weights, _, _ = render.compute_alpha_weights(density, tdist, torch.ones(n_rays, 3, dtype=F64))
    rgbs = torch.rand(n_rays, n, 3, generator=gen, dtype=F64)
    bg = torch.rand(n_rays, 3, generator=gen, dtype=F64)
    out = render.volumetric_rendering(rgbs, weights, tdist, bg, tdist[:, -1:] + 1, False)
    assert set(out) == {'rgb'}
    out = render.volumetric_rendering(rgbs, weights, tdist, bg, tdist[:, -1:] + 1, True)
    for ray in range(n_rays):
        w = weights[ray]
        acc = w.sum()
        rgb = sum(w[i] * rgbs[ray, i] for i in range(n)) + max(0.0, 1 - acc.item()) * bg[ray]
        torch.testing.assert_close(out['rgb'][ray], rgb)
        mids = (tdist[ray, :-1] + tdist[ray, 1:]) / 2
        dist = torch.exp((w * torch.log(mids)).sum() / acc)
        torch.testing.assert_close(out['distance_mean'][ray], dist)
        assert tdist[ray, 0] <= out['distance_percentile_5'][ray] <= out['distance_median'][ray]
        assert out['distance_median'][ray] <= out['distance_percentile_95'][ray] <= tdist[ray, -1] + 1


def test_volumetric_rendering_gradients_are_finite():
    tdist = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    density = torch.tensor([[0.0, 1e10, 0.5]], requires_grad=True)
    rgbs = torch.rand(1, 3, 3, requires_grad=True)
    weights, _, _ = render.compute_alpha_weights(density, tdist, torch.ones(1, 3))
    out = render.volumetric_rendering(rgbs, weights, tdist, torch.zeros(3), tdist[:, -1:], True)
    loss = sum(v.sum() for v in out.values())
    grads = torch.autograd.grad(loss, (density, rgbs))
    assert all(torch.all(torch.isfinite(g)) for g in grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(7)
    tdist = torch.sort(0.5 + 10 * torch.rand(256, 33, generator=gen), dim=-1).values
    origins, dirs = torch.randn(256, 3, generator=gen), torch.randn(256, 3, generator=gen)
    radii = 0.01 * torch.rand(256, 1, generator=gen)
    density = torch.exp(torch.randn(256, 32, generator=gen))
    rgbs = torch.rand(256, 32, 3, generator=gen)
    args = (tdist, origins, dirs, radii, density, rgbs)

    def run(tdist, origins, dirs, radii, density, rgbs):
        means, covs = render.cast_rays(tdist, origins, dirs, radii, 'cone', diag=False)
        weights, _, _ = render.compute_alpha_weights(density, tdist, dirs, True)
        out = render.volumetric_rendering(rgbs, weights, tdist, torch.ones_like(rgbs[:, 0]), tdist[:, -1:], True)
        return [means, covs, weights] + [out[k] for k in sorted(out)]

    for c, g in zip(run(*args), run(*(a.cuda() for a in args))):
        assert g.device.type == 'cuda'
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-4)
