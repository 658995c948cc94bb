"""camera_utils: rays against independent projections and closed forms, distortion round trips, NDC, paths."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mipnerf360 import camera_utils as cu
from mipnerf360 import configs, utils
from syncguard import no_host_sync

PT = cu.ProjectionType
FLIP = np.array([1., -1., -1.])  # OpenCV <-> OpenGL camera axes.


def _rand_rotations(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1
    return q


def _rand_cameras(rng, n):
    """n random OpenGL poses [n, 3, 4], intrinsics K [n, 3, 3] (fx != fy, off-centre principal points)."""
    poses = np.concatenate([_rand_rotations(rng, n), rng.normal(size=(n, 3, 1))], -1)
    fx, fy = rng.uniform(200, 600, n), rng.uniform(200, 600, n)
    cx, cy = rng.uniform(150, 350, n), rng.uniform(100, 300, n)
    K = np.stack([cu.intrinsic_matrix(*v) for v in zip(fx, fy, cx, cy)])
    return poses, K


def _project(points, pose, K, distort=None):
    """Independent pinhole projection of world points [..., 3] to continuous pixel coordinates [..., 2]."""
    cam = np.einsum('...ji,...j->...i', pose[..., :3, :3], points - pose[..., :3, 3]) * FLIP  # OpenCV axes.
    x, y = cam[..., 0] / cam[..., 2], cam[..., 1] / cam[..., 2]
    if distort is not None:
        x, y = distort(x, y)
    uv = np.einsum('...ij,...j->...i', K, np.stack([x, y, np.ones_like(x)], -1))
    return uv[..., :2] / uv[..., 2:]


def _ray_batch(rng, n_cams=4, n_rays=500):
    poses, K = _rand_cameras(rng, n_cams)
    idx = rng.integers(0, n_cams, n_rays)
    # Integer pixels whose normalised coordinates lie within +-0.6 (where moderate distortion is invertible).
    px = np.floor(K[idx, 0, 2] + K[idx, 0, 0] * rng.uniform(-.6, .6, n_rays)).astype(np.int64)
    py = np.floor(K[idx, 1, 2] + K[idx, 1, 1] * rng.uniform(-.6, .6, n_rays)).astype(np.int64)
    return poses, K, idx, px, py


# ---------------------------------------------------------------------------------------------- rays ------

def test_perspective_rays_project_back_to_pixel_centres():
    rng = np.random.default_rng(0)
    poses, K, idx, px, py = _ray_batch(rng)
    o, d, v, r, ip = cu.pixels_to_rays(px, py, np.linalg.inv(K)[idx], poses[idx])
    # Directions have unit depth along the camera's -z axis; viewdirs are their normalised copies.
    depth = -np.einsum('ni,ni->n', d, poses[idx, :, 2])
    np.testing.assert_allclose(depth, 1., atol=1e-12)
    np.testing.assert_allclose(v, d / np.linalg.norm(d, axis=-1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(o, poses[idx, :, 3], atol=0)
    for t in [0.5, 3., 40.]:
        uv = _project(o + t * d, poses[idx], K[idx])
        np.testing.assert_allclose(uv, np.stack([px + .5, py + .5], -1), atol=1e-7)
    # imageplane is the OpenGL camera-space (x, y) of the ray at unit depth.
    cam = np.einsum('nji,nj->ni', poses[idx, :, :3], d)
    np.testing.assert_allclose(ip, cam[:, :2], atol=1e-12)


def test_radii_closed_form_pinhole():
    rng = np.random.default_rng(1)
    poses, _, _, px, py = _ray_batch(rng, n_cams=1)
    focal = 321.
    # Neighbouring unit-depth directions are exactly 1/focal apart, for any rotation.
    _, _, _, radii, _ = cu.pixels_to_rays(px, py, cu.get_pixtocam(focal, 500, 400), poses[0])
    np.testing.assert_allclose(radii[..., 0], (1. / focal) * 2. / np.sqrt(12.), rtol=1e-12)
    # With fx != fy the radius is the mean of the two spacings.
    K = cu.intrinsic_matrix(200., 400., 250., 200.)
    _, _, _, radii, _ = cu.pixels_to_rays(px, py, np.linalg.inv(K), poses[0])
    np.testing.assert_allclose(radii[..., 0], .5 * (1 / 200. + 1 / 400.) * 2. / np.sqrt(12.), rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(k1=st.floats(-.2, .2), k2=st.floats(-.05, .05), k3=st.floats(-.01, .01), k4=st.floats(-.002, .002),
       p1=st.floats(-.01, .01), p2=st.floats(-.01, .01), seed=st.integers(0, 2**16))
def test_opencv_undistort_inverts_distort(k1, k2, k3, k4, p1, p2, seed):
    params = dict(k1=k1, k2=k2, k3=k3, k4=k4, p1=p1, p2=p2)
    xy = np.random.default_rng(seed).uniform(-.7, .7, (2, 200))
    xd, yd = cu.radial_and_tangential_distort(xy[0], xy[1], **params)
    x, y = cu._radial_and_tangential_undistort(xd, yd, **params)
    np.testing.assert_allclose(np.stack([x, y]), xy, atol=1e-9)
    # The residual/Jacobian helper agrees with central finite differences of the distortion.
    h = 1e-6
    fx, fy, fx_x, fx_y, fy_x, fy_y = cu._compute_residual_and_jacobian(xy[0], xy[1], xd, yd, **params)
    np.testing.assert_allclose(np.stack([fx, fy]), 0., atol=1e-15)
    for (dx, dy), jx, jy in [((h, 0.), fx_x, fy_x), ((0., h), fx_y, fy_y)]:
        ax, ay = cu.radial_and_tangential_distort(xy[0] + dx, xy[1] + dy, **params)
        bx, by = cu.radial_and_tangential_distort(xy[0] - dx, xy[1] - dy, **params)
        np.testing.assert_allclose((ax - bx) / (2 * h), jx, atol=1e-7)
        np.testing.assert_allclose((ay - by) / (2 * h), jy, atol=1e-7)


def test_opencv_rays_project_back_through_distortion():
    rng = np.random.default_rng(2)
    poses, K, idx, px, py = _ray_batch(rng)
    params = dict(k1=-.12, k2=.03, k3=-.004, k4=.0008, p1=.003, p2=-.002)
    o, d, _, _, _ = cu.pixels_to_rays(px, py, np.linalg.inv(K)[idx], poses[idx], distortion_params=params,
                                      camtype=PT.PERSPECTIVE)
    uv = _project(o + 2. * d, poses[idx], K[idx],
                  distort=lambda x, y: cu.radial_and_tangential_distort(x, y, **params))
    np.testing.assert_allclose(uv, np.stack([px + .5, py + .5], -1), atol=1e-6)
    # Per-ray distortion parameters: every ray uses its own camera's k1.
    k1 = np.array([-.2, -.1, 0., .1])[idx]
    o, d, _, _, _ = cu.pixels_to_rays(px, py, np.linalg.inv(K)[idx], poses[idx], distortion_params={'k1': k1})
    uv = _project(o + d, poses[idx], K[idx], distort=lambda x, y: cu.radial_and_tangential_distort(x, y, k1=k1))
    np.testing.assert_allclose(uv, np.stack([px + .5, py + .5], -1), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(k1=st.floats(-.05, .05), k2=st.floats(-.01, .01), k3=st.floats(-.002, .002), k4=st.floats(-.0005, .0005),
       seed=st.integers(0, 2**16))
def test_fisheye_round_trip(k1, k2, k3, k4, seed):
    rng = np.random.default_rng(seed)
    params = dict(k1=k1, k2=k2, k3=k3, k4=k4)
    # Camera-space unit directions up to 80 degrees off the optical axis (OpenCV axes, z forward); with these
    # coefficients theta_d(theta) is monotonic there, so the 10 Newton steps of the reference converge.
    theta = rng.uniform(0., np.deg2rad(80.), 300)
    phi = rng.uniform(0., 2 * np.pi, 300)
    dirs_cv = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    xd, yd = cu.fisheye_distort_dirs(dirs_cv, **params)
    front = dirs_cv[:, 2] > .1  # The pinhole-coordinate variant agrees in front of the camera.
    xf, yf = cu.fisheye_distort(dirs_cv[front, 0] / dirs_cv[front, 2], dirs_cv[front, 1] / dirs_cv[front, 2],
                                **params)
    np.testing.assert_allclose(np.stack([xf, yf]), np.stack([xd[front], yd[front]]), atol=1e-12)
    # undistort(distort(.)) recovers the equidistant point theta * (cos phi, sin phi).
    x, y = cu._radial_and_tangential_undistort(xd, yd, **params)
    np.testing.assert_allclose(np.stack([x, y], -1), theta[:, None] * dirs_cv[:, :2] /
                               np.sin(theta)[:, None], atol=1e-9)
    # Through pixels_to_rays: pixels at the distorted points give back the original directions.
    f, c = 250., 300.
    K = cu.intrinsic_matrix(f, f, c, c)
    pose = np.concatenate([_rand_rotations(rng, 1)[0], rng.normal(size=(3, 1))], -1)
    # pixels_to_rays adds the half-pixel offset, so feed pixel centres minus .5 (non-integers are fine).
    _, _, v, _, _ = cu.pixels_to_rays(f * xd + c - .5, f * yd + c - .5, np.linalg.inv(K), pose,
                                      distortion_params=params, camtype=PT.FISHEYE)
    np.testing.assert_allclose(v, (dirs_cv * FLIP) @ pose[:, :3].T, atol=1e-9)
    # points_to_pixels is the inverse map.
    uv, depth = cu.points_to_pixels(pose[:, 3] + 3. * v, np.linalg.inv(K), pose, params, camtype=PT.FISHEYE)
    np.testing.assert_allclose(uv, np.stack([f * xd + c - .5, f * yd + c - .5], -1), atol=1e-7)
    np.testing.assert_allclose(depth, 3. * dirs_cv[:, 2], atol=1e-9)


def test_fisheye_closed_form_without_distortion():
    # Equidistant model: the angle from the optical axis equals the normalised image radius.
    f, c = 100., 64.
    px, py = np.meshgrid(np.arange(128), np.arange(128), indexing='xy')
    _, d, v, _, ip = cu.pixels_to_rays(px, py, cu.get_pixtocam(f, 2 * c, 2 * c), np.eye(4)[:3],
                                       camtype=PT.FISHEYE)
    xn, yn = (px + .5 - c) / f, (py + .5 - c) / f
    theta = np.hypot(xn, yn)
    np.testing.assert_allclose(np.arccos(-v[..., 2]), theta, atol=1e-9)
    np.testing.assert_allclose(np.arctan2(-v[..., 1], v[..., 0]), np.arctan2(yn, xn), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1., atol=1e-12)  # unit vectors for fisheye.
    # A ray through the principal point is finite (the reference gives NaN there).
    _, d0, _, _, _ = cu.pixels_to_rays(np.array([63.5]), np.array([63.5]), cu.get_pixtocam(f, 128, 128),
                                       np.eye(4)[:3], camtype=PT.FISHEYE)
    np.testing.assert_allclose(d0, [[0., 0., -1.]], atol=0)


def test_pano_closed_form():
    w, h = 16, 8
    px, py = np.meshgrid(np.arange(w), np.arange(h), indexing='xy')
    pose = np.concatenate([_rand_rotations(np.random.default_rng(3), 1)[0], np.zeros((3, 1))], -1)
    pixtocam = np.diag([2 * np.pi / w, np.pi / h, 1.])
    _, d, v, _, _ = cu.pixels_to_rays(px, py, pixtocam, pose, camtype=PT.PANO)
    lon, colat = 2 * np.pi * (px + .5) / w, np.pi * (py + .5) / h
    expected = np.stack([-np.sin(colat) * np.sin(lon), np.cos(colat), np.sin(colat) * np.cos(lon)], -1)
    np.testing.assert_allclose(d, expected @ pose[:, :3].T, atol=1e-12)
    assert PT('pano') is PT.PANO is PT.PANORAMIC


def test_ndc_rays_hit_the_same_points():
    rng = np.random.default_rng(4)
    f, w, h, near = 400., 500, 400, 1.
    pixtocam = cu.get_pixtocam(f, w, h)
    pose = np.concatenate([np.eye(3), [[.1], [-.2], [.3]]], -1)
    px, py = rng.integers(0, w, 300), rng.integers(0, h, 300)
    o, d, _, _, _ = cu.pixels_to_rays(px, py, pixtocam, pose)
    o_ndc, d_ndc, _, r_ndc, _ = cu.pixels_to_rays(px, py, pixtocam, pose, pixtocam_ndc=pixtocam)
    np.testing.assert_allclose(o_ndc[:, 2], -1., atol=1e-12)
    np.testing.assert_allclose(d_ndc[:, 2], 2., atol=1e-12)  # NDC depth runs from -1 (near) to 1 (infinity).
    # World points beyond the near plane map, by the NDC projection, onto the NDC rays.
    for t in [1., 2., 10., 1e4]:
        p = o + t * d
        ndc = np.stack([-f / (.5 * w) * p[:, 0] / p[:, 2], -f / (.5 * h) * p[:, 1] / p[:, 2],
                        1. + 2. * near / p[:, 2]], -1)
        s = (ndc[:, 2] - o_ndc[:, 2]) / d_ndc[:, 2]
        np.testing.assert_allclose(o_ndc + s[:, None] * d_ndc, ndc, atol=1e-9)
    # NDC radii: mean spacing of neighbouring NDC origins. The camera sits 1.3 behind the near plane z = -1, so
    # neighbouring rays meet it 1.3 / f apart, which NDC scales by 2 f / w (x) and 2 f / h (y).
    gap = near + pose[2, 3]
    np.testing.assert_allclose(r_ndc[:, 0], .5 * (2. / w + 2. / h) * gap * 2. / np.sqrt(12.), rtol=1e-9)


def test_convert_to_ndc_points_on_rays():
    rng = np.random.default_rng(5)
    f, w, h = 150., 180., 120.
    pixtocam = cu.get_pixtocam(f, w, h)
    o = np.array([0., 0., 1.]) + rng.uniform(-1, 1, (500, 3))
    d = np.array([0., 0., -1.]) + rng.uniform(-.5, .5, (500, 3))
    o_ndc, d_ndc = cu.convert_to_ndc(o, d, pixtocam, near=1.)
    t = np.linspace(0., 1., 10)[:, None, None]
    p = o + t * d
    ndc = np.stack([-f / (.5 * w) * p[..., 0] / p[..., 2], -f / (.5 * h) * p[..., 1] / p[..., 2],
                    1. + 2. / p[..., 2]], -1)
    unit = d_ndc / np.linalg.norm(d_ndc, axis=-1, keepdims=True)
    proj = o_ndc + unit * ((ndc - o_ndc) * unit).sum(-1, keepdims=True)
    np.testing.assert_allclose(ndc, proj, atol=1e-9)
    # The torch path gives the same numbers.
    o_t, d_t = cu.convert_to_ndc(torch.from_numpy(o), torch.from_numpy(d), torch.from_numpy(pixtocam))
    np.testing.assert_allclose(o_t.numpy(), o_ndc, atol=1e-12)
    np.testing.assert_allclose(d_t.numpy(), d_ndc, atol=1e-12)


@pytest.mark.parametrize('case', ['perspective', 'opencv', 'opencv_per_ray', 'fisheye', 'ndc', 'pano'])
def test_numpy_and_torch_agree(case):
    rng = np.random.default_rng(6)
    poses, K, idx, px, py = _ray_batch(rng)
    pixtocams, c2w = np.linalg.inv(K)[idx], poses[idx]
    kw = {}
    if case == 'opencv':
        kw = dict(distortion_params=dict(k1=-.1, k2=.02, k3=-.003, k4=.0005, p1=.002, p2=-.001))
    elif case == 'opencv_per_ray':
        kw = dict(distortion_params=dict(k1=rng.uniform(-.2, .2, idx.shape), p2=.001))
    elif case == 'fisheye':
        kw = dict(distortion_params=dict(k1=.05, k2=-.01, k3=.002, k4=-.0005), camtype=PT.FISHEYE)
    elif case == 'ndc':
        pixtocams, c2w = cu.get_pixtocam(400., 500, 400), np.concatenate([np.eye(3), np.ones((3, 1))], -1)
        kw = dict(pixtocam_ndc=pixtocams)
    elif case == 'pano':
        pixtocams = np.diag([2 * np.pi / 500, np.pi / 400, 1.])
        kw = dict(camtype=PT.PANO)
    ref = cu.pixels_to_rays(px, py, pixtocams, c2w, **kw)
    tkw = dict(kw)
    if 'distortion_params' in kw:
        tkw['distortion_params'] = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
                                    for k, v in kw['distortion_params'].items()}
    if 'pixtocam_ndc' in kw:
        tkw['pixtocam_ndc'] = torch.from_numpy(kw['pixtocam_ndc'])
    # Tensors in, torch inferred; also numpy cameras with xnp=torch.
    out_t = cu.pixels_to_rays(torch.from_numpy(px), torch.from_numpy(py), torch.from_numpy(pixtocams),
                              torch.from_numpy(c2w), **tkw)
    out_x = cu.pixels_to_rays(px, py, pixtocams, c2w, xnp=torch, **kw)
    for a, b, c in zip(ref, out_t, out_x):
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float64
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(b.numpy(), a, atol=1e-6, rtol=0)
        np.testing.assert_allclose(c.numpy(), a, atol=1e-6, rtol=0)
    # float32 tensors stay float32 and close to the float64 result.
    out_32 = cu.pixels_to_rays(torch.from_numpy(px), torch.from_numpy(py), torch.from_numpy(pixtocams).float(),
                               torch.from_numpy(c2w).float(), **tkw)
    for a, b in zip(ref, out_32):
        assert b.dtype == torch.float32
        np.testing.assert_allclose(b.numpy(), a, atol=2e-5, rtol=1e-5)


def _pixels(px, py, idx, module):
    col = lambda a: module.asarray(a)[..., None] if module is np else torch.as_tensor(a)[..., None]  # noqa
    n = len(px)
    return utils.Pixels(pix_x_int=module.asarray(px) if module is np else torch.as_tensor(px),
                        pix_y_int=module.asarray(py) if module is np else torch.as_tensor(py),
                        lossmult=col(np.ones(n)), near=col(np.full(n, .1)), far=col(np.full(n, 9.)),
                        cam_idx=col(idx), exposure_idx=None, exposure_values=None)


@pytest.mark.parametrize('module', [np, torch])
def test_cast_ray_batch_gathers_per_camera_parameters(module):
    rng = np.random.default_rng(7)
    poses, K, idx, px, py = _ray_batch(rng, n_cams=3, n_rays=200)
    k1 = np.array([-.1, 0., .08])
    cameras = (np.linalg.inv(K), poses, {'k1': k1, 'p1': .001}, None)
    rays = cu.cast_ray_batch(cameras, _pixels(px, py, idx, module), PT.PERSPECTIVE, xnp=module)
    for c in range(3):
        sel = idx == c
        expected = cu.pixels_to_rays(px[sel], py[sel], np.linalg.inv(K[c]), poses[c],
                                     distortion_params={'k1': k1[c], 'p1': .001})
        got = [rays.origins, rays.directions, rays.viewdirs, rays.radii, rays.imageplane]
        for e, g in zip(expected, got):
            g = g.numpy() if isinstance(g, torch.Tensor) else g
            np.testing.assert_allclose(g[sel], e, atol=1e-9)
    assert rays.far[0, 0] == 9. and rays.cam_idx.shape == (200, 1)


@pytest.mark.parametrize('case', ['opencv', 'fisheye', 'ndc', 'cast_ray_batch'])
def test_ray_casting_has_no_host_sync(case):
    rng = np.random.default_rng(16)
    poses, K, idx, px, py = _ray_batch(rng, n_cams=3, n_rays=64)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32) if a.dtype.kind == 'f' else torch.as_tensor(a)  # noqa
    pixtocams, c2w, tx, ty = t(np.linalg.inv(K)), t(poses), t(px), t(py)
    fish = dict(k1=t(np.array(.05)), k2=-.01, k3=.002, k4=-.0005)
    opencv = dict(k1=t(rng.uniform(-.1, .1, 64)), k2=.02, p1=t(np.array(.001)), p2=-.001)
    ndc_p = t(cu.get_pixtocam(400., 500, 400))
    args = {
        'opencv': (tx, ty, pixtocams[idx], c2w[idx], dict(distortion_params=opencv)),
        'fisheye': (tx, ty, pixtocams[0], c2w[0], dict(distortion_params=fish, camtype=PT.FISHEYE)),
        'ndc': (tx % 500, ty % 400, ndc_p, t(np.eye(4)[:3]), dict(pixtocam_ndc=ndc_p)),
    }
    if case == 'cast_ray_batch':
        cameras = (pixtocams, c2w, {'k1': t(np.array([-.1, 0., .08])), 'p1': .001}, None)
        pixels = _pixels(px, py, idx, torch)
        with no_host_sync():
            rays = cu.cast_ray_batch(cameras, pixels, PT.PERSPECTIVE, xnp=torch)
        out = (rays.origins, rays.directions, rays.viewdirs, rays.radii, rays.imageplane)
        ref = cu.cast_ray_batch((np.linalg.inv(K), poses, {'k1': np.array([-.1, 0., .08]), 'p1': .001}, None),
                                _pixels(px, py, idx, np), PT.PERSPECTIVE)
        ref = (ref.origins, ref.directions, ref.viewdirs, ref.radii, ref.imageplane)
    else:
        *pos, kw = args[case]
        with no_host_sync():
            out = cu.pixels_to_rays(*pos, **kw, xnp=torch)
        to_np = lambda a: a.double().numpy() if isinstance(a, torch.Tensor) else a  # noqa: E731
        ref = cu.pixels_to_rays(*map(to_np, pos), **utils.tree_map(to_np, kw))
    for a, b in zip(ref, out):
        assert b.dtype == torch.float32
        np.testing.assert_allclose(b.numpy(), a, atol=2e-5, rtol=1e-5)


def test_calls_with_placed_tensors_skip_the_conversion_with_the_same_values(monkeypatch):
    """Tensors on one device with one float dtype (the training / render case, and the functions' calls of each
    other) bypass the argument conversion (no `Signature.bind`) and give exactly what the converting path gives;
    a call that needs a cast (a float64 distortion parameter for float32 cameras) still gets it."""
    rng = np.random.default_rng(18)
    poses, K, idx, px, py = _ray_batch(rng, n_cams=3, n_rays=64)
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    pixtocams, c2w = f32(np.linalg.inv(K)), f32(poses)
    opencv = dict(k1=f32(rng.uniform(-.1, .1, 64)), k2=.02, p1=f32(.001), p2=-.001)
    binds = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, 'bind', lambda self, *a, **k: binds.append(1) or real_bind(self, *a, **k))

    def both(fn, *args, numpy_arg: int, **kwargs):
        """fn(*args) with tensors only, then with args[numpy_arg] as a numpy array; returns both and the binds."""
        binds.clear()
        fast = fn(*args, **kwargs)
        fast_binds = len(binds)
        args = list(args)
        args[numpy_arg] = args[numpy_arg].numpy()
        slow = fn(*args, **kwargs)
        return utils.tree_leaves(fast), utils.tree_leaves(slow), fast_binds, len(binds) - fast_binds

    tx, ty = torch.as_tensor(px), torch.as_tensor(py)
    cases = {
        'opencv': both(cu.pixels_to_rays, tx, ty, pixtocams[idx], c2w[idx], distortion_params=opencv, numpy_arg=0,
                       xnp=torch),
        'fisheye': both(cu.pixels_to_rays, tx, ty, pixtocams[0], c2w[0], numpy_arg=0, xnp=torch,
                        distortion_params=dict(k1=f32(.05), k2=-.01), camtype=PT.FISHEYE),
        'cast_ray_batch': both(lambda pixtocams, px: cu.cast_ray_batch(
            (pixtocams, c2w, {'k1': f32([-.1, 0., .08]), 'p1': .001}, None),
            dataclasses.replace(_pixels(px, py, idx, torch), pix_x_int=px), xnp=torch),
            pixtocams, tx, numpy_arg=1),
        'ndc': both(cu.convert_to_ndc, c2w[idx, :, 3], -f32(poses[idx, :, 2]), f32(cu.get_pixtocam(400., 500, 400)),
                    numpy_arg=0, xnp=torch),
    }
    for case, (fast, slow, fast_binds, slow_binds) in cases.items():
        assert fast_binds == 0 and slow_binds >= 1, (case, fast_binds, slow_binds)
        assert len(fast) == len(slow) >= 2
        for a, b in zip(fast, slow):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), case
    # A float64 parameter among float32 cameras is cast (the converting path), as before.
    binds.clear()
    mixed = cu.pixels_to_rays(tx, ty, pixtocams[idx], c2w[idx], distortion_params=dict(opencv, k2=torch.tensor(
        .02, dtype=torch.float64)), xnp=torch)
    assert binds and all(a.dtype == torch.float32 for a in mixed)
    for a, b in zip(mixed, cases['opencv'][0]):
        assert torch.equal(a, b)


def test_numpy_calls_return_numpy_in_the_input_precision():
    rng = np.random.default_rng(17)
    poses, K, idx, px, py = _ray_batch(rng, n_cams=3, n_rays=50)
    params = dict(k1=-.1, k2=.02, p1=.002)
    out64 = cu.pixels_to_rays(px, py, np.linalg.inv(K)[idx], poses[idx], distortion_params=params)
    out32 = cu.pixels_to_rays(px, py, np.linalg.inv(K)[idx].astype(np.float32), poses[idx].astype(np.float32),
                              distortion_params=params)
    for a, b in zip(out64, out32):
        assert type(a) is np.ndarray and a.dtype == np.float64
        assert type(b) is np.ndarray and b.dtype == np.float32
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)
    # Shared-camera origins come back as an array of their own, not a view of the caller's pose.
    pose = poses[0].copy()
    origins = cu.pixels_to_rays(px, py, np.linalg.inv(K[0]), pose)[0]
    origins += 1.
    np.testing.assert_array_equal(pose, poses[0])
    rays = cu.cast_ray_batch((np.linalg.inv(K), poses, None, None), _pixels(px, py, idx, np))
    assert all(type(leaf) is np.ndarray for leaf in utils.tree_leaves(rays))
    assert rays.cam_idx.dtype == np.int64 and rays.radii.dtype == np.float64
    grid_x, grid_y = cu.pixel_coordinates(4, 3)
    assert type(grid_x) is np.ndarray and grid_x.dtype == np.int64
    np.testing.assert_array_equal(grid_x, np.tile(np.arange(4), (3, 1)))
    np.testing.assert_array_equal(grid_y, np.tile(np.arange(3)[:, None], (1, 4)))
    np.testing.assert_allclose(cu.get_pixtocam(100., 60, 40) @ cu.intrinsic_matrix(100., 100., 30., 20.),
                               np.eye(3), atol=1e-15)
    assert 'xnp' in inspect.signature(cu.pixels_to_rays).parameters


def test_cast_pinhole_and_spherical_rays():
    pose = np.concatenate([_rand_rotations(np.random.default_rng(8), 1)[0], [[1.], [2.], [3.]]], -1)
    rays = cu.cast_pinhole_rays(pose, 6, 8, 10., .5, 5., xnp=np)
    px, py = cu.pixel_coordinates(8, 6)
    expected = cu.pixels_to_rays(px, py, cu.get_pixtocam(10., 8, 6), pose)
    np.testing.assert_allclose(rays.directions, expected[1], atol=0)
    np.testing.assert_allclose(rays.radii, expected[3], atol=0)
    assert rays.near.shape == (6, 8, 1) and np.all(rays.near == .5) and np.all(rays.far == 5.)
    rays_t = cu.cast_pinhole_rays(torch.from_numpy(pose), 6, 8, 10., .5, 5., xnp=torch)
    np.testing.assert_allclose(rays_t.directions.numpy(), expected[1], atol=1e-12)

    sph = cu.cast_spherical_rays(pose, 8, 16, .1, 10., xnp=np)
    np.testing.assert_allclose(np.linalg.norm(sph.directions, axis=-1), 1., atol=1e-12)
    # Top row points along the camera's +y; column 0 of the equator along the camera's +z.
    np.testing.assert_allclose(sph.directions[0, 3], pose[:, 1], atol=1e-12)
    np.testing.assert_allclose(sph.directions[4, 0], pose[:, 2], atol=1e-12)
    # Radii: the grid spacing 2 pi / 16 in longitude (times sin(colatitude)) and pi / 8 in colatitude.
    phi = np.pi * 4 / 8
    np.testing.assert_allclose(sph.radii[4, 0, 0], .5 * (2 * np.sin(np.pi / 16) * np.sin(phi) +
                                                        2 * np.sin(np.pi / 16)) * 2 / np.sqrt(12), rtol=1e-12)
    sph_t = cu.cast_spherical_rays(torch.from_numpy(pose), 8, 16, .1, 10., xnp=torch)
    np.testing.assert_allclose(sph_t.radii.numpy(), sph.radii, atol=1e-12)


# ---------------------------------------------------------------------------------------------- poses -----

def _ring_poses(rng, n=40, target=np.array([.3, -.2, .1])):
    th = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-.1, .1, n)
    pos = np.stack([3 * np.cos(th), 2 * np.sin(th), 1. + .3 * np.sin(2 * th)], -1) + rng.normal(size=(n, 3)) * .05
    return np.stack([cu.viewmatrix(p - target, np.array([0., 0., 1.]), p) for p in pos])


def _apply_similarity(poses, rot, scale, trans):
    out = poses.copy()
    out[:, :3, :3] = rot @ poses[:, :3, :3]
    out[:, :3, 3] = scale * poses[:, :3, 3] @ rot.T + trans
    return out


def test_transform_poses_pca():
    rng = np.random.default_rng(9)
    poses = _apply_similarity(_ring_poses(rng), _rand_rotations(rng, 1)[0], 2.5, rng.normal(size=3))
    new, transform = cu.transform_poses_pca(poses.copy())
    c = new[:, :3, 3]
    assert np.all(np.abs(c) <= 1. + 1e-12) and np.isclose(np.abs(c).max(), 1.)
    # Centred, with principal axes along x, y, z in decreasing order of variance.
    np.testing.assert_allclose(c.mean(0), 0., atol=1e-12)
    cov = c.T @ c
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0., atol=1e-10)
    assert cov[0, 0] >= cov[1, 1] >= cov[2, 2]
    assert new[:, 2, 1].mean() > 0  # Mean up vector points to +z.
    # The transform maps the input poses onto the output poses.
    mapped = transform @ cu.pad_poses(poses)
    scale = np.cbrt(np.linalg.det(transform[:3, :3]))
    np.testing.assert_allclose(mapped[:, :3, 3], c, atol=1e-12)
    np.testing.assert_allclose(mapped[:, :3, :3] / scale, new[:, :3, :3], atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(new[:, :3, :3]), 1., atol=1e-12)


def test_recenter_poses_average_is_identity():
    rng = np.random.default_rng(10)
    poses = _ring_poses(rng)[:10]  # An arc: the average pose is well defined.
    new, transform = cu.recenter_poses(poses)
    np.testing.assert_allclose(cu.average_pose(new), np.eye(4)[:3], atol=1e-12)
    np.testing.assert_allclose(cu.unpad_poses(transform @ cu.pad_poses(poses)), new, atol=1e-12)
    np.testing.assert_allclose(cu.pad_poses(new)[:, 3], np.broadcast_to([0., 0., 0., 1.], (10, 4)), atol=0)


def test_focus_point_and_viewmatrix():
    rng = np.random.default_rng(11)
    target = np.array([.3, -.2, .1])
    poses = _ring_poses(rng, target=target)
    np.testing.assert_allclose(cu.focus_point_fn(poses), target, atol=1e-10)  # All axes pass through it.
    m = cu.viewmatrix(np.array([1., 2., 3.]), np.array([0., 1., 0.]), np.array([4., 5., 6.]))
    np.testing.assert_allclose(m[:, :3].T @ m[:, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(m[:, 2], np.array([1., 2., 3.]) / np.sqrt(14.), atol=1e-12)
    np.testing.assert_allclose(m[:, 3], [4., 5., 6.], atol=0)


@pytest.mark.parametrize('z_variation', [0., .5])
def test_generate_ellipse_path(z_variation):
    rng = np.random.default_rng(12)
    poses, _ = cu.transform_poses_pca(_ring_poses(rng))
    path = cu.generate_ellipse_path(poses, n_frames=90, const_speed=True, z_variation=z_variation, z_phase=.25)
    assert path.shape == (90, 3, 4)
    pos = path[:, :3, 3]
    steps = np.linalg.norm(np.diff(np.concatenate([pos, pos[:1]]), axis=0), axis=-1)
    uneven = cu.generate_ellipse_path(poses, n_frames=90, const_speed=False, z_variation=z_variation,
                                      z_phase=.25)[:, :3, 3]
    uneven_steps = np.linalg.norm(np.diff(np.concatenate([uneven, uneven[:1]]), axis=0), axis=-1)
    assert steps.std() / steps.mean() < .03
    assert steps.std() / steps.mean() < .3 * uneven_steps.std() / uneven_steps.mean()
    # Every frame looks at the focus point (camera -z towards it), with world +z as up, and stays orthonormal.
    center = cu.focus_point_fn(poses)
    to_center = center - pos
    to_center /= np.linalg.norm(to_center, axis=-1, keepdims=True)
    np.testing.assert_allclose(-path[:, :, 2], to_center, atol=1e-12)
    np.testing.assert_allclose(path[:, :, 0] @ np.array([0., 0., 1.]), 0., atol=1e-12)
    np.testing.assert_allclose(np.einsum('nji,njk->nik', path[:, :, :3], path[:, :, :3]),
                               np.broadcast_to(np.eye(3), (90, 3, 3)), atol=1e-12)
    if z_variation == 0.:
        np.testing.assert_allclose(pos[:, 2], 0., atol=0)
    else:
        assert np.ptp(pos[:, 2]) > .05
    # The x-y path is an ellipse centred on the focus point.
    xy = pos[:, :2] - center[:2]
    a, b = np.abs(xy[:, 0]).max(), np.abs(xy[:, 1]).max()
    np.testing.assert_allclose((xy[:, 0] / a) ** 2 + (xy[:, 1] / b) ** 2, 1., atol=1e-3)


def test_generate_spiral_path():
    rng = np.random.default_rng(13)
    poses = np.concatenate([np.broadcast_to(np.eye(3), (20, 3, 3)), rng.normal(size=(20, 3, 1)) * .1], -1)
    bounds = rng.uniform(2., 20., (20, 2))
    path = cu.generate_spiral_path(poses, bounds, n_frames=37, n_rots=2, zrate=.5)
    assert path.shape == (37, 3, 4)
    # All frames look at the focus point in front of the average pose.
    focal = 1. / (.25 / (bounds.min() * cu.NEAR_STRETCH) + .75 / (bounds.max() * cu.FAR_STRETCH))
    lookat = cu.average_pose(poses) @ np.array([0., 0., -focal, 1.])
    to_look = lookat - path[:, :, 3]
    to_look /= np.linalg.norm(to_look, axis=-1, keepdims=True)
    np.testing.assert_allclose(-path[:, :, 2], to_look, atol=1e-12)


def test_generate_interpolated_path_straight_line():
    # Equally spaced keyframes along a line with one orientation: the spline is that line.
    n, n_interp = 6, 4
    rot = _rand_rotations(np.random.default_rng(14), 1)[0]
    centres = np.linspace(0., 1., n)[:, None] * np.array([1., 2., -1.])
    poses = np.concatenate([np.broadcast_to(rot, (n, 3, 3)), centres[..., None]], -1)
    path = cu.generate_interpolated_path(poses, n_interp, spline_degree=5, smoothness=0.)
    assert path.shape == (n_interp * (n - 1), 3, 4)
    np.testing.assert_allclose(path[:, :3, :3], np.broadcast_to(rot, path[:, :3, :3].shape), atol=1e-9)
    u = np.linspace(0., 1., n_interp * (n - 1), endpoint=False)
    np.testing.assert_allclose(path[:, :3, 3], u[:, None] * np.array([1., 2., -1.]), atol=1e-9)


def test_create_render_spline_path(tmp_path):
    n = 10
    names = [f'img_{i:03d}.png' for i in range(n)]
    poses = np.concatenate([np.broadcast_to(np.eye(3), (n, 3, 3)),
                            np.linspace(0., 1., n)[:, None, None] * np.ones((n, 3, 1))], -1)
    keyfile = tmp_path / 'keys.txt'
    # Exposure interpolation uses a degree-5 spline (as the reference), so it needs at least 6 keyframes.
    keyfile.write_text('\n'.join(names[1:8]) + '\nunknown.png\n')
    config = dataclasses.replace(configs.Config(), render_spline_keyframes=str(keyfile), render_spline_n_interp=3,
                                 render_spline_smoothness=0., render_spline_interpolate_exposure=True)
    exposures = np.exp(np.linspace(0., 1., n))
    idx, render_poses, render_exp = cu.create_render_spline_path(config, names, poses, exposures)
    np.testing.assert_array_equal(idx, np.arange(1, 8))
    assert render_poses.shape == (18, 3, 4) and render_exp.shape == (18,)
    np.testing.assert_allclose(render_poses[0], poses[1], atol=1e-9)
    np.testing.assert_allclose(render_poses[9], poses[4], atol=1e-9)
    # Log exposures are linear in the frame index, which the smoothing spline reproduces exactly.
    np.testing.assert_allclose(render_exp, np.exp(np.linspace(1., 7., 18, endpoint=False) / (n - 1)), rtol=1e-6)
    keydir = tmp_path / 'keys'
    keydir.mkdir()
    for nm in ['img_001.png', 'img_009.png']:
        (keydir / nm).write_bytes(b'')
    config = dataclasses.replace(config, render_spline_keyframes=str(keydir),
                                 render_spline_interpolate_exposure=False)
    idx, render_poses, render_exp = cu.create_render_spline_path(config, names, poses, None)
    np.testing.assert_array_equal(idx, [1, 9])
    assert render_exp is None and render_poses.shape == (3, 3, 4)
    config = dataclasses.replace(config, render_spline_interpolate_exposure=True)
    with pytest.raises(configs.ConfigError, match='render_spline_interpolate_exposure = True needs per-image '
                       'exposures'):
        cu.create_render_spline_path(config, names, poses, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_pixels_to_rays_on_cuda():
    rng = np.random.default_rng(15)
    poses, K, idx, px, py = _ray_batch(rng)
    kw = dict(distortion_params=dict(k1=-.1, k2=.02, p1=.001))
    ref = cu.pixels_to_rays(px, py, np.linalg.inv(K)[idx], poses[idx], **kw)
    dev = torch.device('cuda')
    out = cu.pixels_to_rays(torch.from_numpy(px).to(dev), torch.from_numpy(py).to(dev),
                            torch.from_numpy(np.linalg.inv(K)[idx]).to(dev), torch.from_numpy(poses[idx]).to(dev),
                            **kw)
    for a, b in zip(ref, out):
        assert b.device.type == 'cuda'
        np.testing.assert_allclose(b.cpu().numpy(), a, atol=1e-9)
