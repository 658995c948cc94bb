"""torch.compile of the model: the training and eval forward passes are single graphs (no breaks), compiled and
eager outputs and gradients agree, the random streams stay a pure function of the generator, and a new
train_frac does not recompile. Most checks trace with the 'eager' / 'aot_eager' backends (CPU inductor compiles
take tens of seconds); one small MLP goes through inductor."""

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from mipnerf360 import configs, coord, models
from test_models import _random_rays


def _tiny_model(**kw):
    """A 360-style model (contraction, density without normals) with every random draw switched on."""
    params = dict(
        num_prop_samples=12, num_nerf_samples=8, num_levels=3, bg_intensity_range=(0., 1.),
        raydist_fn=torch.reciprocal, near_anneal_rate=0.5, num_glo_features=2, num_glo_embeddings=4,
        nerf_mlp_params=dict(net_depth=3, net_width=16, bottleneck_width=8, net_width_viewdirs=8, max_deg_point=4,
                             basis_shape='octahedron', basis_subdivisions=1, deg_view=2, warp_fn=coord.contract,
                             disable_density_normals=True, density_noise=0.5, bottleneck_noise=0.5),
        prop_mlp_params=dict(net_depth=2, net_width=8, max_deg_point=3, basis_shape='octahedron',
                             basis_subdivisions=1, disable_rgb=True, warp_fn=coord.contract,
                             disable_density_normals=True))
    params.update(kw)
    torch.manual_seed(0)
    return models.Model(**params)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_forward(model, rays, seed, train_frac):
    return model(torch.Generator().manual_seed(seed), rays, train_frac, compute_extras=False, zero_glo=False)


def explain_render_rays(model, n: int = 6, train: bool = True):
    """torch._dynamo.explain of `model.render_rays` on `n` random rays: training (pre-drawn noise, no extras) or
    eval (no noise, extras); resets dynamo afterwards."""
    rays = _random_rays(n, dtype=torch.float32)
    noise = model.draw_noise(torch.Generator().manual_seed(0), (n,), torch.float32, torch.device('cpu'))
    frac = torch.tensor(0.3, dtype=torch.float64)
    args = (noise, rays, frac, False, False) if train else (None, rays, frac, True, True)
    explained = torch._dynamo.explain(model.render_rays)(*args)
    torch._dynamo.reset()
    return explained


def test_training_and_eval_forward_have_no_graph_breaks():
    model = _tiny_model()
    for explained in (explain_render_rays(model), explain_render_rays(model, train=False),
                      explain_render_rays(model.set_precision('bf16'))):
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_predrawn_noise_reproduces_generator_draws():
    """The noise drawn up front is the stream the generator gives, and forward is a pure function of it."""
    model = _tiny_model()
    rays = _random_rays(5, dtype=torch.float32)
    noise = model.draw_noise(torch.Generator().manual_seed(7), (5,), torch.float32, torch.device('cpu'))
    assert [sorted(level) for level in noise] == [['bg', 'jitter']] * 2 + [['bg', 'bottleneck', 'density', 'jitter']]
    assert noise[0]['jitter'].shape == (5, 1) and noise[2]['bottleneck'].shape == (5, 8, 8)
    # The same numbers in the same order as drawing them one by one from the generator.
    g = torch.Generator().manual_seed(7)
    expected = torch.rand(5, 1, generator=g)
    assert torch.equal(noise[0]['jitter'], expected)
    assert torch.equal(noise[0]['bg'], torch.rand(5, 3, generator=g))
    frac = torch.tensor(0.3, dtype=torch.float64)
    a = _train_forward(model, rays, 7, 0.3)[0][-1]['rgb']
    b = model.render_rays(noise, rays, frac, False, False)[0][-1]['rgb']
    c = _train_forward(model, rays, 8, 0.3)[0][-1]['rgb']
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.slow
def test_compiled_model_matches_eager_and_train_frac_does_not_recompile():
    eager_model = _tiny_model()
    model = _tiny_model()
    counter = CompileCounter()
    models.compile_model(model, 'model', backend='aot_eager')
    rays = _random_rays(6, dtype=torch.float32)
    for step, frac in enumerate([0.1, 0.8]):
        out, hist = _train_forward(model, rays, step, frac)
        ref, ref_hist = _train_forward(eager_model, rays, step, frac)
        assert torch.allclose(out[-1]['rgb'], ref[-1]['rgb'], atol=1e-6)
        for h, r in zip(hist, ref_hist):
            assert torch.allclose(h['sdist'], r['sdist'], atol=1e-6)
            assert torch.allclose(h['weights'], r['weights'], atol=1e-6)
        for o, h in ((out, hist), (ref, ref_hist)):
            (o[-1]['rgb'].sum() + sum((x['weights'] ** 2).sum() for x in h)).backward()
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert q.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    # Parameter names are those of the plain model (checkpoints load either way).
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager_model.named_parameters()]

    torch._dynamo.reset()
    models.compile_model(model, 'model', backend=counter)
    for step, frac in enumerate([0.1, 0.2, 0.55, 0.9]):
        _train_forward(model, rays, step, frac)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_compile_model_mlp_with_inductor():
    """One real (inductor) compile, of one small MLP without gradients."""
    torch.manual_seed(0)
    mlp = models.MLP(net_depth=2, net_width=8, bottleneck_width=4, net_width_viewdirs=4, max_deg_point=2,
                     basis_shape='octahedron', basis_subdivisions=1, deg_view=1, disable_density_normals=True)
    means = torch.randn(3, 4, 3)
    covs = 0.01 * torch.eye(3).expand(3, 4, 3, 3)
    viewdirs = torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    with torch.no_grad():
        eager = mlp(None, (means, covs), viewdirs=viewdirs)
        mlp.evaluate = torch.compile(mlp.evaluate)
        compiled = mlp(None, (means, covs), viewdirs=viewdirs)
    for k in ('density', 'rgb'):
        assert torch.allclose(compiled[k], eager[k], atol=1e-5), k


def test_compile_model_modes():
    model = _tiny_model()
    assert models.compile_model(model, 'none') is model and 'render_rays' not in vars(model)
    models.compile_model(model, 'mlp', backend='eager')
    assert 'evaluate' in vars(model.nerf_mlp) and 'evaluate' in vars(model.prop_mlp)
    with pytest.raises(configs.ConfigError, match="Config.compile = 'all'"):
        models.compile_model(model, 'all')


def test_randomized_forward_and_backward_hold_no_host_sync():
    from syncguard import no_host_sync
    model = _tiny_model()
    rays = _random_rays(6, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with no_host_sync():
        for frac in (0.3, torch.tensor(0.6)):
            renderings, history = model(g, rays, frac, compute_extras=False, zero_glo=False)
            (renderings[-1]['rgb'].sum() + history[0]['weights'].sum()).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_constant_result_mark_is_torchs_and_commands_start_without_dynamo():
    """math's own `assume_constant_result` marks a function as torch's does (the graph-break tests above rely on
    it), without importing torch._dynamo: eval / render / export / the viewer start about 1 s sooner."""
    from mipnerf360 import math
    assert vars(math._assume_constant_result(lambda: 0)) == vars(torch.compiler.assume_constant_result(lambda: 0))
    assert math._reduced_fp32_matmul._dynamo_marked_constant is True
    import subprocess
    import sys
    code = ('import sys; import mipnerf360.cli.eval, mipnerf360.cli.render, mipnerf360.cli.export, mipnerf360.view; '
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == 'False', out.stderr
