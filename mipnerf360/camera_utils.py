"""Camera models, pose manipulation, render paths and ray generation (port of multinerf's camera_utils).

Conventions (identical to the JAX reference):
  poses / camtoworlds  [..., 3, 4] camera-to-world matrices in the OpenGL convention (x right, y up, z back).
  pixtocams            [..., 3, 3] INVERSE intrinsics in the OpenCV convention (pixel -> camera plane).
  pixels               integer indices; the ray of pixel (i, j) passes through its centre (i + .5, j + .5).
  directions           world-space ray directions with unit camera-space depth (NOT normalised);
                       viewdirs are the normalised directions.

Pose and path helpers work on numpy arrays as the reference's do. The ray functions (`pixels_to_rays`,
`convert_to_ndc`, the undistortion, `cast_ray_batch`, ...) are torch code, batched with no Python loops over
rays and no host syncs. They keep the reference's `xnp` argument: called with `xnp=torch` or any tensor
input they return tensors on the device of the inputs; called with numpy inputs they return numpy arrays
(see `_torch_rays`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import itertools
import types
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.interpolate
import torch

from mipnerf360 import utils
from mipnerf360.configs import ConfigError

_Array = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# The numpy boundary of the torch ray functions.
# ----------------------------------------------------------------------------------------------------------

def _float_dtype(arrays: Sequence[Any]) -> Optional[torch.dtype]:
    """The dtype of the first floating tensor; else the numpy result type of the floating arrays; else None."""
    for a in arrays:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    np_floats = [a.dtype for a in arrays if isinstance(a, np.ndarray) and a.dtype.kind == 'f']
    return torch.from_numpy(np.empty(0, np.result_type(*np_floats))).dtype if np_floats else None


def _is_placed(a: Any, device: torch.device, float_dtype: Optional[torch.dtype]) -> bool:
    """False for numpy values and for tensors that `_to_torch` would move or cast."""
    if isinstance(a, (np.ndarray, np.generic)):
        return False
    if not isinstance(a, torch.Tensor):
        return True
    return a.device == device and (float_dtype is None or not a.is_floating_point() or a.dtype == float_dtype)


# Leaves that `_to_torch` passes through unchanged.
_PLAIN = (bool, int, float, complex, str, type(None), enum.Enum, types.ModuleType, torch.device, torch.dtype)


class _Placement:
    """The device and the placed float dtype seen so far by `_all_placed`."""
    __slots__ = ('device', 'dtype')

    def __init__(self):
        self.device: Optional[torch.device] = None
        self.dtype: Optional[torch.dtype] = None


def _all_placed(tree: Any, seen: _Placement, placed: bool) -> bool:
    """Whether every leaf of `tree` is a plain Python value or a tensor on `seen.device`, floating tensors of a
    `placed` argument in `seen.dtype` (the first tensors met set both): a tree the slow path leaves as it is."""
    if isinstance(tree, torch.Tensor):
        if seen.device is None:
            seen.device = tree.device
        elif tree.device != seen.device:
            return False
        if placed and tree.is_floating_point():
            if seen.dtype is None:
                seen.dtype = tree.dtype
            elif tree.dtype != seen.dtype:
                return False
        return True
    if isinstance(tree, _PLAIN):
        return True
    if isinstance(tree, (list, tuple)):
        return all(_all_placed(v, seen, placed) for v in tree)
    if isinstance(tree, dict):
        return all(_all_placed(v, seen, placed) for v in tree.values())
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return all(_all_placed(getattr(tree, f.name), seen, placed) for f in dataclasses.fields(tree))
    return False  # numpy values (converted by the slow path) and anything unknown.


def _to_torch(a: Any, device: torch.device, float_dtype: Optional[torch.dtype]) -> Any:
    """numpy arrays and tensors -> tensors on `device` (floating ones in `float_dtype` if given)."""
    if isinstance(a, np.generic):
        return a.item()
    if isinstance(a, np.ndarray):
        if not a.flags.writeable or any(s < 0 for s in a.strides):
            a = a.copy()  # torch.from_numpy takes neither.
        a = torch.from_numpy(a)
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=float_dtype if a.is_floating_point() else None)
    return a


def _to_numpy(a: Any) -> Any:
    return a.contiguous().numpy() if isinstance(a, torch.Tensor) else a


def _torch_rays(*placement: str) -> Callable[[Callable], Callable]:
    """Decorator giving a torch ray function the reference's numpy-or-torch (`xnp`) interface.

    A call with `xnp=torch` or with any tensor among the arguments returns tensors: numpy arrays among the
    arguments become tensors on the device of the first tensor. The floating arrays of the arguments named in
    `placement` (default: all) take one dtype: that of the first floating tensor among them, else the numpy
    result type of their floating arrays. Any other call runs the same torch code on CPU tensors made from
    the numpy inputs (float64 stays float64, float32 stays float32) and returns numpy arrays. A call that needs
    none of this (tensors on one device, the placed floating ones of one dtype, and plain Python values: the
    training and render case, and these functions' calls of each other) goes straight to `fn`.
    """
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        names = tuple(signature.parameters)
        placed = placement or names  # In order: the first floating tensor among them sets the dtype.
        is_placed = frozenset(placed)
        xnp_index = names.index('xnp')
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
            raise TypeError(f'_torch_rays: {fn.__name__} must not take *args or **kwargs.')

        def in_place(args: tuple, kwargs: dict) -> bool:
            """Whether the call holds tensors (or xnp=torch) and nothing the slow path would convert."""
            seen = _Placement()
            named = itertools.chain(zip(names, args), kwargs.items())
            if not all(_all_placed(value, seen, name in is_placed) for name, value in named):
                return False
            xnp = args[xnp_index] if len(args) > xnp_index else kwargs.get('xnp')
            return seen.device is not None or xnp is torch

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if in_place(args, kwargs):  # The training / render case, and the nested calls: nothing to convert.
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            arguments = bound.arguments
            leaves = {name: utils.tree_leaves(value) for name, value in arguments.items()}
            first = [a for name in placed for a in leaves.get(name, ())]
            tensors = [a for a in first + [a for v in leaves.values() for a in v] if isinstance(a, torch.Tensor)]
            to_numpy = arguments.get('xnp', np) is not torch and not tensors
            device = tensors[0].device if tensors else torch.device('cpu')
            dtype = _float_dtype(first)
            for name, value in arguments.items():
                float_dtype = dtype if name in placed else None
                if not all(_is_placed(a, device, float_dtype) for a in leaves[name]):
                    arguments[name] = utils.tree_map(lambda a: _to_torch(a, device, float_dtype), value)
            out = fn(*bound.args, **bound.kwargs)
            return utils.tree_map(_to_numpy, out) if to_numpy else out

        return wrapper

    return decorate


def _mat_vec(mat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """[..., m, n] x [..., n] -> [..., m], broadcasting the batch dims (exact elementwise products)."""
    return (mat * vec[..., None, :]).sum(-1)


def _flip_yz(v: torch.Tensor) -> torch.Tensor:
    """[..., 3] OpenCV <-> OpenGL camera axes: diag(1, -1, -1) v."""
    return torch.cat([v[..., :1], -v[..., 1:]], -1)


# ----------------------------------------------------------------------------------------------------------
# Normalised device coordinates.
# ----------------------------------------------------------------------------------------------------------

@_torch_rays()
def convert_to_ndc(origins: _Array,
                   directions: _Array,
                   pixtocam: _Array,
                   near: float = 1.,
                   xnp: types.ModuleType = np) -> Tuple[_Array, _Array]:
    """Maps rays into the NDC space of a forward-facing pinhole camera (NeRF, arXiv:2003.08934 App. C).

    The NDC camera has identity pose and the intrinsics of `pixtocam`; its near plane is z = -near and its far
    plane is at infinity. Origins are first slid along their rays onto the near plane, so NDC distance 0 is
    the near plane and 1 is infinity. Rays must point into -z (dz < 0).

    Args:
        origins: [..., 3] world-space ray origins.
        directions: [..., 3] world-space ray directions.
        pixtocam: [3, 3] inverse intrinsics of the NDC camera.
        near: distance of the near plane along -z.
        xnp: numpy or torch (the kind of arrays returned; tensor inputs give tensors).

    Returns:
        origins_ndc: [..., 3], with z = -1.
        directions_ndc: [..., 3], pointing from origins_ndc to the image of the ray's point at infinity.
    """
    t_near = -(near + origins[..., 2]) / directions[..., 2]
    origins = origins + t_near[..., None] * directions
    dx, dy, dz = directions.unbind(-1)
    ox, oy, oz = origins.unbind(-1)
    # 1 / pixtocam[0, 2] = -2 f / W and likewise for y.
    sx = 1. / pixtocam[0, 2]
    sy = 1. / pixtocam[1, 2]
    ones = torch.ones_like(oz)
    near_pts = torch.stack([sx * ox / oz, sy * oy / oz, -ones], -1)
    far_pts = torch.stack([sx * dx / dz, sy * dy / dz, ones], -1)
    return near_pts, far_pts - near_pts


# ----------------------------------------------------------------------------------------------------------
# Pose helpers (numpy).
# ----------------------------------------------------------------------------------------------------------

def pad_poses(p: np.ndarray) -> np.ndarray:
    """[..., 3, 4] -> [..., 4, 4] by appending the homogeneous row [0, 0, 0, 1]."""
    last_row = np.broadcast_to(np.array([0., 0., 0., 1.]), p[..., :1, :4].shape)
    return np.concatenate([p[..., :3, :4], last_row], axis=-2)


def unpad_poses(p: np.ndarray) -> np.ndarray:
    """[..., 4, 4] -> [..., 3, 4] (drops the homogeneous row)."""
    return p[..., :3, :4]


def normalize(x: np.ndarray) -> np.ndarray:
    """x / |x| (over the whole array, as the reference)."""
    return x / np.linalg.norm(x)


def viewmatrix(lookdir: np.ndarray, up: np.ndarray, position: np.ndarray) -> np.ndarray:
    """[3, 4] camera-to-world whose z axis is along `lookdir`, y axis close to `up`, origin at `position`."""
    z = normalize(lookdir)
    x = normalize(np.cross(up, z))
    y = normalize(np.cross(z, x))
    return np.stack([x, y, z, position], axis=1)


def average_pose(poses: np.ndarray) -> np.ndarray:
    """[3, 4] pose at the mean camera centre, built from the mean z axis and mean up (y) vector of `poses`."""
    centre = poses[:, :3, 3].mean(0)
    mean_z = poses[:, :3, 2].mean(0)
    mean_up = poses[:, :3, 1].mean(0)
    return viewmatrix(mean_z, mean_up, centre)


def recenter_poses(poses: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Expresses `poses` [N, 3, 4] in the frame of their average pose.

    Returns:
        poses: [N, 3, 4] recentred poses (their average pose is the identity).
        transform: [4, 4] world transform that was applied (new = transform @ old).
    """
    transform = np.linalg.inv(pad_poses(average_pose(poses)))
    return unpad_poses(transform @ pad_poses(poses)), transform


def focus_point_fn(poses: np.ndarray) -> np.ndarray:
    """[3] least-squares point closest to all the cameras' optical axes (lines through centre along z)."""
    axes = poses[:, :3, 2:3]  # [N, 3, 1]
    centres = poses[:, :3, 3:4]  # [N, 3, 1]
    # Projector onto the plane orthogonal to each axis (symmetric and idempotent, kept as the reference: m^T m).
    proj = np.eye(3) - axes * np.transpose(axes, [0, 2, 1])
    proj_sq = np.transpose(proj, [0, 2, 1]) @ proj
    return np.linalg.inv(proj_sq.mean(0)) @ (proj_sq @ centres).mean(0)[:, 0]


# Constants of generate_spiral_path() (as in the reference).
NEAR_STRETCH = .9  # Pulls the near bound in for the forward-facing path.
FAR_STRETCH = 5.  # Pushes the far bound out for the forward-facing path.
FOCUS_DISTANCE = .75  # Disparity-space weight of the far bound in the focus depth.


def generate_spiral_path(poses: np.ndarray,
                         bounds: np.ndarray,
                         n_frames: int = 120,
                         n_rots: int = 2,
                         zrate: float = .5) -> np.ndarray:
    """Forward-facing spiral render path (LLFF).

    Args:
        poses: [N, 3, 4] camera-to-worlds.
        bounds: [N, 2] (or any shape) near/far scene depths.
        n_frames: number of poses returned.
        n_rots: number of turns of the spiral.
        zrate: frequency of the motion along z relative to the turns.

    Returns:
        [n_frames, 3, 4] poses, all looking at the point at focus depth in front of the average pose.
    """
    near_bound = bounds.min() * NEAR_STRETCH
    far_bound = bounds.max() * FAR_STRETCH
    # Focus depth: weighted mean of the bounds in disparity.
    focal = 1. / ((1. - FOCUS_DISTANCE) / near_bound + FOCUS_DISTANCE / far_bound)

    radii = np.percentile(np.abs(poses[:, :3, 3]), 90, 0)
    radii = np.concatenate([radii, [1.]])

    cam2world = average_pose(poses)
    up = poses[:, :3, 1].mean(0)
    lookat = cam2world @ np.array([0., 0., -focal, 1.])
    thetas = np.linspace(0., 2. * np.pi * n_rots, n_frames, endpoint=False)
    out = []
    for theta in thetas:
        local = radii * np.array([np.cos(theta), -np.sin(theta), -np.sin(theta * zrate), 1.])
        position = cam2world @ local
        out.append(viewmatrix(position - lookat, up, position))
    return np.stack(out, axis=0)


def transform_poses_pca(poses: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rotates and recentres poses so the principal axes of the camera centres are x, y, z; scales to [-1, 1]^3.

    Args:
        poses: [N, 3, 4] camera-to-worlds.

    Returns:
        poses: [N, 3, 4] transformed camera-to-worlds (centres inside [-1, 1]^3, max |coordinate| = 1).
        transform: [4, 4] similarity (scale times rotation, plus translation) applied to the world: the new
            camera centres are transform @ [old centre, 1] and the new rotations are those of
            transform @ pad(old pose) divided by the scale (so they stay orthonormal).
    """
    centres = poses[:, :3, 3]
    mean = centres.mean(axis=0)
    centred = centres - mean

    eigval, eigvec = np.linalg.eig(centred.T @ centred)
    order = np.argsort(eigval)[::-1]  # Largest variance first.
    rot = eigvec[:, order].T
    if np.linalg.det(rot) < 0:
        rot = np.diag(np.array([1, 1, -1])) @ rot

    transform = np.concatenate([rot, rot @ -mean[:, None]], -1)
    new_poses = unpad_poses(transform @ pad_poses(poses))
    transform = np.concatenate([transform, np.eye(4)[3:]], axis=0)

    # Make the mean camera up vector point into +z.
    if new_poses.mean(axis=0)[2, 1] < 0:
        new_poses = np.diag(np.array([1, -1, -1])) @ new_poses
        transform = np.diag(np.array([1, -1, -1, 1])) @ transform

    scale = 1. / np.max(np.abs(new_poses[:, :3, 3]))
    new_poses[:, :3, 3] *= scale
    transform = np.diag(np.array([scale] * 3 + [1])) @ transform
    return new_poses, transform


def _linspace_inverse_cdf(t: np.ndarray, w_logits: np.ndarray, num_samples: int) -> np.ndarray:
    """Deterministic `stepfun.sample(None, t, w_logits, n)` in numpy: inverse CDF of the step function (t, w).

    Args:
        t: [n_bins + 1] sorted bin edges.
        w_logits: [n_bins] bin logits (weights are their softmax).
        num_samples: number of samples; the CDF is inverted at linspace(0, 1 - eps, num_samples), eps being the
            float32 machine epsilon as in the reference (it mimics the range of jax.random.uniform).

    Returns:
        [num_samples] samples.
    """
    w = np.exp(w_logits - w_logits.max())
    w = w / w.sum()
    cdf = np.concatenate([[0.], np.minimum(1., np.cumsum(w[:-1])), [1.]])
    u = np.linspace(0., 1. - np.finfo(np.float32).eps, num_samples)
    return np.interp(u, cdf, t)


def generate_ellipse_path(poses: np.ndarray,
                          n_frames: int = 120,
                          const_speed: bool = True,
                          z_variation: float = 0.,
                          z_phase: float = 0.) -> np.ndarray:
    """Elliptical render path around the focus point of `poses` (for PCA-aligned 360 captures).

    The ellipse is centred on the focus point in x-y with semi-axes from the 90th percentile of the camera
    offsets, at height z = 0 (plus optional variation between the 10th and 90th height percentiles). With
    `const_speed`, the angles are resampled by inverting the CDF of the step lengths so that the camera moves
    at a near-constant speed. Every frame looks at the focus point, with the world axis nearest to the mean
    camera up vector as up.

    Args:
        poses: [N, 3, 4] camera-to-worlds.
        n_frames: number of poses returned.
        const_speed: even out the speed along the path.
        z_variation: amplitude of the height variation (0 keeps the path at z = 0).
        z_phase: phase of the height variation, in turns.

    Returns:
        [n_frames, 3, 4] camera-to-worlds.
    """
    center = focus_point_fn(poses)
    offset = np.array([center[0], center[1], 0])
    semi_axes = np.percentile(np.abs(poses[:, :3, 3] - offset), 90, axis=0)
    low = offset - semi_axes
    high = offset + semi_axes
    z_low = np.percentile(poses[:, :3, 3], 10, axis=0)
    z_high = np.percentile(poses[:, :3, 3], 90, axis=0)

    def positions_at(theta: np.ndarray) -> np.ndarray:
        cos_blend = .5 + .5 * np.cos(theta)
        sin_blend = .5 + .5 * np.sin(theta)
        z_blend = .5 + .5 * np.cos(theta + 2. * np.pi * z_phase)
        return np.stack([
            low[0] + (high[0] - low[0]) * cos_blend,
            low[1] + (high[1] - low[1]) * sin_blend,
            z_variation * (z_low[2] + (z_high[2] - z_low[2]) * z_blend),
        ], -1)

    theta = np.linspace(0., 2. * np.pi, n_frames + 1, endpoint=True)
    positions = positions_at(theta)
    if const_speed:
        steps = np.linalg.norm(np.diff(positions, axis=0), axis=-1)
        theta = _linspace_inverse_cdf(theta, np.log(steps), n_frames + 1)
        positions = positions_at(theta)
    positions = positions[:-1]  # The last one repeats the first.

    mean_up = poses[:, :3, 1].mean(0)
    mean_up = mean_up / np.linalg.norm(mean_up)
    axis = np.argmax(np.abs(mean_up))
    up = np.eye(3)[axis] * np.sign(mean_up[axis])
    return np.stack([viewmatrix(p - center, up, p) for p in positions])


def generate_interpolated_path(poses: np.ndarray,
                               n_interp: int,
                               spline_degree: int = 5,
                               smoothness: float = .03,
                               rot_weight: float = .1) -> np.ndarray:
    """Smooth B-spline path through keyframe poses (scipy.interpolate.splprep / splev).

    Each pose is represented by three points: its centre, a point `rot_weight` in front of it (along -z) and
    a point `rot_weight` above it (along +y); the 9-D curve is fitted and resampled, then turned back into
    poses with `viewmatrix`.

    Args:
        poses: [n, 3, 4] keyframe camera-to-worlds.
        n_interp: frames per keyframe interval; the path has n_interp * (n - 1) poses.
        spline_degree: B-spline degree (capped at n - 1).
        smoothness: spline smoothing factor `s` (0 interpolates the keyframes exactly).
        rot_weight: weight of the orientation points relative to the positions.

    Returns:
        [n_interp * (n - 1), 3, 4] camera-to-worlds.
    """
    centres = poses[:, :3, 3]
    fronts = centres - rot_weight * poses[:, :3, 2]
    ups = centres + rot_weight * poses[:, :3, 1]
    points = np.stack([centres, fronts, ups], 1)  # [n, 3, 3]

    n_out = n_interp * (points.shape[0] - 1)
    flat = points.reshape(points.shape[0], -1)
    degree = min(spline_degree, points.shape[0] - 1)
    tck, _ = scipy.interpolate.splprep(flat.T, k=degree, s=smoothness)
    u = np.linspace(0., 1., n_out, endpoint=False)
    new_points = np.array(scipy.interpolate.splev(u, tck)).T.reshape(n_out, 3, 3)
    return np.array([viewmatrix(c - f, u_ - c, c) for c, f, u_ in new_points])


def interpolate_1d(x: np.ndarray, n_interp: int, spline_degree: int, smoothness: float) -> np.ndarray:
    """Upsamples a 1-D signal [n] to n_interp * (n - 1) values with a smoothing spline (splrep / splev)."""
    t = np.linspace(0., 1., len(x), endpoint=True)
    tck = scipy.interpolate.splrep(t, x, s=smoothness, k=spline_degree)
    u = np.linspace(0., 1., n_interp * (len(x) - 1), endpoint=False)
    return scipy.interpolate.splev(u, tck)


_EXPOSURE_SPLINE_DEGREE = 5


def create_render_spline_path(
        config: Any,
        image_names: Union[str, List[str]],
        poses: np.ndarray,
        exposures: Optional[np.ndarray],
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Spline render path through the dataset poses named by `config.render_spline_keyframes`.

    `config.render_spline_keyframes` is either a directory (its file names are the keyframes) or a text file
    with one image name per line.

    Args:
        config: a configs.Config (uses the render_spline_* fields).
        image_names: the dataset's image names, in pose order.
        poses: [N, 3, 4] dataset camera-to-worlds.
        exposures: optional [N] exposure values.

    Returns:
        spline_indices: [K] indices of the keyframes in `poses`.
        render_poses: [n_interp * (K - 1), 3, 4] path poses.
        render_exposures: [n_interp * (K - 1)] interpolated exposures, or None.
    """
    keyframes_src = config.render_spline_keyframes
    if keyframes_src is None:
        raise ConfigError('create_render_spline_path() needs Config.render_spline_keyframes (a folder of images '
                          'or a text file of image names); got None.')
    if utils.isdir(keyframes_src):
        keyframe_names = sorted(utils.listdir(keyframes_src))
    else:
        if not utils.file_exists(keyframes_src):
            raise ConfigError(f'Config.render_spline_keyframes = {keyframes_src!r} does not exist; give a folder '
                              'of keyframe images or a text file with one image name per line.')
        with utils.open_file(keyframes_src, 'r') as fp:
            keyframe_names = [n.strip() for n in fp.read().splitlines() if n.strip()]
    keyframe_set = set(keyframe_names)
    spline_indices = np.array([i for i, name in enumerate(image_names) if name in keyframe_set], dtype=np.int64)
    if spline_indices.size < 2:
        unmatched = sorted(keyframe_set.difference(image_names))[:3]
        raise ConfigError(
            f'Config.render_spline_keyframes = {keyframes_src!r} lists {len(keyframe_set)} names, '
            f'{spline_indices.size} of them dataset images (unmatched e.g. {", ".join(unmatched) or "none"}; '
            f'dataset images e.g. {", ".join(list(image_names)[:3])}); a spline path needs at least 2 keyframes '
            'named exactly as the images in DATA_DIR/images.')
    render_poses = generate_interpolated_path(
        poses[spline_indices],
        n_interp=config.render_spline_n_interp,
        spline_degree=config.render_spline_degree,
        smoothness=config.render_spline_smoothness,
        rot_weight=.1)
    render_exposures = None
    if config.render_spline_interpolate_exposure:
        if exposures is None:
            raise ConfigError('Config.render_spline_interpolate_exposure = True needs per-image exposures (EXIF '
                              'ExposureTime and ISOSpeedRatings in the JPEGs of DATA_DIR/images, or the raw '
                              'frames of a RawNeRF scene that is not a test scene), which this scene does not '
                              'have; set it to False.')
        if spline_indices.size < _EXPOSURE_SPLINE_DEGREE + 1:
            raise ConfigError(f'Config.render_spline_interpolate_exposure = True needs at least '
                              f'{_EXPOSURE_SPLINE_DEGREE + 1} keyframes (a degree-{_EXPOSURE_SPLINE_DEGREE} '
                              f'spline) but Config.render_spline_keyframes = {keyframes_src!r} matches '
                              f'{spline_indices.size}; list more keyframes or set it to False.')
        # Heavy smoothing of log exposure keeps the video from flickering.
        log_exposure = interpolate_1d(np.log(exposures[spline_indices]), config.render_spline_n_interp,
                                      spline_degree=_EXPOSURE_SPLINE_DEGREE, smoothness=20)
        render_exposures = np.exp(log_exposure)
    return spline_indices, render_poses, render_exposures


# ----------------------------------------------------------------------------------------------------------
# Intrinsics and pixel grids.
# ----------------------------------------------------------------------------------------------------------

@_torch_rays()
def intrinsic_matrix(fx: float, fy: float, cx: float, cy: float, xnp: types.ModuleType = np) -> _Array:
    """[3, 3] float64 OpenCV pinhole intrinsic matrix K (a CPU tensor with `xnp=torch`)."""
    return torch.tensor([[fx, 0., cx], [0., fy, cy], [0., 0., 1.]], dtype=torch.float64)


@_torch_rays()
def get_pixtocam(focal: float, width: float, height: float, xnp: types.ModuleType = np) -> _Array:
    """[3, 3] float64 inverse intrinsics of an ideal pinhole camera with the principal point at the centre."""
    return torch.linalg.inv(intrinsic_matrix(focal, focal, width * .5, height * .5, xnp=torch))


def _pixel_grid(width: int, height: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(width, device=device), torch.arange(height, device=device), indexing='xy')


@_torch_rays()
def pixel_coordinates(width: int, height: int, xnp: types.ModuleType = np) -> Tuple[_Array, _Array]:
    """Integer pixel coordinates (x, y), each [height, width] ('xy' meshgrid)."""
    return _pixel_grid(width, height, torch.device('cpu'))


# ----------------------------------------------------------------------------------------------------------
# Lens distortion.
# ----------------------------------------------------------------------------------------------------------

def _radial_and_tangential_distort(x: _Array, y: _Array, k1: Any = 0., k2: Any = 0., k3: Any = 0., k4: Any = 0.,
                                   p1: Any = 0., p2: Any = 0.) -> Tuple[_Array, _Array]:
    """Distorts normalised camera coordinates with the model the reference inverts (OPENCV, and FISHEYE's radial).

    With r^2 = x^2 + y^2 and d = 1 + k1 r^2 + k2 r^4 + k3 r^6 + k4 r^8:
        xd = x d + 2 p1 x y + p2 (r^2 + 2 x^2),   yd = y d + 2 p2 x y + p1 (r^2 + 2 y^2).
    Plain arithmetic, so it works on numpy arrays and tensors alike; parameters are scalars or arrays
    broadcasting with x.
    """
    r2 = x * x + y * y
    radial = 1. + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
    xd = x * radial + 2. * p1 * x * y + p2 * (r2 + 2. * x * x)
    yd = y * radial + 2. * p2 * x * y + p1 * (r2 + 2. * y * y)
    return xd, yd


def radial_and_tangential_distort(x: _Array, y: _Array, **params: Any) -> Tuple[_Array, _Array]:
    """Public alias of `_radial_and_tangential_distort` (undistorted -> distorted normalised coordinates)."""
    return _radial_and_tangential_distort(x, y, **params)


@_torch_rays()
def fisheye_distort(x: _Array, y: _Array, k1: Any = 0., k2: Any = 0., k3: Any = 0., k4: Any = 0.,
                    xnp: types.ModuleType = np) -> Tuple[_Array, _Array]:
    """OpenCV fisheye (equidistant) model: pinhole coordinates (x, y) = (X/Z, Y/Z) -> distorted coordinates.

    theta = atan(|(x, y)|) is the angle from the optical axis and
    theta_d = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6 + k4 theta^8); the distorted point is
    theta_d (x, y) / |(x, y)|. `pixels_to_rays(..., camtype=FISHEYE)` with these k's inverts it (for points in
    front of the camera; use `fisheye_distort_dirs` for directions beyond 90 degrees).
    """
    r = torch.sqrt(x * x + y * y)
    return _fisheye_from_angle(x, y, r, torch.arctan(r), k1, k2, k3, k4)


@_torch_rays()
def fisheye_distort_dirs(dirs: _Array, k1: Any = 0., k2: Any = 0., k3: Any = 0., k4: Any = 0.,
                         xnp: types.ModuleType = np) -> Tuple[_Array, _Array]:
    """OpenCV fisheye model for camera-space directions [..., 3] (OpenCV axes, z forward), any angle < pi."""
    x, y, z = dirs.unbind(-1)
    r = torch.sqrt(x * x + y * y)
    return _fisheye_from_angle(x, y, r, torch.atan2(r, z), k1, k2, k3, k4)


def _fisheye_from_angle(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, theta: torch.Tensor,
                        k1: Any, k2: Any, k3: Any, k4: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    t2 = theta * theta
    theta_d = theta * (1. + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
    positive = r > 0
    scale = torch.where(positive, theta_d / torch.where(positive, r, 1.), 1.)
    return x * scale, y * scale


def _compute_residual_and_jacobian(
        x: _Array, y: _Array, xd: _Array, yd: _Array,
        k1: Any = 0.0, k2: Any = 0.0, k3: Any = 0.0, k4: Any = 0.0, p1: Any = 0.0, p2: Any = 0.0,
) -> Tuple[_Array, _Array, _Array, _Array, _Array, _Array]:
    """Residual of `_radial_and_tangential_distort(x, y) - (xd, yd)` and its 2x2 Jacobian.

    Returns:
        fx, fy: residuals; fx_x, fx_y, fy_x, fy_y: partial derivatives of (fx, fy) w.r.t. (x, y).
    """
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
    fx = radial * x + 2 * p1 * x * y + p2 * (r2 + 2 * x * x) - xd
    fy = radial * y + 2 * p2 * x * y + p1 * (r2 + 2 * y * y) - yd

    # d(radial)/d(r^2), then the chain rule with d(r^2)/dx = 2x.
    dradial_dr2 = k1 + r2 * (2.0 * k2 + r2 * (3.0 * k3 + r2 * 4.0 * k4))
    dradial_dx = 2.0 * x * dradial_dr2
    dradial_dy = 2.0 * y * dradial_dr2

    fx_x = radial + dradial_dx * x + 2.0 * p1 * y + 6.0 * p2 * x
    fx_y = dradial_dy * x + 2.0 * p1 * x + 2.0 * p2 * y
    fy_x = dradial_dx * y + 2.0 * p2 * y + 2.0 * p1 * x
    fy_y = radial + dradial_dy * y + 2.0 * p2 * x + 6.0 * p1 * y
    return fx, fy, fx_x, fx_y, fy_x, fy_y


@_torch_rays()
def _radial_and_tangential_undistort(
        xd: _Array, yd: _Array,
        k1: Any = 0, k2: Any = 0, k3: Any = 0, k4: Any = 0, p1: Any = 0, p2: Any = 0,
        eps: float = 1e-9,
        max_iterations: int = 10,
        xnp: types.ModuleType = np) -> Tuple[_Array, _Array]:
    """Inverts `_radial_and_tangential_distort` by Newton's method started at the distorted point.

    A fixed number of iterations (no convergence test, so no host sync); steps whose Jacobian determinant is
    below `eps` in magnitude are skipped, as in the reference.

    Args:
        xd, yd: [...] distorted normalised coordinates.
        k1..k4, p1, p2: distortion parameters (scalars or arrays broadcasting with xd).
        eps: determinant threshold.
        max_iterations: number of Newton steps.
        xnp: numpy or torch (the kind of arrays returned; tensor inputs give tensors).

    Returns:
        x, y: [...] undistorted normalised coordinates.
    """
    x, y = xd, yd
    for _ in range(max_iterations):
        fx, fy, fx_x, fx_y, fy_x, fy_y = _compute_residual_and_jacobian(
            x=x, y=y, xd=xd, yd=yd, k1=k1, k2=k2, k3=k3, k4=k4, p1=p1, p2=p2)
        det = fy_x * fx_y - fx_x * fy_y
        ok = det.abs() > eps
        safe_det = torch.where(ok, det, 1.)
        x = x + torch.where(ok, (fx * fy_y - fy * fx_y) / safe_det, 0.)
        y = y + torch.where(ok, (fy * fx_x - fx * fy_x) / safe_det, 0.)
    return x, y


# ----------------------------------------------------------------------------------------------------------
# Ray casting.
# ----------------------------------------------------------------------------------------------------------

class ProjectionType(enum.Enum):
    """Camera projection: pinhole perspective, equidistant fisheye, or equirectangular panorama."""
    PERSPECTIVE = 'perspective'
    FISHEYE = 'fisheye'
    PANO = 'pano'
    PANORAMIC = 'pano'  # Alias (the name used by later releases of the reference).


@_torch_rays('pixtocams', 'camtoworlds', 'pix_x_int', 'pix_y_int', 'pixtocam_ndc', 'distortion_params')
def pixels_to_rays(
        pix_x_int: _Array,
        pix_y_int: _Array,
        pixtocams: _Array,
        camtoworlds: _Array,
        distortion_params: Optional[Mapping[str, Any]] = None,
        pixtocam_ndc: Optional[_Array] = None,
        camtype: ProjectionType = ProjectionType.PERSPECTIVE,
        xnp: types.ModuleType = np,
) -> Tuple[_Array, _Array, _Array, _Array, _Array]:
    """Rays through the centres of pixels, given inverse intrinsics, poses and optional distortion.

    Vectorised over the leading dims SH; pixtocams, camtoworlds and the distortion parameters may be shared
    ([3, 3], [3, 4], scalars) or per ray (SH + [3, 3], SH + [3, 4], arrays of shape SH), or anything that
    broadcasts. With tensor inputs, the float dtype comes from the first floating tensor among pixtocams,
    camtoworlds, the pixels, pixtocam_ndc and the distortion parameters (else from the numpy inputs), and the
    device from the first tensor input; numpy inputs are moved there.

    Steps: pixel centre (x + .5, y + .5, 1) -> pixtocam -> undistort (OPENCV / fisheye radial) -> for FISHEYE
    the equidistant map theta = |xy| (capped at pi) -> (sin(theta) xy / |xy|, cos(theta)); for PANO,
    (x, y) are (longitude, colatitude) -> OpenCV to OpenGL flip diag(1, -1, -1) -> rotate by the pose.
    The right and lower neighbours go through the same steps to give the cone radius (mip-NeRF, Sec. 3.1):
    radii = mean(|d_right - d|, |d_down - d|) * 2 / sqrt(12). In NDC mode (pixtocam_ndc given) the rays are
    mapped by `convert_to_ndc` and the radius uses the distances between the NDC origins instead.

    Args:
        pix_x_int: [SH] integer x pixel indices.
        pix_y_int: [SH] integer y pixel indices.
        pixtocams: [3, 3] or SH + [3, 3] inverse intrinsics.
        camtoworlds: [3, 4] or SH + [3, 4] OpenGL camera-to-worlds.
        distortion_params: optional dict with any of k1, k2, k3, k4, p1, p2 (scalars or [SH] arrays).
        pixtocam_ndc: optional [3, 3] inverse intrinsics of the NDC camera.
        camtype: ProjectionType.
        xnp: numpy or torch (the kind of arrays returned; tensor inputs give tensors).

    Returns:
        origins: SH + [3] ray origins.
        directions: SH + [3] ray directions, unit depth along the camera's -z (not normalised).
        viewdirs: SH + [3] normalised directions.
        radii: SH + [1] cone radii at unit distance.
        imageplane: SH + [2] OpenGL camera-space (x, y) of the ray at depth 1.
    """
    pix_x, pix_y = pix_x_int.to(pixtocams.dtype), pix_y_int.to(pixtocams.dtype)
    # [3, SH]: the pixel itself, its right neighbour and its lower neighbour; then [3, SH, 3] homogeneous.
    xs = torch.stack([pix_x, pix_x + 1, pix_x], 0) + .5
    ys = torch.stack([pix_y, pix_y, pix_y + 1], 0) + .5
    pixel_dirs = torch.stack([xs, ys, torch.ones_like(xs)], -1)
    cam_dirs = _mat_vec(pixtocams, pixel_dirs)

    if distortion_params is not None:
        x, y = _radial_and_tangential_undistort(cam_dirs[..., 0], cam_dirs[..., 1], **distortion_params,
                                                xnp=torch)
        cam_dirs = torch.stack([x, y, torch.ones_like(x)], -1)

    if camtype == ProjectionType.FISHEYE:
        theta = torch.sqrt(cam_dirs[..., 0] ** 2 + cam_dirs[..., 1] ** 2).clamp(max=np.pi)
        positive = theta > 0
        # sin(theta) / theta, with its limit 1 at the principal point (the reference gives NaN there).
        sinc = torch.where(positive, torch.sin(theta) / torch.where(positive, theta, 1.), 1.)
        cam_dirs = torch.stack([cam_dirs[..., 0] * sinc, cam_dirs[..., 1] * sinc, torch.cos(theta)], -1)
    elif camtype == ProjectionType.PANO:
        lon, colat = cam_dirs[..., 0], cam_dirs[..., 1]
        # OpenCV axes (y down, z forward); the flip below makes them OpenGL.
        cam_dirs = torch.stack([-torch.sin(colat) * torch.sin(lon), -torch.cos(colat),
                                -torch.sin(colat) * torch.cos(lon)], -1)

    cam_dirs = _flip_yz(cam_dirs)
    imageplane = cam_dirs[0, ..., :2]

    world_dirs = _mat_vec(camtoworlds[..., :3, :3], cam_dirs)
    directions, dirs_right, dirs_down = world_dirs.unbind(0)
    origins = camtoworlds[..., :3, -1].expand(directions.shape)
    viewdirs = directions / torch.linalg.norm(directions, dim=-1, keepdim=True)

    if pixtocam_ndc is None:
        right, down, centre = dirs_right, dirs_down, directions
    else:
        right, _ = convert_to_ndc(origins, dirs_right, pixtocam_ndc, xnp=torch)
        down, _ = convert_to_ndc(origins, dirs_down, pixtocam_ndc, xnp=torch)
        origins, directions = convert_to_ndc(origins, directions, pixtocam_ndc, xnp=torch)
        centre = origins
    radii = _cone_radii(torch.linalg.norm(right - centre, dim=-1), torch.linalg.norm(down - centre, dim=-1))
    return origins, directions, viewdirs, radii, imageplane


def _cone_radii(dist_right: torch.Tensor, dist_down: torch.Tensor) -> torch.Tensor:
    """SH + [1]: the mean neighbour distance scaled to the std of a uniform pixel footprint (1/sqrt(12)), x 2."""
    return (0.5 * (dist_right + dist_down))[..., None] * (2. / np.sqrt(12.))


@_torch_rays()
def points_to_pixels(points: _Array,
                     pixtocams: _Array,
                     camtoworlds: _Array,
                     distortion_params: Optional[Mapping[str, Any]] = None,
                     camtype: ProjectionType = ProjectionType.PERSPECTIVE,
                     xnp: types.ModuleType = np) -> Tuple[_Array, _Array]:
    """Projects world points into pixels: the inverse of `pixels_to_rays` (perspective and fisheye).

    Args:
        points: [..., 3] world points.
        pixtocams: [..., 3, 3] inverse intrinsics.
        camtoworlds: [..., 3, 4] OpenGL camera-to-worlds.
        distortion_params: optional k1..k4, p1, p2 (fisheye uses k1..k4).
        camtype: PERSPECTIVE or FISHEYE.
        xnp: numpy or torch (the kind of arrays returned; tensor inputs give tensors).

    Returns:
        coordinates: [..., 2] continuous pixel coordinates, with pixel (i, j)'s centre at (i, j)
            (i.e. the +0.5 offset of `pixels_to_rays` removed, as the later reference's function does).
        depth: [...] depth of the points along the camera's -z axis.
    """
    if camtype not in (ProjectionType.PERSPECTIVE, ProjectionType.FISHEYE):
        raise ValueError(f'points_to_pixels supports PERSPECTIVE and FISHEYE cameras, not {camtype}.')
    params = dict(distortion_params or {})
    rot = camtoworlds[..., :3, :3]
    rel = points - camtoworlds[..., :3, 3]
    cam = (rot * rel[..., :, None]).sum(-2)  # R^T (p - c), OpenGL camera axes.
    depth = -cam[..., 2]
    cam_cv = _flip_yz(cam)
    if camtype == ProjectionType.FISHEYE:
        radial = {k: v for k, v in params.items() if k in ('k1', 'k2', 'k3', 'k4')}
        x, y = fisheye_distort_dirs(cam_cv, **radial, xnp=torch)
    else:
        x, y = cam_cv[..., 0] / cam_cv[..., 2], cam_cv[..., 1] / cam_cv[..., 2]
        if params:
            x, y = _radial_and_tangential_distort(x, y, **params)
    camtopix, _ = torch.linalg.inv_ex(pixtocams)  # inv_ex: no host sync to check for singular matrices.
    pix = _mat_vec(camtopix, torch.stack([x, y, torch.ones_like(x)], -1))
    return pix[..., :2] - .5, depth


def _gather_cameras(cameras: Sequence[Any], cam_idx: torch.Tensor) -> Tuple[Any, ...]:
    """Selects each ray's camera parameters: arrays with a leading camera axis are indexed by `cam_idx`."""
    pixtocams, camtoworlds, distortion_params = cameras[0], cameras[1], cameras[2]
    pixtocam_ndc = cameras[3] if len(cameras) > 3 else None
    pick = lambda arr: arr if arr.ndim == 2 else arr[cam_idx]  # noqa: E731
    if distortion_params is not None:
        distortion_params = {k: (v[cam_idx] if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
                             for k, v in distortion_params.items()}
    return pick(pixtocams), pick(camtoworlds), distortion_params, pixtocam_ndc


@_torch_rays('cameras')
def cast_ray_batch(cameras: Tuple[Any, ...],
                   pixels: utils.Pixels,
                   camtype: ProjectionType = ProjectionType.PERSPECTIVE,
                   xnp: types.ModuleType = np) -> utils.Rays:
    """Casts the rays of a batch of pixels.

    Args:
        cameras: (pixtocams, camtoworlds, distortion_params, pixtocam_ndc): [3, 3] or [N, 3, 3] inverse
            intrinsics, [3, 4] or [N, 3, 4] poses, None or a dict of scalars or [N] arrays, None or [3, 3].
            Per-camera entries are selected with `pixels.cam_idx`. Their dtype sets that of the rays.
        pixels: Pixels with fields of any batch shape ([..., 1] for the metadata).
        camtype: ProjectionType.
        xnp: numpy or torch (the kind of arrays returned; tensor inputs give tensors).

    Returns:
        Rays with the computed geometry and the pixels' metadata.
    """
    pixtocams, camtoworlds, distortion_params, pixtocam_ndc = _gather_cameras(cameras,
                                                                              pixels.cam_idx[..., 0].long())
    origins, directions, viewdirs, radii, imageplane = pixels_to_rays(
        pixels.pix_x_int,
        pixels.pix_y_int,
        pixtocams,
        camtoworlds,
        distortion_params=distortion_params,
        pixtocam_ndc=pixtocam_ndc,
        camtype=camtype,
        xnp=torch)
    return utils.Rays(
        origins=origins,
        directions=directions,
        viewdirs=viewdirs,
        radii=radii,
        imageplane=imageplane,
        lossmult=pixels.lossmult,
        near=pixels.near,
        far=pixels.far,
        cam_idx=pixels.cam_idx,
        exposure_idx=pixels.exposure_idx,
        exposure_values=pixels.exposure_values,
    )


def _scalar_fields(shape: Tuple[int, ...], near: float, far: float, like: torch.Tensor) -> dict:
    """lossmult = 1, near, far and cam_idx = 0 broadcast to shape + [1]."""
    full = lambda v, dt: torch.full(shape + (1,), v, dtype=dt, device=like.device)  # noqa: E731
    return {'lossmult': full(1., like.dtype), 'near': full(near, like.dtype), 'far': full(far, like.dtype),
            'cam_idx': full(0, torch.long)}


@_torch_rays()
def cast_pinhole_rays(camtoworld: _Array,
                      height: int,
                      width: int,
                      focal: float,
                      near: float,
                      far: float,
                      xnp: types.ModuleType = np) -> utils.Rays:
    """Rays [height, width] of an undistorted pinhole camera with centred principal point."""
    pix_x, pix_y = _pixel_grid(width, height, camtoworld.device)
    # A 3 x 3 copy to the device once per image (the inverse is computed on the host, as get_pixtocam's).
    pixtocam = get_pixtocam(focal, width, height, xnp=torch).to(camtoworld)
    ray_args = pixels_to_rays(pix_x, pix_y, pixtocam, camtoworld, xnp=torch)
    return utils.Rays(*ray_args, **_scalar_fields(tuple(pix_x.shape), near, far, ray_args[1]))


@_torch_rays()
def cast_spherical_rays(camtoworld: _Array,
                        height: int,
                        width: int,
                        near: float,
                        far: float,
                        xnp: types.ModuleType = np) -> utils.Rays:
    """Rays [height, width] of an equirectangular panorama (longitude along x, colatitude along y).

    As in the reference, the rays are those of the grid corners (theta = 2 pi i / width, phi = pi j / height),
    directions are unit vectors (viewdirs = directions), imageplane is zero and the radii come from the
    differences to the next grid corners.
    """
    grid = dict(dtype=camtoworld.dtype, device=camtoworld.device)
    theta, phi = torch.meshgrid(torch.linspace(0, 2 * np.pi, width + 1, **grid),
                                torch.linspace(0, np.pi, height + 1, **grid), indexing='xy')
    # OpenGL camera axes: y is up, the panorama starts at +z (behind) and turns towards -x.
    dirs = torch.stack([-torch.sin(phi) * torch.sin(theta), torch.cos(phi), torch.sin(phi) * torch.cos(theta)],
                       -1)
    dirs = _mat_vec(camtoworld[:3, :3], dirs)
    step_down = dirs[1:, :-1] - dirs[:-1, :-1]
    step_right = dirs[:-1, 1:] - dirs[:-1, :-1]
    directions = dirs[:-1, :-1]
    origins = camtoworld[:3, -1].expand(directions.shape)
    radii = _cone_radii(torch.linalg.norm(step_right, dim=-1), torch.linalg.norm(step_down, dim=-1))
    fields = _scalar_fields(tuple(directions.shape[:-1]), near, far, directions)
    return utils.Rays(origins, directions, directions, radii, torch.zeros_like(directions[..., :2]), **fields)
