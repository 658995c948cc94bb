"""A small analytic "360" scene, ray-traced with numpy, written out as real datasets.

The scene (world z is up): three procedurally textured spheres and a checkered box stand on a textured ground
plane, all inside a large textured background sphere, lit by one directional light (Lambertian shading plus
ambient). Every colour is a smooth function of the 3D hit point, so any camera can be rendered exactly and a
NeRF fitted to the images has a well-defined answer.

Cameras are OpenGL camera-to-world `[3, 4]` matrices (x right, y up, z backward), intrinsics are inverse
intrinsic matrices `pixtocam` `[3, 3]` (OpenCV pixel convention, pixel centres at integer + 0.5).

Writers:
  `write_colmap_scene`: the mip-NeRF 360 dataset layout (`images/`, `images_N/`, `sparse/0/` COLMAP text model).
  `write_blender_scene`: the NeRF-synthetic layout (`transforms_{train,val,test}.json` and RGBA PNGs).
  `write_llff_scene`: LLFF forward-facing layout with `poses_bounds.npy` only (no COLMAP model).
  `write_nerfpp_scene`: Tanks and Temples as processed by NeRF++ (`{split}/{pose,intrinsics,rgb}/`).
  `write_fvs_scene`: Tanks and Temples as processed by Free View Synthesis (`dense/ibr3d_pw_*/`, Ks/Rs/ts.npy).
  `write_dtu_scene`: DTU (`Rectified/<scan>/rect_XXX_{light}_r5000.png` + `cal18/pos_XXX.txt`).
CLI: `python -m mipnerf360.synthetic OUT --format colmap|blender|llff|nerfpp|fvs|dtu
[--n_views 24 --width 64 --height 48]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------------------
# Scene description.

LOOKAT = np.array([0., 0., 0.4])  # Point the camera rings look at.
BACKGROUND_RADIUS = 12.  # Radius of the enclosing background sphere (centred at the origin).
LIGHT_DIR = np.array([0.45, -0.35, 0.82]) / np.linalg.norm([0.45, -0.35, 0.82])
AMBIENT = 0.35

# Spheres: centre (3), radius, texture id.
SPHERES = (
    (np.array([0.0, 0.0, 0.6]), 0.6, 0),
    (np.array([0.95, 0.45, 0.35]), 0.35, 1),
    (np.array([-0.6, 0.85, 0.3]), 0.3, 2),
)
# Axis-aligned box: lower and upper corners.
BOX = (np.array([-0.95, -0.95, 0.0]), np.array([-0.35, -0.35, 0.55]))

_NOISE_RNG = np.random.default_rng(1234)  # Fixed: the scene never changes.
# Random plane waves used for smooth "noise" textures: directions [K, 3], frequencies [K], phases [K].
_WAVE_DIRS = _NOISE_RNG.normal(size=(12, 3))
_WAVE_DIRS /= np.linalg.norm(_WAVE_DIRS, axis=-1, keepdims=True)
_WAVE_FREQ = np.geomspace(3., 24., 12)
_WAVE_PHASE = _NOISE_RNG.uniform(0, 2 * np.pi, size=(3, 12))


def _wave_noise(p: np.ndarray, scale: float = 1.) -> np.ndarray:
    """Smooth band-limited noise `[..., 3]` in [0, 1] (one channel per colour) at points `p` `[..., 3]`."""
    proj = (p @ _WAVE_DIRS.T) * (_WAVE_FREQ * scale)  # [..., K]
    amp = 1. / np.sqrt(np.arange(1, 13))
    out = np.stack([(np.sin(proj + ph) * amp).sum(-1) for ph in _WAVE_PHASE], -1) / amp.sum()
    return 0.5 + 1.2 * out


def _cell_colour(p: np.ndarray, size: float, salt: float = 0.) -> np.ndarray:
    """Pseudo-random colour `[..., 3]` in [0, 1], constant on each cube of side `size` of a 3D grid."""
    cell = np.floor(p / size)
    out = []
    for k in range(3):
        h = np.sin(cell @ np.array([12.9898, 78.233, 37.719]) + 17.13 * k + salt) * 43758.5453
        out.append(h - np.floor(h))
    return np.stack(out, -1)


def _checker(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """1 on "white" squares, 0 on "black" squares, `[...]`."""
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)


def _albedo_sphere(p: np.ndarray, tex: int) -> np.ndarray:
    """Albedo `[..., 3]` of sphere `tex` at points `p` `[..., 3]`."""
    n = _wave_noise(p, 1.5)
    if tex == 0:  # Latitude/longitude stripes modulated by noise.
        c = SPHERES[0][0]
        q = p - c
        lon = np.arctan2(q[..., 1], q[..., 0])
        stripes = 0.5 + 0.5 * np.sin(8 * lon)[..., None]
        base = np.array([0.85, 0.3, 0.2]) * stripes + np.array([0.2, 0.35, 0.9]) * (1 - stripes)
        return 0.45 * base + 0.25 * n + 0.3 * _cell_colour(p, 0.1)
    if tex == 1:
        return np.array([0.25, 0.8, 0.3]) * (0.3 + 0.3 * n + 0.4 * _cell_colour(p, 0.08, 1.))
    return np.array([0.95, 0.8, 0.2]) * (0.25 + 0.35 * n[..., ::-1] + 0.4 * _cell_colour(p, 0.07, 2.))


def _albedo_box(p: np.ndarray) -> np.ndarray:
    chk = _checker(p[..., 0] + p[..., 2], p[..., 1] - p[..., 2], 0.12)[..., None]
    return (0.15 + 0.75 * chk) * np.array([0.9, 0.5, 0.9]) * (0.4 + 0.3 * _wave_noise(p, 2.)
                                                              + 0.3 * _cell_colour(p, 0.06, 3.))


def _albedo_ground(p: np.ndarray) -> np.ndarray:
    flat = p * np.array([1., 1., 0.])
    chk = _checker(p[..., 0], p[..., 1], 0.5)[..., None]
    base = np.array([0.75, 0.7, 0.6]) * (0.55 + 0.45 * chk)
    return base * (0.3 + 0.3 * _wave_noise(flat, 1.) + 0.4 * _cell_colour(flat, 0.125, 4.))


def _background(d: np.ndarray) -> np.ndarray:
    """Emitted colour `[..., 3]` of the background sphere in unit directions `d` `[..., 3]`."""
    sky = np.array([0.45, 0.65, 0.95]) * (0.55 + 0.45 * np.clip(d[..., 2:3], 0, 1))
    return np.clip(0.5 * sky + 0.2 * _wave_noise(d * 2.5, 1.) + 0.3 * _cell_colour(d, 0.08, 5.), 0, 1)


def _intersect_sphere(o, d, c, r):
    """Smallest positive t with |o + t d - c| = r, inf where missed. o, d `[n, 3]` -> `[n]`."""
    oc = o - c
    a = (d * d).sum(-1)
    b = (oc * d).sum(-1)
    cc = (oc * oc).sum(-1) - r * r
    disc = b * b - a * cc
    sq = np.sqrt(np.maximum(disc, 0.))
    t0 = (-b - sq) / a
    t1 = (-b + sq) / a
    t = np.where(t0 > 1e-9, t0, np.where(t1 > 1e-9, t1, np.inf))
    return np.where(disc >= 0, t, np.inf)


def _intersect_box(o, d, lo, hi):
    """Entry distance and outward normal of rays `[n, 3]` hitting an axis-aligned box (inf where missed)."""
    with np.errstate(divide='ignore', invalid='ignore'):
        inv = 1. / d
        ta = (lo - o) * inv
        tb = (hi - o) * inv
    tmin = np.minimum(ta, tb)
    tmax = np.maximum(ta, tb)
    tmin = np.nan_to_num(tmin, nan=-np.inf)
    tmax = np.nan_to_num(tmax, nan=np.inf)
    t_enter = tmin.max(-1)
    t_exit = tmax.min(-1)
    hit = (t_exit >= t_enter) & (t_enter > 1e-9)
    axis = tmin.argmax(-1)
    normal = np.zeros_like(o)
    normal[np.arange(len(o)), axis] = -np.sign(d[np.arange(len(o)), axis])
    return np.where(hit, t_enter, np.inf), normal


def trace(origins: np.ndarray, directions: np.ndarray, ground: bool = True,
          background: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-traces the scene.

    Args:
        origins, directions: `[n, 3]` rays (directions need not be normalised).
        ground / background: include the ground plane / background sphere (False for object-only renders).
    Returns:
        rgb `[n, 3]` in [0, 1], alpha `[n]` (1 where a sphere, the box or the ground was hit), t `[n]` hit
        distance along `directions` (inf where nothing was hit).
    """
    o = np.asarray(origins, np.float64)
    d = np.asarray(directions, np.float64)
    n = o.shape[0]
    best_t = np.full(n, np.inf)
    kind = np.full(n, -1)  # -1 nothing, 0..2 spheres, 3 box, 4 ground, 5 background.
    box_normal = np.zeros((n, 3))
    for i, (c, r, _) in enumerate(SPHERES):
        t = _intersect_sphere(o, d, c, r)
        upd = t < best_t
        best_t[upd], kind[upd] = t[upd], i
    t, nrm = _intersect_box(o, d, *BOX)
    upd = t < best_t
    best_t[upd], kind[upd] = t[upd], 3
    box_normal[upd] = nrm[upd]
    if ground:
        with np.errstate(divide='ignore', invalid='ignore'):
            t = -o[:, 2] / d[:, 2]
        t = np.where((t > 1e-9) & np.isfinite(t), t, np.inf)
        hit_p = o + np.where(np.isfinite(t), t, 0.)[:, None] * d
        t = np.where((hit_p ** 2).sum(-1) < BACKGROUND_RADIUS ** 2, t, np.inf)
        upd = t < best_t
        best_t[upd], kind[upd] = t[upd], 4
    rgb = np.zeros((n, 3))
    if background:
        t = _intersect_sphere(o, d, np.zeros(3), BACKGROUND_RADIUS)
        upd = (t < best_t)
        best_t[upd], kind[upd] = t[upd], 5
        m = kind == 5
        p = o[m] + best_t[m, None] * d[m]
        rgb[m] = _background(p / BACKGROUND_RADIUS)
    p = o + np.where(np.isfinite(best_t), best_t, 0.)[:, None] * d
    for i, (c, r, tex) in enumerate(SPHERES):
        m = kind == i
        if m.any():
            normal = (p[m] - c) / r
            rgb[m] = _albedo_sphere(p[m], tex) * _shade(normal)
    m = kind == 3
    if m.any():
        rgb[m] = _albedo_box(p[m]) * _shade(box_normal[m])
    m = kind == 4
    if m.any():
        rgb[m] = _albedo_ground(p[m]) * _shade(np.broadcast_to(np.array([0., 0., 1.]), p[m].shape))
    alpha = ((kind >= 0) & (kind <= 4)).astype(np.float64)
    return np.clip(rgb, 0., 1.), alpha, best_t


def _shade(normal: np.ndarray) -> np.ndarray:
    """Lambertian shading factor `[..., 1]` for unit normals `[..., 3]`."""
    return (AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT_DIR, 0., 1.))[..., None]


# ---------------------------------------------------------------------------------------------------------------
# Cameras.


def intrinsics(focal: float, width: int, height: int, cx: Optional[float] = None,
               cy: Optional[float] = None, fy: Optional[float] = None) -> np.ndarray:
    """Intrinsic matrix K `[3, 3]` (principal point at the image centre unless given)."""
    cx = width / 2. if cx is None else cx
    cy = height / 2. if cy is None else cy
    fy = focal if fy is None else fy
    return np.array([[focal, 0., cx], [0., fy, cy], [0., 0., 1.]])


def look_at(position: np.ndarray, target: np.ndarray = LOOKAT,
            up: np.ndarray = np.array([0., 0., 1.])) -> np.ndarray:
    """OpenGL camera-to-world `[3, 4]` at `position` looking at `target` (camera -z points at it)."""
    back = position - target
    back = back / np.linalg.norm(back)
    right = np.cross(up, back)
    right = right / np.linalg.norm(right)
    cam_up = np.cross(back, right)
    return np.stack([right, cam_up, back, position], axis=1)


def ring_poses(n_views: int, radius: float = 3.0, height: float = 1.2, height_variation: float = 0.25,
               seed: int = 0, jitter: float = 0.0, target: np.ndarray = LOOKAT) -> np.ndarray:
    """`[n_views, 3, 4]` OpenGL camera-to-worlds on a (wavy) ring around the scene, all looking at `target`."""
    rng = np.random.default_rng(seed)
    theta = np.linspace(0., 2 * np.pi, n_views, endpoint=False) + rng.uniform(-jitter, jitter, n_views)
    z = height + height_variation * np.sin(2 * theta + seed)
    pos = np.stack([radius * np.cos(theta), radius * np.sin(theta), z], -1)
    return np.stack([look_at(p, target) for p in pos])


def distort(x: np.ndarray, y: np.ndarray, k1: float = 0., k2: float = 0., k3: float = 0., k4: float = 0.,
            p1: float = 0., p2: float = 0.) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV radial-tangential distortion of normalised camera coordinates (COLMAP's OPENCV model)."""
    r2 = x * x + y * y
    radial = 1. + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
    xd = x * radial + 2. * p1 * x * y + p2 * (r2 + 2. * x * x)
    yd = y * radial + p1 * (r2 + 2. * y * y) + 2. * p2 * x * y
    return xd, yd


def undistort(xd: np.ndarray, yd: np.ndarray, iters: int = 30, **params) -> Tuple[np.ndarray, np.ndarray]:
    """Inverts `distort` by Newton's method with a numerical Jacobian (independent of camera_utils)."""
    x, y = xd.copy(), yd.copy()
    h = 1e-7
    for _ in range(iters):
        fx, fy = distort(x, y, **params)
        fx, fy = fx - xd, fy - yd
        ax, ay = distort(x + h, y, **params)
        bx, by = distort(x, y + h, **params)
        j00, j10 = (ax - xd - fx) / h, (ay - yd - fy) / h
        j01, j11 = (bx - xd - fx) / h, (by - yd - fy) / h
        det = j00 * j11 - j01 * j10
        x = x - (j11 * fx - j01 * fy) / det
        y = y - (-j10 * fx + j00 * fy) / det
    return x, y


def pixel_rays(camtoworld: np.ndarray, pixtocam: np.ndarray, px: np.ndarray, py: np.ndarray,
               distortion: Optional[Dict[str, float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """World-space rays through continuous pixel positions `px, py` `[n]` (pixel centre = integer + 0.5).

    Returns origins `[n, 3]` and directions `[n, 3]` with unit camera-space depth (the dataset convention).
    """
    uv1 = np.stack([px, py, np.ones_like(px)], -1) @ np.asarray(pixtocam, np.float64).T
    x, y = uv1[:, 0] / uv1[:, 2], uv1[:, 1] / uv1[:, 2]
    if distortion:
        x, y = undistort(x, y, **distortion)
    cam_dirs = np.stack([x, -y, -np.ones_like(x)], -1)  # OpenCV -> OpenGL.
    c2w = np.asarray(camtoworld, np.float64)
    dirs = cam_dirs @ c2w[:3, :3].T
    origins = np.broadcast_to(c2w[:3, 3], dirs.shape)
    return origins, dirs


def project(points: np.ndarray, camtoworld: np.ndarray, pixtocam: np.ndarray,
            distortion: Optional[Dict[str, float]] = None) -> np.ndarray:
    """Pixel coordinates `[n, 2]` (continuous, pixel centres at +0.5) of world points `[n, 3]`."""
    c2w = np.asarray(camtoworld, np.float64)
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]  # OpenGL camera coordinates.
    x, y = cam[:, 0] / -cam[:, 2], -cam[:, 1] / -cam[:, 2]
    if distortion:
        x, y = distort(x, y, **distortion)
    K = np.linalg.inv(np.asarray(pixtocam, np.float64))
    uv = np.stack([x, y, np.ones_like(x)], -1) @ K.T
    return uv[:, :2]


def render_view(camtoworld: np.ndarray, pixtocam: np.ndarray, width: int, height: int,
                supersample: int = 2, distortion: Optional[Dict[str, float]] = None,
                ground: bool = True, background: bool = True, return_alpha: bool = False, is_K: bool = False):
    """Renders one view.

    Args:
        camtoworld: `[3, 4]` OpenGL camera-to-world.
        pixtocam: `[3, 3]` inverse intrinsics (or the intrinsic matrix K itself when `is_K`).
        width, height: image size in pixels.
        supersample: s x s stratified sub-pixel samples per pixel, averaged (anti-aliasing).
        distortion: optional OpenCV distortion dict (k1, k2, k3, k4, p1, p2): the image is rendered distorted.
        ground, background: include the ground plane / background sphere.
        return_alpha: also return the coverage `[H, W]`.
    Returns:
        rgb `[H, W, 3]` float64 in [0, 1] (and alpha `[H, W]`).
    """
    pixtocam = np.asarray(pixtocam, np.float64)
    if is_K:
        pixtocam = np.linalg.inv(pixtocam)
    s = max(int(supersample), 1)
    offs = (np.arange(s) + 0.5) / s
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    ox, oy = np.meshgrid(offs, offs, indexing='xy')
    px = (xx[..., None] + ox.reshape(-1)).reshape(-1)
    py = (yy[..., None] + oy.reshape(-1)).reshape(-1)
    o, d = pixel_rays(camtoworld, pixtocam, px, py, distortion)
    rgb, alpha, _ = trace(o, d, ground=ground, background=background)
    rgb = rgb.reshape(height, width, s * s, 3).mean(2)
    alpha = alpha.reshape(height, width, s * s).mean(2)
    if return_alpha:
        return rgb, alpha
    return rgb


# ---------------------------------------------------------------------------------------------------------------
# Writers.


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0., 1.) * 255.).round().astype(np.uint8)


def downsampled_size(width: int, height: int, factor: int) -> Tuple[int, int]:
    """Size of the `images_{factor}` copy: rounded half up, as in the official mip-NeRF 360 folders."""
    return int(np.floor(width / factor + 0.5)), int(np.floor(height / factor + 0.5))


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) with w >= 0 of a rotation matrix `[3, 3]` (COLMAP's convention)."""
    R = np.asarray(R, np.float64)
    # Eigenvector of the symmetric 4x4 matrix K with the largest eigenvalue (robust for every rotation).
    Rxx, Ryx, Rzx, Rxy, Ryy, Rzy, Rxz, Ryz, Rzz = R.reshape(-1)
    K = np.array([
        [Rxx - Ryy - Rzz, 0, 0, 0],
        [Ryx + Rxy, Ryy - Rxx - Rzz, 0, 0],
        [Rzx + Rxz, Rzy + Ryz, Rzz - Rxx - Ryy, 0],
        [Ryz - Rzy, Rzx - Rxz, Rxy - Ryx, Rxx + Ryy + Rzz]]) / 3.0
    vals, vecs = np.linalg.eigh(K)
    q = vecs[[3, 0, 1, 2], np.argmax(vals)]
    return -q if q[0] < 0 else q


def qvec_to_rotmat(q: np.ndarray) -> np.ndarray:
    """Rotation matrix `[3, 3]` of a quaternion (w, x, y, z)."""
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def camtoworld_to_colmap(camtoworld: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """COLMAP world-to-camera (qvec `[4]`, tvec `[3]`) of an OpenGL camera-to-world `[3, 4]`."""
    c2w_cv = np.asarray(camtoworld, np.float64)[:3, :4] @ np.diag([1., -1., -1., 1.])
    R = c2w_cv[:, :3].T
    t = -R @ c2w_cv[:, 3]
    return rotmat_to_qvec(R), t


@dataclasses.dataclass
class SceneInfo:
    """Ground truth of a written scene (in the writer's order, i.e. sorted by image name)."""
    names: List[str]
    camtoworlds: np.ndarray  # [N, 3, 4] OpenGL.
    pixtocams: np.ndarray  # [N, 3, 3] at full resolution.
    sizes: List[Tuple[int, int]]  # (width, height) per image at full resolution.
    camera_ids: List[int]
    image_ids: List[int]
    distortion: Optional[Dict[str, float]] = None
    camera_model: str = 'PINHOLE'


def write_colmap_scene(out_dir: str, n_views: int = 24, width: int = 64, height: int = 48,
                       factors: Sequence[int] = (2, 4), seed: int = 0, camera_model: str = 'PINHOLE',
                       distortion: Optional[Dict[str, float]] = None, multi_camera: bool = False,
                       focal: Optional[float] = None, supersample: int = 2, write_points: bool = True,
                       image_ext: str = 'png', radius: float = 3.0) -> SceneInfo:
    """Writes a mip-NeRF 360 style scene: `images/`, `images_{f}/` for f in `factors`, `sparse/0/*.txt`.

    Args:
        camera_model: 'PINHOLE', 'SIMPLE_PINHOLE', 'SIMPLE_RADIAL', 'RADIAL' or 'OPENCV' (the image is rendered
            with the matching distortion; `distortion` gives its coefficients, defaults mild barrel).
        multi_camera: every odd image comes from a second camera with another size and focal length (and no
            distortion: its coefficients are written as zeros).
        seed: jitters the camera ring and shuffles the COLMAP image ids (so that name order != id order).
    Returns:
        SceneInfo with the ground-truth poses and intrinsics, in sorted-name order.
    """
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, 'images')
    sparse = os.path.join(out_dir, 'sparse', '0')
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(sparse, exist_ok=True)
    for f in factors:
        os.makedirs(os.path.join(out_dir, f'images_{f}'), exist_ok=True)
    focal = 0.9 * width if focal is None else focal
    if camera_model in ('PINHOLE', 'SIMPLE_PINHOLE'):
        distortion = None
    elif distortion is None:
        distortion = {'SIMPLE_RADIAL': {'k1': -0.04}, 'RADIAL': {'k1': -0.04, 'k2': 0.01},
                      'OPENCV': {'k1': -0.04, 'k2': 0.01, 'p1': 0.002, 'p2': -0.001}}[camera_model]
    cams = {1: (width, height, intrinsics(focal, width, height, cx=width / 2. + 0.3, cy=height / 2. - 0.2))}
    if camera_model in ('SIMPLE_PINHOLE', 'SIMPLE_RADIAL', 'RADIAL'):
        cams[1] = (width, height, intrinsics(focal, width, height))
    elif camera_model == 'PINHOLE':
        K = cams[1][2].copy()
        K[1, 1] = focal * 1.01
        cams[1] = (width, height, K)
    if multi_camera:
        w2, h2 = width + 8 * max(factors, default=1), height - 2 * max(factors, default=1)
        cams[2] = (w2, h2, intrinsics(0.8 * w2, w2, h2))
    poses = ring_poses(n_views, radius=radius, seed=seed, jitter=0.5 * np.pi / n_views)
    names = [f'img_{i:03d}.{image_ext}' for i in range(n_views)]
    image_ids = list(rng.permutation(n_views) + 1)
    camera_ids = [2 if (multi_camera and i % 2) else 1 for i in range(n_views)]
    pixtocams, sizes = [], []
    for i in range(n_views):
        w, h, K = cams[camera_ids[i]]
        dist_i = distortion if camera_ids[i] == 1 else None  # The second camera is never distorted.
        rgb = render_view(poses[i], np.linalg.inv(K), w, h, supersample=supersample, distortion=dist_i)
        u8 = _to_u8(rgb)
        Image.fromarray(u8).save(os.path.join(img_dir, names[i]))
        for f in factors:
            small = Image.fromarray(u8).resize(downsampled_size(w, h, f), Image.BOX)
            small.save(os.path.join(out_dir, f'images_{f}', names[i]))
        pixtocams.append(np.linalg.inv(K))
        sizes.append((w, h))

    with open(os.path.join(sparse, 'cameras.txt'), 'w') as fp:
        fp.write('# Camera list with one line of data per camera:\n')
        fp.write('#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n')
        for cid, (w, h, K) in cams.items():
            d = (distortion or {}) if cid == 1 else {}
            fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
            params = {'SIMPLE_PINHOLE': [fx, cx, cy], 'PINHOLE': [fx, fy, cx, cy],
                      'SIMPLE_RADIAL': [fx, cx, cy, d.get('k1', 0.)],
                      'RADIAL': [fx, cx, cy, d.get('k1', 0.), d.get('k2', 0.)],
                      'OPENCV': [fx, fy, cx, cy, d.get('k1', 0.), d.get('k2', 0.), d.get('p1', 0.),
                                 d.get('p2', 0.)]}[camera_model]
            fp.write(f'{cid} {camera_model} {w} {h} ' + ' '.join(repr(float(p)) for p in params) + '\n')
    # Image lines in id order; 3D points: the scene's sphere centres' tops, unobserved (empty tracks are legal).
    order = np.argsort(image_ids)
    with open(os.path.join(sparse, 'images.txt'), 'w') as fp:
        fp.write('# Image list with two lines of data per image:\n')
        fp.write('#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n')
        fp.write('#   POINTS2D[] as (X, Y, POINT3D_ID)\n')
        for i in order:
            q, t = camtoworld_to_colmap(poses[i])
            vals = ' '.join(repr(float(v)) for v in list(q) + list(t))
            fp.write(f'{image_ids[i]} {vals} {camera_ids[i]} {names[i]}\n\n')
    with open(os.path.join(sparse, 'points3D.txt'), 'w') as fp:
        fp.write('# 3D point list with one line of data per point:\n')
        fp.write('#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n')
        if write_points:
            for j, (c, r, _) in enumerate(SPHERES):
                p = c + np.array([0., 0., r])
                fp.write(f'{j + 1} {float(p[0])!r} {float(p[1])!r} {float(p[2])!r} 128 128 128 0.0\n')
    return SceneInfo(names=names, camtoworlds=poses, pixtocams=np.stack(pixtocams), sizes=sizes,
                     camera_ids=camera_ids, image_ids=image_ids, distortion=distortion,
                     camera_model=camera_model)


def write_blender_scene(out_dir: str, n_train: int = 16, n_val: int = 4, n_test: int = 8, width: int = 64,
                        height: int = 64, camera_angle_x: float = 0.6911112070083618, radius: float = 4.0,
                        seed: int = 0, supersample: int = 2) -> Dict[str, Dict]:
    """Writes a NeRF-synthetic style scene (objects only, transparent background, RGBA PNGs).

    Cameras sit on the upper hemisphere at distance `radius` from the origin, looking at it. Returns the
    written json dicts by split (frames' `transform_matrix` are 4x4 OpenGL camera-to-worlds).
    """
    rng = np.random.default_rng(seed)
    focal = 0.5 * width / np.tan(0.5 * camera_angle_x)
    pixtocam = np.linalg.inv(intrinsics(focal, width, height))
    out = {}
    for split, n in (('train', n_train), ('val', n_val), ('test', n_test)):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        theta = rng.uniform(0, 2 * np.pi, n)
        elev = rng.uniform(0.15, 1.2, n)
        pos = radius * np.stack([np.cos(elev) * np.cos(theta), np.cos(elev) * np.sin(theta), np.sin(elev)], -1)
        frames = []
        for i in range(n):
            c2w = look_at(pos[i], target=np.zeros(3))
            rgb, alpha = render_view(c2w, pixtocam, width, height, supersample=supersample, ground=False,
                                     background=False, return_alpha=True)
            rgba = np.concatenate([rgb, alpha[..., None]], -1)
            fname = f'{split}/r_{i}'
            Image.fromarray(_to_u8(rgba), 'RGBA').save(os.path.join(out_dir, fname + '.png'))
            frames.append({'file_path': './' + fname, 'rotation': 0.0,
                           'transform_matrix': np.concatenate([c2w, [[0, 0, 0, 1.]]]).tolist()})
        meta = {'camera_angle_x': camera_angle_x, 'frames': frames}
        with open(os.path.join(out_dir, f'transforms_{split}.json'), 'w') as fp:
            json.dump(meta, fp, indent=2)
        out[split] = meta
    return out


def camtoworld_to_opencv_w2c(camtoworld: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV world-to-camera rotation `[3, 3]` and translation `[3]` (x_cam = R x_world + t) of an OpenGL
    camera-to-world `[3, 4]`."""
    c2w_cv = np.asarray(camtoworld, np.float64)[:3, :4] @ np.diag([1., -1., -1., 1.])
    R = c2w_cv[:, :3].T
    return R, -R @ c2w_cv[:, 3]


def arc_poses(n_views: int, radius: float = 3.0, height: float = 1.2, arc: float = 2.2, seed: int = 0,
              target: np.ndarray = LOOKAT) -> np.ndarray:
    """`[n_views, 3, 4]` OpenGL cameras on a wavy arc of `arc` radians in front of the scene (one-sided
    captures such as DTU), all looking at `target`."""
    rng = np.random.default_rng(seed)
    theta = -0.5 * np.pi + np.linspace(-0.5 * arc, 0.5 * arc, n_views) + rng.uniform(-0.05, 0.05, n_views)
    z = height + 0.3 * np.sin(3 * theta + seed)
    pos = np.stack([radius * np.cos(theta), radius * np.sin(theta), z], -1)
    return np.stack([look_at(p, target) for p in pos])


def forward_facing_poses(n_views: int, distance: float = 3.2, spread: float = 0.5, seed: int = 0,
                         target: np.ndarray = LOOKAT) -> np.ndarray:
    """`[n_views, 3, 4]` OpenGL cameras on a jittered grid in a plane facing the scene (LLFF-style captures),
    all looking at `target` from the -y side."""
    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(n_views)))
    k = np.arange(n_views)
    u = (k % cols) / max(cols - 1, 1) - 0.5
    v = (k // cols) / max((n_views - 1) // cols, 1) - 0.5
    pos = np.stack([spread * u + rng.uniform(-.03, .03, n_views), np.full(n_views, -distance),
                    0.9 + 0.6 * spread * v + rng.uniform(-.03, .03, n_views)], -1)
    return np.stack([look_at(p, target) for p in pos])


def depth_bounds(camtoworld: np.ndarray, pixtocam: np.ndarray, width: int, height: int,
                 percentiles: Tuple[float, float] = (0.1, 99.9)) -> np.ndarray:
    """[near, far] `[2]`: percentiles of the camera-space depth of the surfaces seen at the pixel centres."""
    yy, xx = np.meshgrid(np.arange(height) + .5, np.arange(width) + .5, indexing='ij')
    o, d = pixel_rays(camtoworld, pixtocam, xx.reshape(-1), yy.reshape(-1))
    _, _, t = trace(o, d)  # Unit-depth directions: t is the depth.
    return np.percentile(t[np.isfinite(t)], percentiles)


def _save_rgb(img: np.ndarray, path: str):
    im = Image.fromarray(_to_u8(img))
    if path.lower().endswith(('.jpg', '.jpeg')):
        im.save(path, quality=95)
    else:
        im.save(path)


def write_nerfpp_scene(out_dir: str, n_train: int = 6, n_test: int = 2, n_path: int = 5, width: int = 32,
                       height: int = 24, seed: int = 0, supersample: int = 1) -> Dict[str, SceneInfo]:
    """Writes Tanks and Temples as processed by NeRF++: `{train,test,camera_path}/{pose,intrinsics,rgb}/`.

    Poses are 4x4 OpenCV camera-to-worlds and intrinsics 4x4 matrices (K in the top-left block), one text file
    per image; `camera_path` holds poses and intrinsics only. Every camera has its own focal length and
    principal point. Returns the truth by split (names without extension, in sorted order).
    """
    rng = np.random.default_rng(seed)
    n_all = n_train + n_test + n_path
    poses = ring_poses(n_all, seed=seed, jitter=0.3 * np.pi / n_all)[rng.permutation(n_all)]
    out = {}
    start = 0
    for split, n in (('train', n_train), ('test', n_test), ('camera_path', n_path)):
        subs = ('pose', 'intrinsics') + (('rgb',) if split != 'camera_path' else ())
        for sub in subs:
            os.makedirs(os.path.join(out_dir, split, sub), exist_ok=True)
        names, pixtocams = [], []
        for i in range(n):
            c2w = poses[start + i]
            K = intrinsics(width * rng.uniform(0.8, 1.0), width, height, cx=width / 2 + rng.uniform(-1, 1),
                           cy=height / 2 + rng.uniform(-1, 1))
            name = f'{split}_{i:04d}'
            c2w_cv = np.concatenate([c2w @ np.diag([1., -1., -1., 1.]), [[0., 0., 0., 1.]]])
            np.savetxt(os.path.join(out_dir, split, 'pose', name + '.txt'), c2w_cv.reshape(1, 16))
            K4 = np.eye(4)
            K4[:3, :3] = K
            np.savetxt(os.path.join(out_dir, split, 'intrinsics', name + '.txt'), K4.reshape(1, 16))
            if 'rgb' in subs:
                _save_rgb(render_view(c2w, np.linalg.inv(K), width, height, supersample=supersample),
                          os.path.join(out_dir, split, 'rgb', name + '.png'))
            names.append(name)
            pixtocams.append(np.linalg.inv(K))
        out[split] = SceneInfo(names=names, camtoworlds=poses[start:start + n], pixtocams=np.stack(pixtocams),
                               sizes=[(width, height)] * n, camera_ids=list(range(1, n + 1)),
                               image_ids=list(range(1, n + 1)))
        start += n
    return out


def write_fvs_scene(out_dir: str, n_views: int = 10, width: int = 32, height: int = 24,
                    scales: Sequence[float] = (0.25, 0.5), seed: int = 0, image_ext: str = 'png',
                    supersample: int = 1) -> Dict[str, SceneInfo]:
    """Writes Tanks and Temples as processed by Free View Synthesis: `dense/ibr3d_pw_{scale:.2f}/` holding
    `im_{i:08d}.{png,jpg}`, `Ks.npy` `[N, 3, 3]`, `Rs.npy` `[N, 3, 3]` and `ts.npy` `[N, 3]` (OpenCV
    world-to-camera, x_cam = R x + t).

    `width, height` is the image size at the largest scale; a scale s folder has images of (about)
    `width * s / max(scales)` pixels, with intrinsics to match. Returns the truth by folder name.
    """
    rng = np.random.default_rng(seed)
    poses = ring_poses(n_views, seed=seed, jitter=0.4 * np.pi / n_views)
    base_focal = 0.85 * width * rng.uniform(0.95, 1.05, n_views)
    out = {}
    for s in scales:
        r = s / max(scales)
        w, h = int(round(width * r)), int(round(height * r))
        folder = f'ibr3d_pw_{s:.2f}'
        d = os.path.join(out_dir, 'dense', folder)
        os.makedirs(d, exist_ok=True)
        Ks, Rs, ts, names = [], [], [], []
        for i in range(n_views):
            K = intrinsics(base_focal[i] * w / width, w, h, cx=w / 2 + 0.25 * (i % 3), cy=h / 2 - 0.2)
            name = f'im_{i:08d}.{image_ext}'
            _save_rgb(render_view(poses[i], np.linalg.inv(K), w, h, supersample=supersample),
                      os.path.join(d, name))
            R, t = camtoworld_to_opencv_w2c(poses[i])
            Ks.append(K)
            Rs.append(R)
            ts.append(t)
            names.append(name)
        np.save(os.path.join(d, 'Ks.npy'), np.stack(Ks))
        np.save(os.path.join(d, 'Rs.npy'), np.stack(Rs))
        np.save(os.path.join(d, 'ts.npy'), np.stack(ts))
        out[folder] = SceneInfo(names=names, camtoworlds=poses, pixtocams=np.linalg.inv(np.stack(Ks)),
                                sizes=[(w, h)] * n_views, camera_ids=list(range(1, n_views + 1)),
                                image_ids=list(range(1, n_views + 1)))
    return out


DTU_LIGHTS = tuple(range(7))  # Lighting conditions 0..6 (plus 'max').


def dtu_light_gain(light: Union[int, str]) -> float:
    """Brightness multiplier of the synthetic DTU images of a lighting condition (0..6 or 'max')."""
    return 1. if light == 'max' else 0.55 + 0.06 * int(light)


def write_dtu_scene(out_dir: str, scan: str = 'scan1', n_views: int = 10, width: int = 32, height: int = 24,
                    seed: int = 0, supersample: int = 1, projection_scale: float = 3.7) -> Tuple[str, SceneInfo]:
    """Writes a DTU-style scan as the reference's loader expects it.

    Layout: `out_dir/Rectified/<scan>/rect_{i:03d}_{light}_r5000.png` (`_r7000` for i >= 50) for light
    0..6 and `rect_{i:03d}_max.png` (i = 1..n_views), and `out_dir/cal18/pos_{i:03d}.txt` with the 3x4
    projection matrix P = c K [R | t] (OpenCV world-to-camera, times an arbitrary scale c, as in the real
    files). Each lighting condition is the same rendering times `dtu_light_gain(light)`.
    Returns the scan folder (the loader's data_dir) and the truth (names are the light-3 files).
    """
    rng = np.random.default_rng(seed)
    scan_dir = os.path.join(out_dir, 'Rectified', scan)
    cal_dir = os.path.join(out_dir, 'cal18')
    os.makedirs(scan_dir, exist_ok=True)
    os.makedirs(cal_dir, exist_ok=True)
    poses = arc_poses(n_views, seed=seed)
    pixtocams, names = [], []
    for k in range(n_views):
        i = k + 1
        K = intrinsics(width * rng.uniform(0.95, 1.1), width, height, cx=width / 2 + rng.uniform(-1, 1),
                       cy=height / 2 + rng.uniform(-1, 1), fy=None)
        rgb = render_view(poses[k], np.linalg.inv(K), width, height, supersample=supersample)
        rr = '5000' if i < 50 else '7000'
        for light in DTU_LIGHTS + ('max',):
            suffix = 'max' if light == 'max' else f'{light}_r{rr}'
            _save_rgb(rgb * dtu_light_gain(light), os.path.join(scan_dir, f'rect_{i:03d}_{suffix}.png'))
        R, t = camtoworld_to_opencv_w2c(poses[k])
        P = projection_scale * K @ np.concatenate([R, t[:, None]], 1)
        np.savetxt(os.path.join(cal_dir, f'pos_{i:03d}.txt'), P)
        pixtocams.append(np.linalg.inv(K))
        names.append(f'rect_{i:03d}_3_r{rr}.png')
    return scan_dir, SceneInfo(names=names, camtoworlds=poses, pixtocams=np.stack(pixtocams),
                               sizes=[(width, height)] * n_views, camera_ids=list(range(1, n_views + 1)),
                               image_ids=list(range(1, n_views + 1)))


def camtoworld_to_llff(camtoworld: np.ndarray, height: int, width: int, focal: float) -> np.ndarray:
    """LLFF's `[3, 5]` pose of an OpenGL camera-to-world `[3, 4]`: columns (down, right, back, centre, hwf).

    LLFF's imgs2poses builds it from the OpenCV camera-to-world (right, down, forward) by swapping the first
    two axes and negating the third.
    """
    c2w_cv = np.asarray(camtoworld, np.float64)[:3, :4] @ np.diag([1., -1., -1., 1.])
    right, down, fwd, centre = c2w_cv.T
    return np.stack([down, right, -fwd, centre, np.array([height, width, focal], np.float64)], axis=1)


def write_llff_scene(out_dir: str, n_views: int = 12, width: int = 48, height: int = 32,
                     factors: Sequence[int] = (2, 4), seed: int = 0, supersample: int = 1,
                     image_ext: str = 'png') -> Tuple[SceneInfo, np.ndarray]:
    """Writes an LLFF forward-facing scene with poses in `poses_bounds.npy` only (no COLMAP model).

    `poses_bounds.npy` is `[N, 17]`: each row the flattened `camtoworld_to_llff` `[3, 5]` matrix followed by
    the near and far depth bounds of the view (`depth_bounds`). Images go to `images/` and `images_{f}/`
    (names sorted as the rows). One shared focal length, principal point at the image centre (the format
    stores nothing else). Returns the truth and the bounds `[N, 2]`.
    """
    os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
    for f in factors:
        os.makedirs(os.path.join(out_dir, f'images_{f}'), exist_ok=True)
    poses = forward_facing_poses(n_views, seed=seed)
    focal = 1.1 * width
    K = intrinsics(focal, width, height)
    rows, bounds, names = [], [], []
    for i in range(n_views):
        name = f'view_{i:03d}.{image_ext}'
        rgb = render_view(poses[i], np.linalg.inv(K), width, height, supersample=supersample)
        u8 = _to_u8(rgb)
        Image.fromarray(u8).save(os.path.join(out_dir, 'images', name))
        for f in factors:
            Image.fromarray(u8).resize(downsampled_size(width, height, f), Image.BOX).save(
                    os.path.join(out_dir, f'images_{f}', name))
        b = depth_bounds(poses[i], np.linalg.inv(K), width, height)
        rows.append(np.concatenate([camtoworld_to_llff(poses[i], height, width, focal).reshape(-1), b]))
        bounds.append(b)
        names.append(name)
    np.save(os.path.join(out_dir, 'poses_bounds.npy'), np.stack(rows))
    info = SceneInfo(names=names, camtoworlds=poses, pixtocams=np.repeat(np.linalg.inv(K)[None], n_views, 0),
                     sizes=[(width, height)] * n_views, camera_ids=[1] * n_views,
                     image_ids=list(range(1, n_views + 1)))
    return info, np.stack(bounds)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description='Write a small ray-traced synthetic scene.')
    parser.add_argument('out_dir')
    parser.add_argument('--format', choices=['colmap', 'blender', 'llff', 'nerfpp', 'fvs', 'dtu'],
                        default='colmap')
    parser.add_argument('--n_views', type=int, default=24, help='views (colmap) / training views (blender)')
    parser.add_argument('--width', type=int, default=64)
    parser.add_argument('--height', type=int, default=48)
    parser.add_argument('--factors', type=int, nargs='*', default=[2, 4])
    parser.add_argument('--camera_model', default='PINHOLE')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--supersample', type=int, default=2)
    args = parser.parse_args(argv)
    if args.format == 'colmap':
        write_colmap_scene(args.out_dir, n_views=args.n_views, width=args.width, height=args.height,
                           factors=args.factors, seed=args.seed, camera_model=args.camera_model,
                           supersample=args.supersample)
    elif args.format == 'blender':
        write_blender_scene(args.out_dir, n_train=args.n_views, width=args.width, height=args.height,
                            seed=args.seed, supersample=args.supersample)
    elif args.format == 'llff':
        write_llff_scene(args.out_dir, n_views=args.n_views, width=args.width, height=args.height,
                         factors=args.factors, seed=args.seed, supersample=args.supersample)
    elif args.format == 'nerfpp':
        n_test = max(args.n_views // 8, 1)
        write_nerfpp_scene(args.out_dir, n_train=args.n_views - n_test, n_test=n_test, width=args.width,
                           height=args.height, seed=args.seed, supersample=args.supersample)
    elif args.format == 'fvs':
        write_fvs_scene(args.out_dir, n_views=args.n_views, width=args.width, height=args.height,
                        seed=args.seed, supersample=args.supersample)
    else:
        write_dtu_scene(args.out_dir, n_views=args.n_views, width=args.width, height=args.height,
                        seed=args.seed, supersample=args.supersample)
    print(f'Wrote a {args.format} scene to {args.out_dir}')


if __name__ == '__main__':
    main()
