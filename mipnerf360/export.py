"""Point clouds and meshes from a trained model (the reference has no export; this goes beyond it).

Symbols used throughout:
  view: one rendered (or ground-truth) training image as a `DepthView`: per-pixel ray origins `o` and unnormalised
      directions `d` (unit camera-space z for perspective cameras, as the datasets make them), the distance `t`
      along `d` (the model's `distance_median`), so the surface point is `o + t d`, its colour and opacity `acc`.
  bbox: `(lo, hi)` corners `[3]` of an axis-aligned box in the model's normalised world frame; every grid and
      every size parameter (voxel sizes, truncation) lives in that frame. `default_bbox` is the box around the
      point the training cameras look at.
  frame: where the result is written. 'input' (default) maps it back to the frame of the input files (e.g. the
      COLMAP frame of `sparse/0`) with the inverse of `Scene.world_transform`, so it lines up with the user's poses;
      'normalized' keeps the model's frame.

Methods:
  point cloud: back-project every training pixel whose accumulated opacity is at least `min_acc` (nerfstudio's
      `ns-export pointcloud` keeps opacity > 0.5 and then crops to a box; we default to 0.9 and crop to `bbox`),
      optionally averaged per voxel of `voxel_size`.
  mesh 'tsdf': truncated signed distance fusion of the rendered depth maps (distances along each pixel's ray,
      truncated at `trunc`, averaged over views) on a grid over `bbox`, colours fused from the rendered images,
      then marching cubes (scikit-image) at level 0.
  mesh 'density': marching cubes on the NeRF MLP's density sampled on the grid at `density_threshold`: each voxel
      is queried as a Gaussian at its centre with the voxel's own (uniform box) covariance `h^2 / 12 I`, through
      the MLP's warp (the scene contraction), as the model queries its samples. The density's scale depends on
      the model (a tiny model's peaks at 3-50, the paper's at thousands), so by default the level comes from the
      model itself (`surface_density_level`): the median density at the points where the training views' rays
      reach an accumulated opacity of 0.5 (their rendered median distance), so the surface passes where the
      renderings put it. Fixed levels elsewhere: instant-ngp 2.5, torch-ngp 10, nerf_pl 20 (each for its own
      density scale); threestudio's 'auto' takes the mean of the grid's non-zero density.

Memory: grids are processed in chunks of voxels on the device and kept on the host (a 512^3 TSDF grid needs
about 1.5 GB of host memory, the density grid 0.5 GB); views are rendered one at a time, and the TSDF keeps each
view's distance map and 8-bit colours on the device (5 bytes per pixel).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import tqdm

from mipnerf360 import camera_utils, configs, models, utils

FRAMES = ('input', 'normalized')
METHODS = ('tsdf', 'density')

BBox = Tuple[np.ndarray, np.ndarray]


class ExportError(configs.ConfigError):
    """A user-fixable problem with the export settings (the message names the option and the fix)."""


@dataclasses.dataclass
class DepthView:
    """One view's rays and rendering (host numpy).

    origins, directions: [H, W, 3] rays (directions unnormalised); distance: [H, W] t along `directions`;
    rgb: [H, W, 3] in [0, 1]; acc: [H, W] accumulated opacity (None: all opaque); normals: [H, W, 3] or None;
    camtoworld: [3, 4] OpenGL, pixtocam: [3, 3], distortion: dict of k1..k4, p1, p2 or None, camtype: the
    projection (these four are what the TSDF fusion projects voxels with).
    """
    origins: np.ndarray
    directions: np.ndarray
    distance: np.ndarray
    rgb: np.ndarray
    camtoworld: np.ndarray
    pixtocam: np.ndarray
    acc: Optional[np.ndarray] = None
    normals: Optional[np.ndarray] = None
    distortion: Optional[Dict[str, float]] = None
    camtype: camera_utils.ProjectionType = camera_utils.ProjectionType.PERSPECTIVE

    def valid(self, min_acc: float) -> np.ndarray:
        """[H, W] pixels with a finite distance and an opacity of at least `min_acc`."""
        ok = np.isfinite(self.distance)
        return ok if self.acc is None else ok & (self.acc >= min_acc)


@dataclasses.dataclass
class PointCloud:
    points: np.ndarray  # [n, 3] float
    colors: np.ndarray  # [n, 3] uint8
    normals: Optional[np.ndarray] = None  # [n, 3] unit


@dataclasses.dataclass
class Mesh:
    vertices: np.ndarray  # [v, 3]
    faces: np.ndarray  # [f, 3] int, counter-clockwise seen from outside
    colors: np.ndarray  # [v, 3] uint8
    normals: Optional[np.ndarray] = None  # [v, 3] unit, outward


# ---------------------------------------------------------------------------------------------------------------
# Boxes, grids and frames.


def default_bbox(camtoworlds: np.ndarray) -> BBox:
    """The cube around the point the cameras look at (`camera_utils.focus_point_fn`), of half-size half the
    median camera distance to it: for 360 scenes (cameras in [-1, 1]^3) a box of half-size ~0.5, well inside the
    contraction's linear region, holding the central object."""
    camtoworlds = np.asarray(camtoworlds, np.float64)
    focus = camera_utils.focus_point_fn(camtoworlds)
    half = 0.5 * float(np.median(np.linalg.norm(camtoworlds[:, :3, 3] - focus, axis=-1)))
    return focus - half, focus + half


def check_bbox(bbox: Sequence[float]) -> BBox:
    """(lo, hi) from six numbers x0, y0, z0, x1, y1, z1 (ExportError unless lo < hi on every axis)."""
    vals = np.asarray(bbox, np.float64).reshape(-1)
    if vals.shape != (6,) or not np.all(np.isfinite(vals)) or not np.all(vals[:3] < vals[3:]):
        raise ExportError(f'--bbox = {list(np.asarray(bbox).reshape(-1))} is not a box; give six numbers '
                          'x0,y0,z0,x1,y1,z1 with x0 < x1, y0 < y1, z0 < z1 (in the normalised frame).')
    return vals[:3], vals[3:]


@dataclasses.dataclass
class Grid:
    """Voxel centres lo + (ijk + 0.5) h for ijk in [0, shape)."""
    lo: np.ndarray
    h: float
    shape: Tuple[int, int, int]

    @classmethod
    def over(cls, bbox: BBox, resolution: int) -> 'Grid':
        """`resolution` voxels along the longest side of `bbox`, cubic voxels."""
        if int(resolution) < 2:
            raise ExportError(f'--resolution = {resolution} is too small; use at least 2 (e.g. 256).')
        lo, hi = (np.asarray(b, np.float64) for b in bbox)
        h = float((hi - lo).max()) / int(resolution)
        shape = tuple(int(max(2, np.ceil((s - 1e-9 * h) / h))) for s in hi - lo)
        return cls(lo=lo, h=h, shape=shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def centres(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """[stop - start, 3] float32 centres of the voxels with flat (C-order) indices start..stop-1."""
        idx = torch.arange(start, stop, device=device)
        nx, ny, nz = self.shape
        ijk = torch.stack([idx // (ny * nz), (idx // nz) % ny, idx % nz], -1)
        lo = torch.as_tensor(self.lo, dtype=torch.float32, device=device)
        return lo + (ijk.to(torch.float32) + 0.5) * self.h

    def to_world(self, ijk: np.ndarray) -> np.ndarray:
        return self.lo + (np.asarray(ijk, np.float64) + 0.5) * self.h


def _chunks(n: int, chunk: int, desc: str, progress: bool):
    starts = range(0, n, chunk)
    return tqdm.tqdm(starts, desc=desc, unit='chunk', disable=not progress, leave=False)


def frame_transform(world_transform: np.ndarray, frame: str) -> np.ndarray:
    """[4, 4] map from the normalised frame to `frame`: inv(world_transform) for 'input', identity else."""
    if frame not in FRAMES:
        raise ExportError(f'--frame = {frame!r} is not one of {list(FRAMES)}; use input (the data\'s own frame) '
                          'or normalized (the model\'s).')
    return np.linalg.inv(np.asarray(world_transform, np.float64)) if frame == 'input' else np.eye(4)


def _apply(transform: np.ndarray, points: np.ndarray, normals: Optional[np.ndarray]):
    points = points @ transform[:3, :3].T + transform[:3, 3]
    if normals is not None:
        normals = normals @ np.linalg.inv(transform[:3, :3])  # Inverse transpose: normals stay normal.
        normals = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    return points, normals


def transform_point_cloud(cloud: PointCloud, transform: np.ndarray) -> PointCloud:
    points, normals = _apply(transform, cloud.points, cloud.normals)
    return PointCloud(points=points, colors=cloud.colors, normals=normals)


def transform_mesh(mesh: Mesh, transform: np.ndarray) -> Mesh:
    vertices, normals = _apply(transform, mesh.vertices, mesh.normals)
    faces = mesh.faces if np.linalg.det(transform[:3, :3]) > 0 else mesh.faces[:, ::-1]  # A mirror flips them.
    return Mesh(vertices=vertices, faces=np.ascontiguousarray(faces), colors=mesh.colors, normals=normals)


# ---------------------------------------------------------------------------------------------------------------
# Rendering the training views.


def render_views(model: torch.nn.Module, sampler: Any, config: Any, train_frac: float = 1.,
                 progress: bool = True, indices: Optional[Sequence[int]] = None) -> Iterator[DepthView]:
    """Renders the images of `sampler` (a `datasets.RaySampler`, usually of the training split), or those at
    `indices`, one at a time with `models.render_image`: rgb, acc, distance_median (and normals when the model
    predicts them). A generator, so that `point_cloud` and `tsdf_fusion` hold one view on the host at a time."""
    scene = sampler.scene
    if scene.pixtocam_ndc is not None:
        raise ExportError('Export does not support NDC scenes (Config.forward_facing = True): their model lives '
                          'in NDC space; train without forward_facing to export geometry.')
    render_fn = functools.partial(model, train_frac=train_frac, compute_extras=True)
    was_training = model.training
    model.eval()
    try:
        indices = range(sampler.size) if indices is None else list(indices)
        for i in tqdm.tqdm(indices, desc='Rendering views', unit='view', disable=not progress):
            rays = sampler.generate_ray_batch(i).rays
            out = models.render_image(render_fn, rays, None, config)
            normals = out.get('normals_pred', out.get('normals'))
            yield DepthView(
                origins=rays.origins.cpu().numpy(), directions=rays.directions.cpu().numpy(),
                distance=out['distance_median'].numpy(), rgb=out['rgb'].numpy(), acc=out['acc'].numpy(),
                normals=None if normals is None else normals.numpy(),
                camtoworld=np.asarray(scene.camtoworlds[i]), pixtocam=np.asarray(scene.pixtocams[i]),
                distortion=_camera_distortion(scene.distortion_params, i), camtype=scene.camtype)
    finally:
        model.train(was_training)


def _camera_distortion(params: Optional[Dict[str, Any]], i: int) -> Optional[Dict[str, float]]:
    if params is None:
        return None
    return {k: float(np.asarray(v).reshape(-1)[i]) if np.ndim(v) else float(v) for k, v in params.items()}


# ---------------------------------------------------------------------------------------------------------------
# Point clouds.


def check_min_acc(min_acc: float):
    if not 0. <= min_acc <= 1.:
        raise ExportError(f'--min_acc = {min_acc} must lie in [0, 1] (e.g. 0.9).')


def _in_box(points: np.ndarray, bbox: Optional[BBox]) -> np.ndarray:
    if bbox is None:
        return np.ones(points.shape[:-1], bool)
    return np.all((points >= bbox[0]) & (points <= bbox[1]), axis=-1)


def backproject(view: DepthView, min_acc: float = 0.9, bbox: Optional[BBox] = None) -> PointCloud:
    """The surface points o + t d of the view's pixels with opacity >= `min_acc`, inside `bbox` if given."""
    keep = view.valid(min_acc)
    points = view.origins[keep] + view.distance[keep][:, None] * view.directions[keep]
    inside = _in_box(points, bbox)
    normals = None
    if view.normals is not None:
        n = view.normals[keep][inside]
        normals = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return PointCloud(points=points[inside], colors=utils.to_uint8(view.rgb[keep][inside]), normals=normals)


def voxel_downsample(cloud: PointCloud, voxel_size: float) -> PointCloud:
    """One point per occupied voxel of edge `voxel_size`: the mean position, colour and (renormalised) normal."""
    if not voxel_size > 0:
        raise ExportError(f'--voxel_size = {voxel_size} must be positive (or 0 to keep every point).')
    if not len(cloud.points):
        return cloud
    keys = np.floor(cloud.points / voxel_size).astype(np.int64)
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    mean = lambda x: np.stack([np.bincount(inverse, weights=x[:, c]) for c in range(x.shape[1])], -1) / \
        counts[:, None]  # noqa: E731
    normals = None
    if cloud.normals is not None:
        normals = mean(cloud.normals)
        normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    return PointCloud(points=mean(cloud.points), colors=utils.to_uint8(mean(cloud.colors.astype(np.float64)) / 255.),
                      normals=normals)


def point_cloud(views: Iterable[DepthView], min_acc: float = 0.9, bbox: Optional[BBox] = None,
                voxel_size: Optional[float] = None) -> PointCloud:
    """The back-projected points of all `views` (see `backproject`), voxel-downsampled when `voxel_size`."""
    check_min_acc(min_acc)
    clouds = [backproject(v, min_acc, bbox) for v in views]
    with_normals = all(c.normals is not None for c in clouds)
    cloud = PointCloud(points=np.concatenate([c.points for c in clouds]),
                       colors=np.concatenate([c.colors for c in clouds]),
                       normals=np.concatenate([c.normals for c in clouds]) if with_normals else None)
    if not len(cloud.points):
        raise ExportError(f'No pixel has opacity >= --min_acc = {min_acc} with its surface inside the box '
                          f'{format_bbox(bbox)}; lower --min_acc or widen --bbox.')
    return voxel_downsample(cloud, voxel_size) if voxel_size else cloud


def format_bbox(bbox: Optional[BBox]) -> str:
    """'x0,y0,z0,x1,y1,z1' (the --bbox syntax)."""
    if bbox is None:
        return '(none)'
    return ','.join(f'{v:.4g}' for v in np.concatenate(bbox))


# ---------------------------------------------------------------------------------------------------------------
# Meshes.


@dataclasses.dataclass
class TSDFVolume:
    grid: Grid
    tsdf: np.ndarray  # shape, in [-1, 1]; 1 where unobserved
    weight: np.ndarray  # shape, number of views that observed each voxel
    colors: np.ndarray  # shape + (3,) uint8, fused colour of voxels near the surface


def tsdf_fusion(views: Iterable[DepthView], bbox: BBox, resolution: int = 256, trunc: Optional[float] = None,
                min_acc: float = 0.9, device: Any = 'cpu', chunk: int = 1 << 20,
                progress: bool = True) -> TSDFVolume:
    """Fuses the views' depth into a truncated signed distance grid over `bbox`.

    Each voxel centre p is projected into each view (`camera_utils.points_to_pixels`, nearest pixel); the signed
    distance along that pixel's ray is sdf = t |d| - |p - o| (positive in front of the surface). Views where
    sdf < -trunc (far behind the surface, unseen) or the pixel is invalid (opacity < min_acc) are skipped; the
    TSDF is the mean of clip(sdf / trunc, max=1) over the other views, the colour the mean colour of the views
    with |sdf| < trunc. `trunc` defaults to 3 voxels.
    """
    check_min_acc(min_acc)
    grid = Grid.over(bbox, resolution)
    trunc = 3. * grid.h if trunc is None else float(trunc)
    if not trunc > 0:
        raise ExportError(f'The TSDF truncation distance {trunc} must be positive.')
    device = torch.device(device)
    dev_views = [_view_on_device(v, min_acc, device) for v in views]
    tsdf = np.ones(grid.size, np.float32)
    weight = np.zeros(grid.size, np.float32)
    colors = np.zeros((grid.size, 3), np.uint8)
    for start in _chunks(grid.size, chunk, 'TSDF fusion', progress):
        stop = min(start + chunk, grid.size)
        p = grid.centres(start, stop, device)
        t_sum = torch.zeros(len(p), device=device)
        w_sum = torch.zeros(len(p), device=device)
        c_sum = torch.zeros(len(p), 3, device=device)
        cw_sum = torch.zeros(len(p), device=device)
        for v in dev_views:
            pix, z = camera_utils.points_to_pixels(p, v['pixtocam'], v['camtoworld'], v['distortion'], v['camtype'],
                                                   xnp=torch)
            col, row = torch.round(pix[:, 0]).long(), torch.round(pix[:, 1]).long()
            h, w = v['range'].shape
            inside = (z > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
            flat = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1))
            rng = v['range'].reshape(-1)[flat]
            sdf = rng - torch.linalg.norm(p - v['origin'], dim=-1)
            ok = inside & torch.isfinite(sdf) & (sdf >= -trunc)
            sdf = torch.where(ok, sdf, torch.zeros_like(sdf))
            t_sum += torch.where(ok, torch.clamp(sdf / trunc, max=1.), torch.zeros_like(sdf))
            w_sum += ok.float()
            near = (ok & (sdf.abs() < trunc)).float()
            c_sum += near[:, None] * v['rgb'].reshape(-1, 3)[flat].float()
            cw_sum += near
        seen = w_sum > 0
        tsdf[start:stop] = torch.where(seen, t_sum / w_sum.clamp(min=1), torch.ones_like(t_sum)).cpu().numpy()
        weight[start:stop] = w_sum.cpu().numpy()
        colors[start:stop] = torch.round(c_sum / cw_sum.clamp(min=1)[:, None]).clamp(0, 255).to(
            torch.uint8).cpu().numpy()
    return TSDFVolume(grid=grid, tsdf=tsdf.reshape(grid.shape), weight=weight.reshape(grid.shape),
                      colors=colors.reshape(grid.shape + (3,)))


def _view_on_device(view: DepthView, min_acc: float, device: torch.device) -> Dict[str, Any]:
    """What fusion needs of a view, on `device`: the Euclidean range t |d| per pixel (NaN where invalid) and
    the 8-bit colours (5 bytes per pixel in all)."""
    rng = view.distance * np.linalg.norm(view.directions, axis=-1)
    rng = np.where(view.valid(min_acc), rng, np.nan)
    f32 = lambda x: torch.as_tensor(np.asarray(x, np.float32), device=device)  # noqa: E731
    return {'range': f32(rng), 'rgb': torch.as_tensor(utils.to_uint8(view.rgb), device=device),
            'origin': f32(view.camtoworld[:3, 3]), 'pixtocam': f32(view.pixtocam), 'camtoworld': f32(view.camtoworld[:3, :4]),
            'distortion': view.distortion, 'camtype': view.camtype}


def require_skimage():
    """ExportError unless scikit-image (marching cubes) is installed."""
    try:
        import skimage  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
    except ImportError:
        raise ExportError("Mesh export needs scikit-image for marching cubes; pip install 'mipnerf360[export]' "
                          '(or scikit-image).') from None


def _marching_cubes(volume: np.ndarray, level: float, grid: Grid, observed: Optional[np.ndarray] = None):
    """Vertices (world), faces and outward normals of the `level` set of `volume` (negative inside).

    With `observed` (a boolean grid), crossings on grid edges with an unobserved end are dropped with their
    faces: they are the boundary of what was seen, not a surface (scikit-image's own `mask` keeps cubes with
    some unobserved corners).
    """
    require_skimage()
    from skimage import measure  # pylint: disable=import-outside-toplevel
    if not (volume.min() < level < volume.max()):
        raise ExportError(f'The field does not cross the level {level} inside the box (values '
                          f'{volume.min():.3g}..{volume.max():.3g}); widen --bbox or change the threshold.')
    verts, faces, normals, _ = measure.marching_cubes(volume, level)
    if observed is not None:
        # Each vertex lies on a grid edge: its end points are the floor and ceiling of its index coordinates.
        top = np.array(volume.shape) - 1
        ends = [np.clip(f(verts).astype(np.int64), 0, top) for f in (np.floor, np.ceil)]
        ok = np.logical_and(*(observed[e[:, 0], e[:, 1], e[:, 2]] for e in ends))
        faces = faces[ok[faces].all(-1)]
        used = np.unique(faces)
        remap = np.full(len(verts), -1, np.int64)
        remap[used] = np.arange(len(used))
        verts, normals, faces = verts[used], normals[used], remap[faces]
        if not len(faces):
            raise ExportError('No surface was found where the views overlap; widen --bbox or lower --min_acc.')
    # skimage's normals point down the gradient, i.e. inwards for a field that is negative inside.
    return grid.to_world(verts), faces.astype(np.int64), -normals


def mesh_from_tsdf(volume: TSDFVolume) -> Mesh:
    """Marching cubes at TSDF level 0 between observed voxels; vertex colours from the nearest fused voxel."""
    vertices, faces, normals = _marching_cubes(volume.tsdf, 0., volume.grid, observed=volume.weight > 0)
    ijk = np.clip(np.round((vertices - volume.grid.lo) / volume.grid.h - 0.5).astype(np.int64), 0,
                  np.array(volume.grid.shape) - 1)
    colors = volume.colors[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    return Mesh(vertices=vertices, faces=faces, colors=colors, normals=normals)


def _voxel_gaussians(means: torch.Tensor, h: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """A voxel of edge h as a Gaussian: its centre and the covariance of the uniform distribution on it."""
    cov = torch.eye(3, dtype=means.dtype, device=means.device) * (h * h / 12.)
    return means, cov.expand(means.shape[:-1] + (3, 3))


def _density(mlp: torch.nn.Module, means: torch.Tensor, h: float) -> np.ndarray:
    """The MLP's density (after its activation) at `means` [n, 3], each queried as a voxel of edge h."""
    raw, _ = mlp.predict_density(*_voxel_gaussians(means, h), None)
    return mlp.density_activation(raw + mlp.density_bias).float().cpu().numpy()


def density_grid(mlp: torch.nn.Module, bbox: BBox, resolution: int = 256, chunk: int = 1 << 16,
                 progress: bool = True) -> Tuple[Grid, np.ndarray]:
    """The MLP's density (after its activation) at the voxel centres of the grid over `bbox`."""
    grid = Grid.over(bbox, resolution)
    device = next(mlp.parameters()).device
    out = np.empty(grid.size, np.float32)
    with torch.no_grad():
        for start in _chunks(grid.size, chunk, 'Density grid', progress):
            stop = min(start + chunk, grid.size)
            out[start:stop] = _density(mlp, grid.centres(start, stop, device), grid.h)
    return grid, out.reshape(grid.shape)


AUTO_LEVEL_VIEWS = 8  # Training views rendered to pick the density level (evenly spaced).


def auto_level_views(num_views: int) -> np.ndarray:
    """Indices of the (at most AUTO_LEVEL_VIEWS, evenly spaced) views `surface_density_level` is given."""
    return np.unique(np.linspace(0, num_views - 1, min(num_views, AUTO_LEVEL_VIEWS)).round().astype(np.int64))


def surface_density_level(mlp: torch.nn.Module, views: Iterable[DepthView], h: float, min_acc: float = 0.9,
                          bbox: Optional[BBox] = None, chunk: int = 1 << 16) -> float:
    """The density iso-level of the rendered surface: the median, over the views' pixels with opacity >=
    `min_acc` whose surface point lies in `bbox`, of the MLP's density (queried as a voxel of edge `h`, as
    `density_grid` does) at the point `o + t d` where the ray's accumulated opacity reaches 0.5 (t: the rendered
    median distance). A density mesh at this level passes through the surface the renderings show."""
    try:
        points = point_cloud(views, min_acc, bbox).points
    except ExportError as e:
        raise ExportError(f'{e} (Or set --density_threshold.)') from None
    device = next(mlp.parameters()).device
    with torch.no_grad():
        density = np.concatenate([_density(mlp, torch.as_tensor(points[i:i + chunk], dtype=torch.float32,
                                                                 device=device), h)
                                  for i in range(0, len(points), chunk)])
    return float(np.median(density))


def mlp_colors(mlp: torch.nn.Module, vertices: np.ndarray, normals: np.ndarray, h: float,
               chunk: int = 1 << 16) -> np.ndarray:
    """[v, 3] uint8: the MLP's colour at each vertex seen head-on (view direction = -normal), zero GLO code."""
    device = next(mlp.parameters()).device
    f32 = lambda x: torch.as_tensor(np.asarray(x, np.float32), device=device)  # noqa: E731
    out = np.zeros((len(vertices), 3), np.uint8)
    if mlp.disable_rgb:
        return out
    with torch.no_grad():
        for start in range(0, len(vertices), chunk):
            means, covs = _voxel_gaussians(f32(vertices[start:start + chunk]), h)
            viewdirs = -f32(normals[start:start + chunk]) if mlp.use_viewdirs else None
            glo = None
            if mlp.num_glo_features:
                glo = torch.zeros(len(means), mlp.num_glo_features, device=device)
            res = mlp(None, (means[:, None], covs[:, None]), viewdirs=viewdirs, glo_vec=glo)
            out[start:start + chunk] = utils.to_uint8(res['rgb'][:, 0, :3].float().cpu().numpy())
    return out


def mesh_from_density(mlp: torch.nn.Module, bbox: BBox, resolution: int = 256, threshold: float = 50.,
                      chunk: int = 1 << 16, progress: bool = True) -> Mesh:
    """Marching cubes on the MLP's density at `threshold`; vertex colours from the MLP (`mlp_colors`)."""
    if not threshold > 0:
        raise ExportError(f'--density_threshold = {threshold} must be positive (or leave it unset to take the '
                          'level from the rendered surface).')
    grid, density = density_grid(mlp, bbox, resolution, chunk, progress)
    if not density.min() < threshold < density.max():
        raise ExportError(f'The density in the box ranges over {density.min():.3g}..{density.max():.3g} and never '
                          f'crosses --density_threshold = {threshold:g}; set it inside that range (e.g. '
                          f'{float(np.percentile(density, 99)):.3g}) or change --bbox.')
    vertices, faces, normals = _marching_cubes(-density, -float(threshold), grid)
    return Mesh(vertices=vertices, faces=faces, colors=mlp_colors(mlp, vertices, normals, grid.h, chunk),
                normals=normals)


# ---------------------------------------------------------------------------------------------------------------
# PLY.


def write_ply(path: str, points: np.ndarray, colors: np.ndarray, normals: Optional[np.ndarray] = None,
              faces: Optional[np.ndarray] = None):
    """Writes a binary little-endian PLY: float x, y, z (and nx, ny, nz), uchar red, green, blue per vertex, and
    `faces` [f, 3] as uchar-counted int lists. Written to a temporary file and renamed (never half a file)."""
    fields = [('x', '<f4'), ('y', '<f4'), ('z', '<f4')]
    if normals is not None:
        fields += [('nx', '<f4'), ('ny', '<f4'), ('nz', '<f4')]
    fields += [('red', 'u1'), ('green', 'u1'), ('blue', 'u1')]
    vertex = np.empty(len(points), dtype=fields)
    for i, name in enumerate('xyz'):
        vertex[name] = points[:, i]
        if normals is not None:
            vertex['n' + name] = normals[:, i]
    for i, name in enumerate(('red', 'green', 'blue')):
        vertex[name] = colors[:, i]
    header = ['ply', 'format binary_little_endian 1.0', 'comment written by mipnerf360.export',
              f'element vertex {len(points)}']
    header += [f'property {"float" if t == "<f4" else "uchar"} {name}' for name, t in fields]
    face = None
    if faces is not None:
        header += [f'element face {len(faces)}', 'property list uchar int vertex_indices']
        face = np.empty(len(faces), dtype=[('n', 'u1'), ('v', '<i4', (3,))])
        face['n'] = 3
        face['v'] = faces
    header.append('end_header')

    def save(tmp):
        with open(tmp, 'wb') as f:
            f.write(('\n'.join(header) + '\n').encode('ascii'))
            f.write(vertex.tobytes())
            if face is not None:
                f.write(face.tobytes())
    utils._atomic_save(path, save)  # pylint: disable=protected-access


def write_point_cloud(path: str, cloud: PointCloud):
    write_ply(path, cloud.points, cloud.colors, cloud.normals)


def write_mesh(path: str, mesh: Mesh):
    write_ply(path, mesh.vertices, mesh.colors, mesh.normals, mesh.faces)


if __name__ == '__main__':
    from mipnerf360.cli import export as _cli  # pylint: disable=import-outside-toplevel
    __doc__ = _cli.__doc__  # What --help prints: the command's usage.
    _cli.run()
