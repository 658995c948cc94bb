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
Scenes for the methods past mip-NeRF 360 (each returns its ground truth):
  `write_shiny_blender_scene` (Ref-NeRF): mirror / glossy objects reflecting an environment map, normal maps.
  `write_raw_scene` (RawNeRF): linear HDR renders as Bayer DNGs with exiftool JSON, several exposures.
  `write_distractor_scene` (RobustNeRF): COLMAP scene with transient distractors in some training views.
  `write_appearance_scene` (GLO): COLMAP scene with per-view exposure and white balance.
CLI: `python -m mipnerf360.synthetic OUT --format colmap|blender|llff|nerfpp|fvs|dtu|shiny_blender|raw|
distractors|appearance [--n_views 24 --width 64 --height 48]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from mipnerf360 import utils

# ---------------------------------------------------------------------------------------------------------------
# Scene description.

class SyntheticSceneError(ValueError):
    """Scene parameters that a generator cannot write (the message names the parameter and the fix)."""


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


def _nearest_sphere_or_box(o: np.ndarray, d: np.ndarray, spheres, box
                           ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays `[n, 3]` with `spheres` ((centre, radius, colour), ...) and the `box`: t `[n]` (inf
    where missed), object index `[n]` (-1 none, i a sphere, len(spheres) the box) and the box's outward normal
    `[n, 3]` where the box is the nearest hit (zero elsewhere)."""
    best_t, kind, box_normal = np.full(len(o), np.inf), np.full(len(o), -1), np.zeros((len(o), 3))
    for i, (c, r, _) in enumerate(spheres):
        t = _intersect_sphere(o, d, c, r)
        upd = t < best_t
        best_t[upd], kind[upd] = t[upd], i
    t, normal = _intersect_box(o, d, *box)
    upd = t < best_t
    best_t[upd], kind[upd] = t[upd], len(spheres)
    box_normal[upd] = normal[upd]
    return best_t, kind, box_normal


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
    # kind: -1 nothing, 0..2 spheres, 3 box, 4 ground, 5 background.
    best_t, kind, box_normal = _nearest_sphere_or_box(o, d, SPHERES, BOX)
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


def subpixel_rays(camtoworld: np.ndarray, pixtocam: np.ndarray, width: int, height: int, supersample: int = 1,
                  distortion: Optional[Dict[str, float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Rays `[H * W * s * s, 3]` through an s x s grid of sub-pixel positions of every pixel (row-major pixels,
    then sub-samples; s = 1 gives the pixel centres)."""
    s = max(int(supersample), 1)
    offs = (np.arange(s) + 0.5) / s
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    ox, oy = np.meshgrid(offs, offs, indexing='xy')
    px = (xx[..., None] + ox.reshape(-1)).reshape(-1)
    py = (yy[..., None] + oy.reshape(-1)).reshape(-1)
    return pixel_rays(camtoworld, pixtocam, px, py, distortion)


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
    o, d = subpixel_rays(camtoworld, pixtocam, width, height, s, distortion)
    rgb, alpha, _ = trace(o, d, ground=ground, background=background)
    rgb = rgb.reshape(height, width, s * s, 3).mean(2)
    alpha = alpha.reshape(height, width, s * s).mean(2)
    if return_alpha:
        return rgb, alpha
    return rgb


# ---------------------------------------------------------------------------------------------------------------
# Writers.


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
                       image_ext: str = 'png', radius: float = 3.0,
                       render_fn: Optional[Callable[..., np.ndarray]] = None) -> SceneInfo:
    """Writes a mip-NeRF 360 style scene: `images/`, `images_{f}/` for f in `factors`, `sparse/0/*.txt`.

    Args:
        camera_model: 'PINHOLE', 'SIMPLE_PINHOLE', 'SIMPLE_RADIAL', 'RADIAL' or 'OPENCV' (the image is rendered
            with the matching distortion; `distortion` gives its coefficients, defaults mild barrel).
        multi_camera: every odd image comes from a second camera with another size and focal length (and no
            distortion: its coefficients are written as zeros).
        seed: jitters the camera ring and shuffles the COLMAP image ids (so that name order != id order).
        render_fn: `render_fn(i, camtoworld, pixtocam, width, height, distortion) -> rgb [H, W, 3]` in [0, 1]
            renders image i instead of `render_view` (the scene variants below use it).
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
        if render_fn is None:
            rgb = render_view(poses[i], np.linalg.inv(K), w, h, supersample=supersample, distortion=dist_i)
        else:
            rgb = render_fn(i, poses[i], np.linalg.inv(K), w, h, dist_i)
        u8 = utils.to_uint8(rgb)
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
    def render_rgba(split, i, c2w, pixtocam, fprefix):
        rgb, alpha = render_view(c2w, pixtocam, width, height, supersample=supersample, ground=False,
                                 background=False, return_alpha=True)
        return np.concatenate([rgb, alpha[..., None]], -1)

    return _write_blender_splits(out_dir, {'train': n_train, 'val': n_val, 'test': n_test}, width, height,
                                 camera_angle_x, radius, seed, render_rgba)


def _write_blender_splits(out_dir: str, split_sizes: Dict[str, int], width: int, height: int,
                          camera_angle_x: float, radius: float, seed: int,
                          render_rgba: Callable[..., np.ndarray]) -> Dict[str, Dict]:
    """The NeRF-synthetic layout: per split, cameras on the upper hemisphere looking at the origin, the RGBA
    PNGs `render_rgba(split, i, camtoworld, pixtocam, fprefix) -> [H, W, 4]` (it may write more files next to
    `fprefix`, the frame's path without extension) and `transforms_{split}.json`. Returns the json dicts."""
    rng = np.random.default_rng(seed)
    focal = 0.5 * width / np.tan(0.5 * camera_angle_x)
    pixtocam = np.linalg.inv(intrinsics(focal, width, height))
    out = {}
    for split, n in split_sizes.items():
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        theta = rng.uniform(0, 2 * np.pi, n)
        elev = rng.uniform(0.15, 1.2, n)
        pos = radius * np.stack([np.cos(elev) * np.cos(theta), np.cos(elev) * np.sin(theta), np.sin(elev)], -1)
        frames = []
        for i in range(n):
            c2w = look_at(pos[i], target=np.zeros(3))
            fname = f'{split}/r_{i}'
            rgba = render_rgba(split, i, c2w, pixtocam, os.path.join(out_dir, fname))
            Image.fromarray(utils.to_uint8(rgba), 'RGBA').save(os.path.join(out_dir, fname + '.png'))
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
    im = Image.fromarray(utils.to_uint8(img))
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
    names = []
    for i in range(n_views):
        name = f'view_{i:03d}.{image_ext}'
        rgb = render_view(poses[i], np.linalg.inv(K), width, height, supersample=supersample)
        u8 = utils.to_uint8(rgb)
        Image.fromarray(u8).save(os.path.join(out_dir, 'images', name))
        for f in factors:
            Image.fromarray(u8).resize(downsampled_size(width, height, f), Image.BOX).save(
                    os.path.join(out_dir, f'images_{f}', name))
        names.append(name)
    bounds = _write_poses_bounds(out_dir, poses, focal, width, height)
    info = SceneInfo(names=names, camtoworlds=poses, pixtocams=np.repeat(np.linalg.inv(K)[None], n_views, 0),
                     sizes=[(width, height)] * n_views, camera_ids=[1] * n_views,
                     image_ids=list(range(1, n_views + 1)))
    return info, bounds


def _write_poses_bounds(out_dir: str, poses: np.ndarray, focal: float, width: int, height: int) -> np.ndarray:
    """Writes `poses_bounds.npy` (rows: flattened `camtoworld_to_llff` `[3, 5]`, then `depth_bounds`) for
    cameras with a shared focal length and centred principal point. Returns the bounds `[N, 2]`."""
    pixtocam = np.linalg.inv(intrinsics(focal, width, height))
    bounds = np.stack([depth_bounds(c2w, pixtocam, width, height) for c2w in poses])
    rows = [np.concatenate([camtoworld_to_llff(c2w, height, width, focal).reshape(-1), b])
            for c2w, b in zip(poses, bounds)]
    np.save(os.path.join(out_dir, 'poses_bounds.npy'), np.stack(rows))
    return bounds


# ---------------------------------------------------------------------------------------------------------------
# Scenes for the methods past mip-NeRF 360: Ref-NeRF (shiny objects), RawNeRF (raw HDR captures), RobustNeRF
# (transient distractors) and GLO (per-view appearance).

# Shiny objects (Ref-NeRF): centre, radius, material. Mirror: tinted perfect reflection. Glossy: diffuse plus
# a Schlick-Fresnel weighted reflection. The pedestal box is glossy too. Everything reflects the others (up to
# `SHINY_BOUNCES` bounces) and the environment map `_background`.
SHINY_SPHERES = (
    (np.array([-0.5, -0.15, 0.05]), 0.55, 'mirror'),
    (np.array([0.6, 0.3, -0.05]), 0.45, 'glossy'),
)
SHINY_BOX = (np.array([-1.2, -0.9, -0.8]), np.array([1.2, 0.9, -0.5]))
SHINY_BOUNCES = 2
MIRROR_TINT = np.array([0.92, 0.92, 0.95])
GLOSSY_ALBEDO = np.array([0.75, 0.18, 0.12])


def _shiny_hits(o: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays `[n, 3]` with the shiny objects: t `[n]` (inf where missed), object index `[n]`
    (-1 none, i < len(SHINY_SPHERES) a sphere, len(SHINY_SPHERES) the box) and unit outward normals `[n, 3]`."""
    best_t, kind, normal = _nearest_sphere_or_box(o, d, SHINY_SPHERES, SHINY_BOX)
    p = o + np.where(np.isfinite(best_t), best_t, 0.)[:, None] * d
    for i, (c, r, _) in enumerate(SHINY_SPHERES):
        m = kind == i
        normal[m] = (p[m] - c) / r
    normal[kind < 0] = 0.
    return best_t, kind, normal


def trace_shiny(origins: np.ndarray, directions: np.ndarray, bounces: int = SHINY_BOUNCES,
                environment: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-traces the shiny scene (objects only).

    Returns rgb `[n, 3]` in [0, 1], alpha `[n]` (1 on an object) and the unit world-space surface normal
    `[n, 3]` at the hit (zero where missed). Rays that miss see black, or the environment map when
    `environment` (reflected rays).
    """
    o = np.asarray(origins, np.float64)
    d = np.asarray(directions, np.float64)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    t, kind, normal = _shiny_hits(o, d)
    hit = kind >= 0
    rgb = np.zeros((len(o), 3))
    if environment:
        rgb[~hit] = _background(d[~hit])
    if not hit.any():
        return rgb, hit.astype(np.float64), normal
    p, n, dh = o[hit] + t[hit, None] * d[hit], normal[hit], d[hit]
    cos = np.clip(-(dh * n).sum(-1, keepdims=True), 0., 1.)
    refl_dir = dh + 2. * cos * n
    if bounces > 0:
        refl = trace_shiny(p + 1e-7 * n, refl_dir, bounces - 1, environment=True)[0]
    else:
        refl = _background(refl_dir)
    fresnel = 0.15 + 0.85 * (1. - cos) ** 5
    k = kind[hit]
    out = np.zeros_like(p)
    m = k == 0
    out[m] = MIRROR_TINT * refl[m]
    m = k == 1
    out[m] = (1. - fresnel[m]) * GLOSSY_ALBEDO * _shade(n[m]) + fresnel[m] * refl[m]
    m = k == len(SHINY_SPHERES)
    out[m] = 0.7 * _albedo_box(p[m]) * _shade(n[m]) + 0.25 * refl[m]
    rgb[hit] = np.clip(out, 0., 1.)
    return rgb, hit.astype(np.float64), normal


def normals_to_png(normals: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGBA `[H, W, 4]` of unit normals `[H, W, 3]` as the shiny-Blender normal maps store them:
    rgb = (n + 1) / 2, alpha = `mask`. The loaders decode rgb * 2 / 255 - 1."""
    rgba = np.concatenate([(normals + 1.) / 2., mask[..., None].astype(np.float64)], -1)
    return utils.to_uint8(rgba)


@dataclasses.dataclass
class ShinySceneInfo:
    """Ground truth of `write_shiny_blender_scene`."""
    meta: Dict[str, Dict]  # The transforms_{split}.json contents by split.
    normals: np.ndarray  # [N_test, H, W, 3] unit world-space normals at the test pixel centres (0 off objects).
    normal_masks: np.ndarray  # [N_test, H, W] bool: the pixel centre's ray hits an object.


def write_shiny_blender_scene(out_dir: str, n_train: int = 16, n_val: int = 2, n_test: int = 4,
                              width: int = 48, height: int = 48, camera_angle_x: float = 0.6911112070083618,
                              radius: float = 4.0, seed: int = 0, supersample: int = 2) -> ShinySceneInfo:
    """Writes Ref-NeRF's shiny-Blender layout: a mirror sphere, a glossy sphere and a glossy pedestal box
    reflecting each other and an analytic environment map, on a transparent background.

    As the NeRF-synthetic layout (`transforms_{split}.json`, RGBA PNGs `{split}/r_{i}.png`, colour not
    premultiplied), plus for every view the normal map `{split}/r_{i}_normal.png` that the Blender loader reads
    with `Config.compute_normal_metrics` (RGBA; see `normals_to_png`), rendered at the pixel centres; the
    returned ground truth holds the test views' normals.
    """
    normals, masks = [], []

    def render_rgba(split, i, c2w, pixtocam, fprefix):
        s = max(int(supersample), 1)
        rgb, alpha, _ = trace_shiny(*subpixel_rays(c2w, pixtocam, width, height, s))
        rgb = rgb.reshape(height, width, s * s, 3).mean(2)
        alpha = alpha.reshape(height, width, s * s).mean(2)
        rgb = np.where(alpha[..., None] > 0, rgb / np.maximum(alpha, 1e-12)[..., None], 0.)
        # Every split has normal maps (as the real dataset): the loader reads them for whichever split it loads.
        _, hit, normal = trace_shiny(*subpixel_rays(c2w, pixtocam, width, height, 1), bounces=0)
        normal, hit = normal.reshape(height, width, 3), hit.reshape(height, width) > 0
        Image.fromarray(normals_to_png(normal, hit), 'RGBA').save(fprefix + '_normal.png')
        if split == 'test':
            normals.append(normal)
            masks.append(hit)
        return np.concatenate([rgb, alpha[..., None]], -1)

    meta = _write_blender_splits(out_dir, {'train': n_train, 'val': n_val, 'test': n_test}, width, height,
                                 camera_angle_x, radius, seed, render_rgba)
    return ShinySceneInfo(meta=meta, normals=np.stack(normals).reshape(-1, height, width, 3),
                          normal_masks=np.stack(masks).reshape(-1, height, width))


# Raw (RawNeRF): the sky is this many times brighter than its sRGB-decoded texture, so that the scene's dynamic
# range exceeds one exposure.
RAW_SKY_GAIN = 6.


def render_hdr_view(camtoworld: np.ndarray, pixtocam: np.ndarray, width: int, height: int,
                    supersample: int = 1) -> np.ndarray:
    """Linear HDR radiance `[H, W, 3]` of the scene: the sRGB-decoded render, the background times
    `RAW_SKY_GAIN` (values above 1 where the sky is bright)."""
    rgb, alpha = render_view(camtoworld, pixtocam, width, height, supersample=supersample, return_alpha=True)
    return _srgb_to_linear(rgb) * (alpha + RAW_SKY_GAIN * (1. - alpha))[..., None]


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    from mipnerf360 import image as lib_image  # pylint: disable=import-outside-toplevel
    return np.asarray(lib_image.srgb_to_linear(np.asarray(x, np.float64), xnp=np))


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    from mipnerf360 import image as lib_image  # pylint: disable=import-outside-toplevel
    return np.asarray(lib_image.linear_to_srgb(np.clip(np.asarray(x, np.float64), 0., 1.), xnp=np))


def bayer_mosaic(rgb: np.ndarray) -> np.ndarray:
    """RGGB mosaic `[H, W]` of an image `[H, W, 3]`: red at (even x, even y), blue at (odd, odd), else green
    (the pattern of `raw_utils.pixels_to_bayer_mask`)."""
    h, w = rgb.shape[:2]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    channel = np.where((xx % 2 == 0) & (yy % 2 == 0), 0, np.where((xx % 2 == 1) & (yy % 2 == 1), 2, 1))
    return np.take_along_axis(rgb, channel[..., None], -1)[..., 0]


def _write_dng(path: str, mosaic: np.ndarray, black_level: int, white_level: int):
    """Writes a uint16 RGGB mosaic `[H, W]` as an uncompressed DNG (needs the optional `pidng` package)."""
    try:
        from pidng.core import RAW2DNG, DNGTags, Tag  # pylint: disable=import-outside-toplevel
        from pidng import defs  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError('Writing DNG files needs the optional `pidng` package: pip install "mipnerf360[raw]"'
                          ) from e
    h, w = mosaic.shape
    tags = DNGTags()
    for tag, value in ((Tag.ImageWidth, w), (Tag.ImageLength, h), (Tag.TileWidth, w), (Tag.TileLength, h),
                       (Tag.Orientation, defs.Orientation.Horizontal),
                       (Tag.PhotometricInterpretation, defs.PhotometricInterpretation.Color_Filter_Array),
                       (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, 16), (Tag.CFARepeatPatternDim, [2, 2]),
                       (Tag.CFAPattern, defs.CFAPattern.RGGB), (Tag.BlackLevel, int(black_level)),
                       (Tag.WhiteLevel, int(white_level)), (Tag.DNGVersion, defs.DNGVersion.V1_4),
                       (Tag.DNGBackwardVersion, defs.DNGVersion.V1_2), (Tag.Make, 'mipnerf360'),
                       (Tag.Model, 'synthetic')):
        tags.set(tag, value)
    writer = RAW2DNG()
    writer.options(tags, path='', compress=False)
    writer.convert(np.ascontiguousarray(mosaic, np.uint16), filename=os.path.splitext(path)[0])


@dataclasses.dataclass
class RawSceneInfo:
    """Ground truth of `write_raw_scene`."""
    info: SceneInfo
    bounds: np.ndarray  # [N, 2] near/far of poses_bounds.npy.
    radiance: np.ndarray  # [N, H, W, 3] linear HDR renders (`render_hdr_view`).
    shutter_speeds: np.ndarray  # [N] seconds (1 / ShutterSpeed denominator).
    exposure_values: np.ndarray  # [N] shutter speed / the longest one.
    white_balance: np.ndarray  # [3] AsShotNeutral: camera response per channel to the white of linear sRGB.
    sensor_gain: float  # Sensor value (after black/white level) = clip(gain * shutter_ratio * wb * radiance).
    black_level: int
    white_level: int
    test_scene: bool = False  # View 0 is the HDR+ merged test frame (see `write_raw_scene`).

    def sensor_values(self) -> np.ndarray:
        """[N, H, W, 3] expected normalised sensor values (before quantisation and mosaicking)."""
        scale = self.sensor_gain * self.exposure_values[:, None, None, None] * self.white_balance
        return np.clip(self.radiance * scale, 0., 1.)

    def merged_test_values(self) -> np.ndarray:
        """[H, W, 3] what the loader returns for the merged test frame of a test scene: view 0's sensor values
        at the longest shutter, unclipped (HDR)."""
        return self.radiance[0] * self.sensor_gain * self.white_balance


def write_raw_scene(out_dir: str, n_views: int = 12, width: int = 48, height: int = 32,
                    shutter_denominators: Sequence[int] = (25, 50, 100, 200), iso: int = 100,
                    white_balance: Sequence[float] = (0.55, 1.0, 0.72), sensor_gain: float = 0.6,
                    black_level: int = 512, white_level: int = 16383, seed: int = 0, supersample: int = 1,
                    test_scene: bool = False) -> RawSceneInfo:
    """Writes a RawNeRF scene: forward-facing views as raw Bayer (RGGB) DNGs with exiftool JSON metadata.

    Layout (what `raw_utils.load_raw_dataset` and the LLFF loader read): `raw/view_{i:03d}.dng` and
    `raw/view_{i:03d}.json` (`[{...}]`, the exiftool -json keys the loader uses: BlackLevel, WhiteLevel,
    AsShotNeutral, ColorMatrix2, ShutterSpeed "1/N", ExposureTime, ISO), `images/view_{i:03d}.png` (sRGB
    previews, which name the posed images) and `poses_bounds.npy`. View i is exposed for
    1 / `shutter_denominators[i % len]` seconds. The camera's colour space is linear sRGB
    (ColorMatrix2 = XYZ -> linear sRGB) with white balance `white_balance`, so `cam2rgb = diag(1 / wb)`.
    Sensor values: `round(black + (white - black) * clip(sensor_gain * shutter / longest * wb * radiance))`.

    With `test_scene`, RawNeRF's test-scene convention: views 1.. go to `raw/train/`; view 0 is the test view,
    shot as a burst `raw/test/view_000_{k}` (one frame per shutter, longest first) and merged into
    `hdrplus_test/merged.dng`: the shortest frame, unclipped, with 2 extra fractional bits (values x 4).
    """
    if width % 2 or height % 2 or width < 22 or height < 22:
        raise SyntheticSceneError(f'write_raw_scene: width x height = {width} x {height}; a Bayer DNG needs '
                                  'even sizes of at least 22 pixels (LibRaw refuses smaller images).')
    from mipnerf360.raw_utils import _RGB2XYZ  # pylint: disable=import-outside-toplevel
    raw_dir = os.path.join(out_dir, 'raw')
    for sub in ((os.path.join(raw_dir, 'train'), os.path.join(raw_dir, 'test'), os.path.join(
            out_dir, 'hdrplus_test')) if test_scene else (raw_dir,)) + (os.path.join(out_dir, 'images'),):
        os.makedirs(sub, exist_ok=True)
    poses = forward_facing_poses(n_views, seed=seed)
    focal = 1.1 * width
    pixtocam = np.linalg.inv(intrinsics(focal, width, height))
    wb = np.asarray(white_balance, np.float64)
    denominators = np.array([shutter_denominators[i % len(shutter_denominators)] for i in range(n_views)])
    shutters = 1. / denominators
    ev = shutters / shutters.max()
    xyz2cam = ' '.join(repr(float(v)) for v in np.linalg.inv(_RGB2XYZ).reshape(-1))
    levels = black_level, white_level - black_level

    def write_frame(folder, name, sensor, denominator):
        mosaic = np.round(levels[0] + levels[1] * bayer_mosaic(sensor))
        _write_dng(os.path.join(folder, name + '.dng'), mosaic, black_level, white_level)
        exif = {'SourceFile': f'{name}.dng', 'BlackLevel': int(black_level), 'WhiteLevel': int(white_level),
                'AsShotNeutral': ' '.join(repr(float(v)) for v in wb), 'ColorMatrix2': xyz2cam,
                'ShutterSpeed': f'1/{int(denominator)}', 'ExposureTime': 1. / denominator, 'ISO': int(iso),
                'CFAPattern2': '0 1 1 2'}
        with open(os.path.join(folder, name + '.json'), 'w') as fp:
            json.dump([exif], fp, indent=1)

    names, radiance = [], []
    for i in range(n_views):
        name = f'view_{i:03d}'
        hdr = render_hdr_view(poses[i], pixtocam, width, height, supersample=supersample)
        sensor = np.clip(hdr * sensor_gain * ev[i] * wb, 0., 1.)
        if not test_scene:
            write_frame(raw_dir, name, sensor, denominators[i])
        elif i > 0:
            write_frame(os.path.join(raw_dir, 'train'), name, sensor, denominators[i])
        else:
            burst = sorted(shutter_denominators)
            for k, den in enumerate(burst):
                frame = np.clip(hdr * sensor_gain * (burst[0] / den) * wb, 0., 1.)
                write_frame(os.path.join(raw_dir, 'test'), f'{name}_{k}', frame, den)
            merged = hdr * sensor_gain * (burst[0] / burst[-1]) * wb
            if merged.max() > 1:
                raise SyntheticSceneError(f'write_raw_scene: the merged test frame clips at 1/{burst[-1]} s; '
                                          f'lower sensor_gain ({sensor_gain}) or add a shorter shutter.')
            _write_dng(os.path.join(out_dir, 'hdrplus_test', 'merged.dng'),
                       np.round(4 * (levels[0] + levels[1] * bayer_mosaic(merged))), 4 * black_level,
                       4 * white_level)
        _save_rgb(_linear_to_srgb(sensor / wb), os.path.join(out_dir, 'images', name + '.png'))
        names.append(name + '.png')
        radiance.append(hdr)
    bounds = _write_poses_bounds(out_dir, poses, focal, width, height)
    info = SceneInfo(names=names, camtoworlds=poses, pixtocams=np.repeat(pixtocam[None], n_views, 0),
                     sizes=[(width, height)] * n_views, camera_ids=[1] * n_views,
                     image_ids=list(range(1, n_views + 1)))
    return RawSceneInfo(info=info, bounds=bounds, radiance=np.stack(radiance), shutter_speeds=shutters,
                        exposure_values=ev, white_balance=wb, sensor_gain=float(sensor_gain),
                        black_level=int(black_level), white_level=int(white_level), test_scene=test_scene)


# Distractors (RobustNeRF): a flat-coloured ball, placed anew in each view that has one.
DISTRACTOR_COLOUR = np.array([1.0, 0.1, 0.85])


@dataclasses.dataclass
class DistractorSceneInfo:
    """Ground truth of `write_distractor_scene`, in sorted-name order."""
    info: SceneInfo
    clean: np.ndarray  # [N, H, W, 3] the renders without distractors, in [0, 1].
    coverage: np.ndarray  # [N, H, W] fraction of each pixel covered by the distractor (0 in clean views).
    ball_centres: np.ndarray  # [N, 3] world-space centre of each view's distractor (nan where none).
    ball_radius: float

    @property
    def masks(self) -> np.ndarray:
        """[N, H, W] bool: the distractor covers some of the pixel."""
        return self.coverage > 0


def write_distractor_scene(out_dir: str, n_views: int = 24, width: int = 64, height: int = 48,
                           factors: Sequence[int] = (2, 4), distractor_views: float = 0.5,
                           ball_radius: float = 0.22, llffhold: int = 8, seed: int = 0,
                           supersample: int = 2) -> DistractorSceneInfo:
    """Writes a 360 (COLMAP) scene for RobustNeRF: a fraction `distractor_views` of the training views
    (images i with i % llffhold != 0) shows a transient ball (`DISTRACTOR_COLOUR`, Lambertian shading) at a
    different place in each, in front of the scene; the test views (i % llffhold == 0) are clean.
    """
    rng = np.random.default_rng(seed + 1)
    train = np.flatnonzero(np.arange(n_views) % llffhold != 0)
    chosen = rng.choice(train, int(round(distractor_views * len(train))), replace=False)
    centres = np.full((n_views, 3), np.nan)
    clean, coverage = [None] * n_views, [None] * n_views

    def render(i, c2w, pixtocam, w, h, distortion):
        s = max(int(supersample), 1)
        o, d = subpixel_rays(c2w, pixtocam, w, h, s, distortion)
        rgb, _, t = trace(o, d)
        clean[i] = rgb.reshape(h, w, s * s, 3).mean(2)
        covered = np.zeros(len(o), bool)
        if i in chosen:
            # Centre on the ray through a random pixel of the middle of the image, 40-60 % of the way in.
            px, py = rng.uniform(0.25, 0.75) * w, rng.uniform(0.3, 0.7) * h
            ray_o, ray_d = pixel_rays(c2w, pixtocam, np.array([px]), np.array([py]), distortion)
            _, _, t_centre = trace(ray_o, ray_d)
            centres[i] = ray_o[0] + rng.uniform(0.4, 0.6) * min(t_centre[0], 4.) * ray_d[0]
            t_ball = _intersect_sphere(o, d, centres[i], ball_radius)
            covered = t_ball < t
            normal = (o[covered] + t_ball[covered, None] * d[covered] - centres[i]) / ball_radius
            rgb[covered] = DISTRACTOR_COLOUR * _shade(normal)
        coverage[i] = covered.reshape(h, w, s * s).mean(2)
        return rgb.reshape(h, w, s * s, 3).mean(2)

    info = write_colmap_scene(out_dir, n_views=n_views, width=width, height=height, factors=factors, seed=seed,
                              supersample=supersample, render_fn=render)
    return DistractorSceneInfo(info=info, clean=np.stack(clean), coverage=np.stack(coverage),
                               ball_centres=centres, ball_radius=float(ball_radius))


@dataclasses.dataclass
class AppearanceSceneInfo:
    """Ground truth of `write_appearance_scene`, in sorted-name order."""
    info: SceneInfo
    gains: np.ndarray  # [N, 3] per-view linear RGB gains (exposure times white balance).
    clean_linear: np.ndarray  # [N, H, W, 3] linear renders before the gains.


def write_appearance_scene(out_dir: str, n_views: int = 24, width: int = 64, height: int = 48,
                           factors: Sequence[int] = (2, 4), exposure_range: Tuple[float, float] = (0.6, 1.5),
                           white_balance_range: Tuple[float, float] = (0.8, 1.25), seed: int = 0,
                           supersample: int = 2) -> AppearanceSceneInfo:
    """Writes a 360 (COLMAP) scene for GLO: every view (test views too) has its own appearance, the linear
    render times per-channel gains `exposure * (wb_r, 1, wb_b)` (exposure log-uniform in `exposure_range`,
    wb_r, wb_b in `white_balance_range`), then clipped and sRGB-encoded."""
    rng = np.random.default_rng(seed + 2)
    exposure = np.exp(rng.uniform(*np.log(exposure_range), n_views))
    wb = np.exp(rng.uniform(*np.log(white_balance_range), (n_views, 3)))
    wb[:, 1] = 1.
    gains = exposure[:, None] * wb
    clean = [None] * n_views

    def render(i, c2w, pixtocam, w, h, distortion):
        clean[i] = _srgb_to_linear(render_view(c2w, pixtocam, w, h, supersample=supersample,
                                               distortion=distortion))
        return _linear_to_srgb(clean[i] * gains[i])

    info = write_colmap_scene(out_dir, n_views=n_views, width=width, height=height, factors=factors, seed=seed,
                              supersample=supersample, render_fn=render)
    return AppearanceSceneInfo(info=info, gains=gains, clean_linear=np.stack(clean))


FORMATS = {
    'colmap': 'mip-NeRF 360 layout (images/, images_N/, sparse/0 COLMAP text model)',
    'blender': 'NeRF-synthetic layout (transforms_{split}.json, RGBA PNGs)',
    'llff': 'LLFF forward-facing layout (poses_bounds.npy)',
    'nerfpp': 'Tanks and Temples as processed by NeRF++',
    'fvs': 'Tanks and Temples as processed by Free View Synthesis',
    'dtu': 'DTU (Rectified/<scan>/, cal18/)',
    'shiny_blender': "Ref-NeRF's shiny-Blender layout: mirror and glossy objects, test normal maps",
    'raw': "RawNeRF's layout: Bayer DNGs + exiftool JSON with several exposures, poses_bounds.npy (needs "
           'pidng)',
    'distractors': 'COLMAP 360 scene with a transient ball in half the training views (RobustNeRF)',
    'appearance': 'COLMAP 360 scene with per-view exposure / white balance (GLO)',
}


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description='Write a small ray-traced synthetic scene.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='formats:\n' + '\n'.join(f'  {k:14s} {v}' for k, v in FORMATS.items()))
    parser.add_argument('out_dir')
    parser.add_argument('--format', choices=list(FORMATS), default='colmap', help='dataset layout (see below)')
    parser.add_argument('--n_views', type=int, default=24,
                        help='views (colmap, distractors, appearance, raw, ...) / training views (blender, '
                             'shiny_blender)')
    parser.add_argument('--width', type=int, default=64)
    parser.add_argument('--height', type=int, default=48)
    parser.add_argument('--factors', type=int, nargs='*', default=[2, 4])
    parser.add_argument('--camera_model', default='PINHOLE')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--supersample', type=int, default=2)
    args = parser.parse_args(argv)
    try:
        _write_format(args)
    except SyntheticSceneError as e:
        parser.error(str(e))
    print(f'Wrote a {args.format} scene to {args.out_dir}')


def _write_format(args: argparse.Namespace):
    size = dict(width=args.width, height=args.height, seed=args.seed, supersample=args.supersample)
    if args.format == 'colmap':
        write_colmap_scene(args.out_dir, n_views=args.n_views, factors=args.factors,
                           camera_model=args.camera_model, **size)
    elif args.format == 'blender':
        write_blender_scene(args.out_dir, n_train=args.n_views, **size)
    elif args.format == 'shiny_blender':
        write_shiny_blender_scene(args.out_dir, n_train=args.n_views, **size)
    elif args.format == 'llff':
        write_llff_scene(args.out_dir, n_views=args.n_views, factors=args.factors, **size)
    elif args.format == 'raw':
        write_raw_scene(args.out_dir, n_views=args.n_views, **size)
    elif args.format == 'distractors':
        write_distractor_scene(args.out_dir, n_views=args.n_views, factors=args.factors, **size)
    elif args.format == 'appearance':
        write_appearance_scene(args.out_dir, n_views=args.n_views, factors=args.factors, **size)
    elif args.format == 'nerfpp':
        n_test = max(args.n_views // 8, 1)
        write_nerfpp_scene(args.out_dir, n_train=args.n_views - n_test, n_test=n_test, **size)
    elif args.format == 'fvs':
        write_fvs_scene(args.out_dir, n_views=args.n_views, **size)
    else:
        write_dtu_scene(args.out_dir, n_views=args.n_views, **size)


if __name__ == '__main__':
    main()
