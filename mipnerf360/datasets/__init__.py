"""Datasets: files -> `Scene` (host-side numpy, `load_scene`) -> `RaySampler` (rays on the model's device).

`load_scene(config, split)` picks the loader named by `Config.dataset_loader`: 'blender', 'llff' (COLMAP
`sparse/0` + `images/` + `images_N/`, the mip-NeRF 360 layout; else transforms.json; else LLFF's
poses_bounds.npy), 'nerfstudio' (transforms.json with per-frame intrinsics), 'tat_nerfpp', 'tat_fvs' and 'dtu',
one module each. `RaySampler(scene, config, device, rank, world_size)` serves training batches (a pure function
of (seed, step, rank)) and whole images; `Prefetcher(sampler)` runs it ahead in a thread for training.

Render paths: LLFF 360 scenes get `generate_ellipse_path` (or a spline through `Config.render_spline_keyframes`),
forward-facing scenes `generate_spiral_path`, FVS an ellipse, NeRF++ its `camera_path/`, and, unlike the
reference, Blender scenes a circular orbit (`generate_orbit_path`) at the test cameras' distance and elevation;
`Config.render_path_file` (.npy of poses or a nerfstudio camera_path.json) overrides any of them.
"""

from mipnerf360.datasets.blender import generate_orbit_path, load_blender, load_blender_posedata
from mipnerf360.datasets.dtu import load_dtu
from mipnerf360.datasets.llff import load_llff, load_poses_bounds
from mipnerf360.datasets.nerfstudio import load_nerfstudio
from mipnerf360.datasets.prefetch import Prefetcher
from mipnerf360.datasets.sampler import RaySampler
from mipnerf360.datasets.scene import (IMAGE_EXTENSIONS, DatasetError, DatasetNotFoundError, Scene, downsample,
                                       image_as_float, load_render_path_file, load_rgb, load_scene)
from mipnerf360.datasets.tanks_temples import load_fvs, load_nerfpp

__all__ = [
        'IMAGE_EXTENSIONS', 'DatasetError', 'DatasetNotFoundError', 'Prefetcher', 'RaySampler', 'Scene',
        'downsample', 'generate_orbit_path', 'image_as_float', 'load_blender', 'load_blender_posedata',
        'load_dtu', 'load_fvs', 'load_llff', 'load_nerfpp', 'load_nerfstudio', 'load_poses_bounds',
        'load_render_path_file', 'load_rgb', 'load_scene',
]
