"""Datasets: load images and cameras from disk and serve batches of rays on the model's device.

`load_dataset(split, train_dir, config, device=..., rank=..., world_size=...)` picks the loader named by
`Config.dataset_loader`: 'blender', 'llff' (COLMAP `sparse/0` + `images/` + `images_N/`, the mip-NeRF 360
layout; else transforms.json; else LLFF's poses_bounds.npy), 'nerfstudio' (transforms.json with per-frame
intrinsics), 'tat_nerfpp', 'tat_fvs' and 'dtu'.

Design (the reference's, with these changes):
- A `Dataset` is a daemon `threading.Thread` filling a `queue.Queue(3)` of batches; `next(dataset)` pops one.
  Training batches are a pure function of `(config.seed, step, rank)` (`get_train_batch(step)` seeds a
  `torch.Generator` from those three numbers), so a resumed run sees exactly the batches of an uninterrupted
  one. The thread starts lazily on the first `next()` / `iter()` and produces steps `start_step, start_step+1,
  ...`; pass `start_step=` to the constructor or call `set_start_step(step)` before the first `next()` to
  resume. A trainer may as well skip the thread and call `get_train_batch(step)` itself.
- Images live on `device` as float32 tensors, pixel indices are drawn there, and rays are cast there by
  `camera_utils.pixels_to_rays(..., xnp=torch)`: batches come out already on the device. With
  `Config.cast_rays_in_train_step` the training batches hold `utils.Pixels` instead of `utils.Rays`.
- Every image has its own inverse intrinsics (`pixtocams` `[N, 3, 3]`) and size (`widths`, `heights` `[N]`),
  so scenes with several cameras work. 'all_images' batching draws pixels uniformly over all training pixels.
- `images_N` folders whose size differs from the COLMAP size / N by up to one pixel (the official rounded
  folders) are accepted with intrinsics scaled by the actual ratio; larger differences raise.
- Render paths: LLFF 360 scenes get `generate_ellipse_path` (or a spline through
  `Config.render_spline_keyframes`), forward-facing scenes `generate_spiral_path`, FVS an ellipse, NeRF++ its
  `camera_path/`, and, unlike the reference, Blender scenes a circular orbit (`generate_orbit_path`) at the test
  cameras' distance and elevation; `Config.render_path_file` (.npy of poses) overrides any of them.
- User errors raise `DatasetError` (a ValueError; `DatasetNotFoundError` is also a FileNotFoundError) with a
  one-line message naming the path and the fix.
"""

from __future__ import annotations

import abc
import atexit
import glob
import json
import os
import queue
import re
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from mipnerf360 import camera_utils
from mipnerf360 import colmap
from mipnerf360 import configs
from mipnerf360 import utils

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.exr', '.webp')


_LIVE_DATASETS: 'weakref.WeakSet[Dataset]' = weakref.WeakSet()


@atexit.register
def _stop_all_threads():
    """Stops the prefetch threads before the interpreter shuts down (a daemon thread killed in the middle of a
    torch op aborts the process)."""
    for ds in list(_LIVE_DATASETS):
        ds.close()


class DatasetError(ValueError):
    """A problem with the data on disk that the user can fix (the message says how)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A required file or folder of the dataset does not exist."""


def load_dataset(split: str, train_dir: str, config: configs.Config, **kwargs) -> 'Dataset':
    """Loads a split of the dataset named by `config.dataset_loader` (kwargs: device, rank, world_size, ...)."""
    dataset_dict = {
            'blender': Blender,
            'llff': LLFF,
            'nerfstudio': NerfStudio,
            'tat_nerfpp': TanksAndTemplesNerfPP,
            'tat_fvs': TanksAndTemplesFVS,
            'dtu': DTU,
    }
    if config.dataset_loader not in dataset_dict:
        raise DatasetError(f'Unknown Config.dataset_loader {config.dataset_loader!r}; use one of '
                           f'{", ".join(sorted(dataset_dict))}.')
    return dataset_dict[config.dataset_loader](split, train_dir, config, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers.


def _list_images(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise DatasetNotFoundError(f'Image folder {folder} does not exist; put the images there (or run '
                                   '`python -m mipnerf360.colmap DATA_DIR` to make images_2/4/8).')
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))


def _load_rgb(path: str) -> np.ndarray:
    """An 8-bit image as float32 `[H, W, 3]` in [0, 1] (grey is repeated, alpha is dropped)."""
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f'Image file {path} does not exist; check the dataset folder.')
    img = utils.load_img(path)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    scale = 65535. if img.max() > 255. else 255.
    return (img[..., :3] / scale).astype(np.float32)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Area-downsamples `[H, W, ...]` by an integer factor that divides H and W."""
    sh = img.shape
    if sh[0] % factor or sh[1] % factor:
        raise DatasetError(f'Downsampling factor {factor} does not evenly divide image shape {sh[:2]}; '
                           'choose another Config.factor.')
    return img.reshape((sh[0] // factor, factor, sh[1] // factor, factor) + sh[2:]).mean((1, 3))


def _resize_area(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resizes `[H, W, C]` float images to (width, height) with area averaging (exact when it divides)."""
    w, h = size
    if img.shape[1] % w == 0 and img.shape[0] % h == 0 and img.shape[1] // w == img.shape[0] // h:
        return downsample(img, img.shape[1] // w)
    chans = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), 'F').resize((w, h), Image.BOX))
             for c in range(img.shape[-1])]
    return np.stack(chans, -1)


def _seed_for(seed: int, step: int, rank: int) -> int:
    """A 63-bit generator seed that is a pure function of (seed, step, rank)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _scaled_pixtocam(pixtocam: np.ndarray, full_size: Optional[Tuple[int, int]], actual_size: Tuple[int, int],
                     factor: int, path: str) -> np.ndarray:
    """Inverse intrinsics `[3, 3]` for an image of `actual_size` downsampled from `full_size` by ~`factor`."""
    factor = max(factor, 1)
    if full_size is None:
        return pixtocam @ np.diag([factor, factor, 1.])
    (fw, fh), (aw, ah) = full_size, actual_size
    if abs(aw - fw / factor) > 1 or abs(ah - fh / factor) > 1:
        raise DatasetError(f'Image {path} is {aw}x{ah} but the camera is {fw}x{fh}, so factor {factor} expects '
                           f'{fw / factor:g}x{fh / factor:g} (+-1 pixel); regenerate the images_{factor} folder '
                           '(python -m mipnerf360.colmap --help) or fix Config.factor.')
    return pixtocam @ np.diag([fw / aw, fh / ah, 1.])


def load_render_path_file(path: str) -> np.ndarray:
    """Camera-to-worlds `[N, 3, 4]` (OpenGL, this dataset's world) from a `.npy` file of `[N, 3, 4]` or
    `[N, 4, 4]` poses (`Config.render_path_file`)."""
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f'Render path file {path} does not exist; set Config.render_path_file to a '
                                   '.npy file of [N, 3, 4] camera-to-world poses (or None for the automatic '
                                   'path).')
    try:
        poses = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f'Cannot read render path file {path} ({e}); save it with numpy.save(path, poses) '
                           'with poses an [N, 3, 4] float array.') from None
    if poses.ndim != 3 or poses.shape[0] == 0 or poses.shape[1:] not in ((3, 4), (4, 4)):
        raise DatasetError(f'Render path file {path} holds an array of shape {poses.shape}; it must be [N, 3, 4] '
                           '(or [N, 4, 4]) camera-to-world poses with N >= 1.')
    if not np.all(np.isfinite(poses)):
        raise DatasetError(f'Render path file {path} contains NaN or infinite values; regenerate it.')
    return poses[:, :3, :4].astype(np.float64)


def load_poses_bounds(path: str) -> np.ndarray:
    """LLFF's `poses_bounds.npy` as a validated `[N, 17]` float64 array (see `LLFF._load_poses_bounds`)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f'Cannot read {path} ({e}); regenerate it with LLFF\'s imgs2poses.py or delete it '
                           'and use COLMAP (sparse/0).') from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != 17:
        raise DatasetError(f'{path} has shape {arr.shape} but must be [N, 17] (a flattened 3x5 [R | t | hwf] '
                           'pose and near, far bounds per image); regenerate it with LLFF\'s imgs2poses.py.')
    if not np.all(np.isfinite(arr)):
        raise DatasetError(f'{path} contains NaN or infinite values; regenerate it.')
    return arr.astype(np.float64)


def generate_orbit_path(poses: np.ndarray, n_frames: int = 120,
                        center: Optional[np.ndarray] = None) -> np.ndarray:
    """A circular orbit around the scene at the cameras' typical distance and elevation (object captures).

    The up direction is the world axis nearest the cameras' mean up (y) vector (z for Blender scenes); the
    centre is the point nearest all the optical axes (`camera_utils.focus_point_fn`) unless given. The orbit
    keeps the median camera distance to the centre and the median elevation angle above the horizontal plane,
    and starts at the azimuth of the first camera. Every frame looks at the centre with the world up as up.

    Args:
        poses: [N, 3, 4] OpenGL camera-to-worlds.
        n_frames: number of poses returned (evenly spaced azimuths, the last not repeating the first).
        center: optional [3] point to orbit and look at.
    Returns:
        [n_frames, 3, 4] camera-to-worlds.
    """
    poses = np.asarray(poses, np.float64)
    center = camera_utils.focus_point_fn(poses) if center is None else np.asarray(center, np.float64)
    mean_up = poses[:, :3, 1].mean(0)
    axis = int(np.argmax(np.abs(mean_up)))
    up = np.eye(3)[axis] * np.sign(mean_up[axis])
    e1 = np.eye(3)[(axis + 1) % 3] * np.sign(mean_up[axis])
    e2 = np.cross(up, e1)  # (e1, e2, up) is right-handed: azimuth grows counter-clockwise seen from above.
    offsets = poses[:, :3, 3] - center
    dist = np.linalg.norm(offsets, axis=-1)
    radius = np.median(dist)
    elevation = np.median(np.arcsin(np.clip(offsets @ up / dist, -1., 1.)))
    start = np.arctan2(offsets[0] @ e2, offsets[0] @ e1)
    azimuth = start + np.linspace(0., 2. * np.pi, n_frames, endpoint=False)
    horiz = np.cos(azimuth)[:, None] * e1 + np.sin(azimuth)[:, None] * e2
    positions = center + radius * (np.cos(elevation) * horiz + np.sin(elevation) * up)
    return np.stack([camera_utils.viewmatrix(p - center, up, p) for p in positions])


def load_blender_posedata(data_dir: str, split: Optional[str] = None):
    """Reads `transforms{_split}.json` (Blender / instant-NGP / nerfstudio).

    Intrinsics may be shared (top level) or per frame: fl_x, fl_y (or camera_angle_x/_y), cx, cy, w, h,
    camera_model (OPENCV, OPENCV_FISHEYE), k1..k4, p1, p2.
    Returns `(names, poses [N, 3, 4], pixtocams [N, 3, 3], distortion_params, camtype)` where names are the
    frames' file paths relative to `data_dir` (frames whose image is missing are skipped, as the reference
    does), plus as a 6th element the per-frame sizes `[N, 2]` (width, height) or None when unknown.
    """
    suffix = '' if split is None else f'_{split}'
    pose_file = os.path.join(data_dir, f'transforms{suffix}.json')
    if not os.path.isfile(pose_file):
        raise DatasetNotFoundError(f'Camera file {pose_file} does not exist; export the poses with COLMAP '
                                   '(sparse/0) or write a transforms.json.')
    try:
        with open(pose_file, 'r') as fp:
            meta = json.load(fp)
    except json.JSONDecodeError as e:
        raise DatasetError(f'Corrupt json in {pose_file} ({e}); re-export it.') from None
    names, poses, pixtocams, dists, camtypes, sizes = [], [], [], [], [], []
    for frame in meta.get('frames', []):
        rel = frame['file_path']
        path = os.path.join(data_dir, rel)
        if not os.path.exists(path):
            found = [p for p in glob.glob(path + '.*') if p.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                continue
            rel = rel + os.path.splitext(found[0])[1]
        get = lambda k, d=None: frame.get(k, meta.get(k, d))  # pylint: disable=cell-var-from-loop
        w, h = get('w'), get('h')
        if w is None or h is None:
            with Image.open(os.path.join(data_dir, rel)) as im:
                w, h = im.size
        if get('fl_x') is not None:
            fx = float(get('fl_x'))
        else:
            fx = 0.5 * w / np.tan(0.5 * float(get('camera_angle_x')))
        if get('fl_y') is not None:
            fy = float(get('fl_y'))
        elif get('camera_angle_y') is not None:
            fy = 0.5 * h / np.tan(0.5 * float(get('camera_angle_y')))
        else:
            fy = fx
        cx, cy = float(get('cx', w / 2.)), float(get('cy', h / 2.))
        pixtocams.append(np.linalg.inv(camera_utils.intrinsic_matrix(fx, fy, cx, cy)))
        model = get('camera_model', 'OPENCV')
        if model == 'OPENCV_FISHEYE':
            camtypes.append(camera_utils.ProjectionType.FISHEYE)
            keys = ['k1', 'k2', 'k3', 'k4']
        elif model in ('OPENCV', 'PINHOLE', 'SIMPLE_PINHOLE'):
            camtypes.append(camera_utils.ProjectionType.PERSPECTIVE)
            keys = ['k1', 'k2', 'k3', 'p1', 'p2']
        else:
            raise DatasetError(f'Unknown camera_model {model!r} in {pose_file}; use OPENCV or OPENCV_FISHEYE.')
        if any(get(k) is not None for k in keys + ['k4']):
            dists.append({k: float(get(k, 0.)) for k in keys})
        else:
            dists.append(None)
        names.append(rel)
        poses.append(np.array(frame['transform_matrix'], dtype=np.float64)[:3, :4])
        sizes.append((int(w), int(h)))
    if not names:
        raise DatasetError(f'No frame of {pose_file} has an existing image file; check the frames\' file_path.')
    if len(set(camtypes)) > 1:
        raise DatasetError(f'{pose_file} mixes fisheye and perspective cameras; this is not supported.')
    return (names, np.stack(poses), np.stack(pixtocams), colmap.merge_distortion(dists), camtypes[0],
            np.array(sizes))


# ---------------------------------------------------------------------------------------------------------------
# The base class.


class Dataset(threading.Thread, metaclass=abc.ABCMeta):
    """Base class of the datasets: loads cameras and images, serves training and test batches.

    Subclasses implement `_load_renderings(config)`, which must set `images` (`[N, H, W, 3]` array, or a list
    of `[H_i, W_i, 3]` arrays when the sizes differ; None when only rendering), `camtoworlds` `[N, 3, 4]`
    (OpenGL), `pixtocams` (`[3, 3]` shared or `[N, 3, 3]`), `height`, `width` (of the first image), and may set
    `distortion_params`, `camtype`, `pixtocam_ndc`, `focal`, `disp_images`, `normal_images`, `alphas`,
    `exposures`, `metadata`, `poses`, `render_poses`, `render_exposures`.

    Attributes (numpy, as the reference) plus: `widths`, `heights` `[N]` per-image sizes, `device`, and the
    torch copies used to cast rays (`_images_t` `[N, Hmax, Wmax, 3]` zero padded, `_pixtocams_t`, ...).
    """

    def __init__(self, split: str, data_dir: str, config: configs.Config, device: Any = None, rank: int = 0,
                 world_size: int = 1, start_step: int = 0):
        super().__init__()
        self._queue = queue.Queue(3)
        self.daemon = True
        if device is None:
            device = config.device if config.device is not None else 'cpu'
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self._seed = int(getattr(config, 'seed', 0))
        self._patch_size = max(int(config.patch_size), 1)
        self._batch_size = config.batch_size // self.world_size
        if self._patch_size ** 2 > self._batch_size:
            raise DatasetError(f'Patch size {self._patch_size}^2 is too large for the per-process batch size '
                               f'{self._batch_size}; lower Config.patch_size or raise Config.batch_size.')
        self._batching = utils.BatchingMethod(config.batching)
        self._use_tiffs = config.use_tiffs
        self._load_disps = config.compute_disp_metrics
        self._load_normals = config.compute_normal_metrics
        self._num_border_pixels_to_mask = config.num_border_pixels_to_mask
        self._apply_bayer_mask = config.apply_bayer_mask
        self._cast_rays_in_train_step = config.cast_rays_in_train_step
        self._render_spherical = False

        self.split = utils.DataSplit(split)
        self.data_dir = data_dir
        self.near = config.near
        self.far = config.far
        self.render_path = config.render_path
        self.distortion_params = None
        self.disp_images = None
        self.normal_images = None
        self.alphas = None
        self.poses = None
        self.pixtocam_ndc = None
        self.metadata = None
        self.camtype = camera_utils.ProjectionType.PERSPECTIVE
        self.exposures = None
        self.render_exposures = None
        self.render_poses = None
        self.focal = None
        self.images: Optional[Union[np.ndarray, List[np.ndarray]]] = None
        self.camtoworlds: Optional[np.ndarray] = None
        self.pixtocams: Optional[np.ndarray] = None
        self.height: Optional[int] = None
        self.width: Optional[int] = None

        if data_dir is None or not os.path.isdir(data_dir):
            raise DatasetNotFoundError(f'Data directory {data_dir} does not exist; set Config.data_dir '
                                       "(--gin_bindings=\"Config.data_dir='/path/to/scene'\").")
        self._load_renderings(config)

        if self.render_path:
            if config.render_path_file is not None:
                self.camtoworlds = load_render_path_file(config.render_path_file)
                self.render_poses = self.camtoworlds
            if config.render_resolution is not None:
                self.width, self.height = config.render_resolution
            if config.render_focal is not None:
                self.focal = config.render_focal
            if config.render_camtype is not None:
                if config.render_camtype == 'pano':
                    self._render_spherical = True
                else:
                    self.camtype = camera_utils.ProjectionType(config.render_camtype)
            self.distortion_params = None
            self.pixtocams = camera_utils.get_pixtocam(self.focal, self.width, self.height)
            self.images = None

        self._n_examples = self.camtoworlds.shape[0]
        self.cameras = (self.pixtocams, self.camtoworlds, self.distortion_params, self.pixtocam_ndc)
        self._setup_tensors()

        self._start_step = int(start_step)
        self._next_step = int(start_step)  # Step of the batch the next `next()` returns (train).
        self._next_test_idx = 0  # Camera of the batch the next `next()` returns (test).
        self._thread_launched = False
        self._start_lock = threading.Lock()
        self._stop_event = threading.Event()

    # -- Tensors on the device. ---------------------------------------------------------------------------------

    def _setup_tensors(self):
        n = self._n_examples
        dev = self.device
        f32 = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32), device=dev)
        pixtocams = np.asarray(self.pixtocams, dtype=np.float64)
        if pixtocams.ndim == 2:
            pixtocams = np.broadcast_to(pixtocams, (n, 3, 3))
        self._pixtocams_t = f32(pixtocams)
        self._camtoworlds_t = f32(np.asarray(self.camtoworlds)[:, :3, :4])
        self._pixtocam_ndc_t = None if self.pixtocam_ndc is None else f32(self.pixtocam_ndc)
        self._distortion_t = None
        self._distortion_per_image = False
        if self.distortion_params is not None:
            self._distortion_per_image = any(np.ndim(v) > 0 for v in self.distortion_params.values())
            if self._distortion_per_image:
                self._distortion_t = {k: f32(np.broadcast_to(v, (n,))) for k, v in self.distortion_params.items()}
            else:
                self._distortion_t = {k: float(v) for k, v in self.distortion_params.items()}
        self._exposures_t = None if self.exposures is None else f32(self.exposures)
        self._render_exposures_t = None if self.render_exposures is None else f32(self.render_exposures)
        self._metadata_t = None
        if self.metadata is not None:
            self._metadata_t = {k: torch.as_tensor(np.asarray(self.metadata[k]), device=dev)
                                for k in ['exposure_idx', 'exposure_values']}

        if self.images is None:
            self.widths = np.full(n, self.width, dtype=np.int64)
            self.heights = np.full(n, self.height, dtype=np.int64)
            self._images_t = None
        else:
            imgs = list(self.images)
            self.widths = np.array([im.shape[1] for im in imgs], dtype=np.int64)
            self.heights = np.array([im.shape[0] for im in imgs], dtype=np.int64)
            if len(imgs) != n:
                raise DatasetError(f'{len(imgs)} images but {n} camera poses in {self.data_dir}; every image '
                                   'needs exactly one pose (re-run COLMAP or fix the transforms file).')
            self._images_t = self._pad_stack(imgs)
        self._disp_t = None if self.disp_images is None else self._pad_stack(list(self.disp_images))
        self._normals_t = None if self.normal_images is None else self._pad_stack(list(self.normal_images))
        self._alphas_t = None if self.alphas is None else self._pad_stack(list(self.alphas))
        self._widths_t = torch.as_tensor(self.widths, device=dev)
        self._heights_t = torch.as_tensor(self.heights, device=dev)
        # Valid top-left corners of patches in each image, and their running count ('all_images' sampling).
        lo = self._num_border_pixels_to_mask
        hi = self._num_border_pixels_to_mask + self._patch_size - 1
        self._valid_w = torch.clamp(self._widths_t - lo - hi, min=0)
        self._valid_h = torch.clamp(self._heights_t - lo - hi, min=0)
        counts = self._valid_w * self._valid_h
        if self.split == utils.DataSplit.TRAIN and self._images_t is not None and int(counts.min()) <= 0:
            raise DatasetError(f'Some images of {self.data_dir} are smaller than the patch size plus masked '
                               'border; lower Config.patch_size or Config.num_border_pixels_to_mask.')
        self._cum_counts = torch.cumsum(counts, 0)
        self._total_count = int(self._cum_counts[-1]) if n else 0

    def _pad_stack(self, arrs: List[np.ndarray]) -> torch.Tensor:
        if all(a.shape == arrs[0].shape for a in arrs):
            return torch.as_tensor(np.stack(arrs).astype(np.float32), device=self.device)
        hmax = max(a.shape[0] for a in arrs)
        wmax = max(a.shape[1] for a in arrs)
        out = np.zeros((len(arrs), hmax, wmax) + arrs[0].shape[2:], np.float32)
        for i, a in enumerate(arrs):
            out[i, :a.shape[0], :a.shape[1]] = a
        return torch.as_tensor(out, device=self.device)

    # -- Iteration. ---------------------------------------------------------------------------------------------

    def set_start_step(self, step: int):
        """Makes the first `next()` return the training batch of `step` (call before the first `next()`)."""
        if self._thread_launched:
            raise RuntimeError('set_start_step() must be called before the first next() of the dataset.')
        self._start_step = self._next_step = int(step)

    def _ensure_started(self):
        with self._start_lock:
            if not self._thread_launched:
                self._thread_launched = True
                _LIVE_DATASETS.add(self)
                self.start()

    def close(self, timeout: float = 5.):
        """Stops the prefetch thread (if running); the dataset can still be used through get_train_batch /
        generate_ray_batch."""
        self._stop_event.set()
        if self._thread_launched and self.is_alive():
            self.join(timeout)

    def __iter__(self):
        return self

    def __next__(self) -> utils.Batch:
        """The next training batch (step `start_step`, `start_step + 1`, ...) or the next whole test image."""
        self._ensure_started()
        key, batch = self._queue.get()
        if self.split == utils.DataSplit.TRAIN:
            self._next_step = key + 1
        else:
            self._next_test_idx = (key + 1) % self._n_examples
        return batch

    def peek(self) -> utils.Batch:
        """The batch the next `next()` will return, without consuming it."""
        if self.split == utils.DataSplit.TRAIN:
            return self.get_train_batch(self._next_step)
        return self.generate_ray_batch(self._next_test_idx)

    def run(self):
        train = self.split == utils.DataSplit.TRAIN
        key = self._start_step if train else 0
        while not self._stop_event.is_set():
            item = (key, self.get_train_batch(key) if train else self.generate_ray_batch(key))
            while not self._stop_event.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            key = key + 1 if train else (key + 1) % self._n_examples

    @property
    def size(self) -> int:
        return self._n_examples

    @abc.abstractmethod
    def _load_renderings(self, config: configs.Config):
        """Loads images and cameras from disk (see the class docstring for what it must set)."""

    # -- Batches. -----------------------------------------------------------------------------------------------

    def cast_rays(self, pixels: utils.Pixels) -> utils.Rays:
        """Rays (on the device) for a batch of pixels of this dataset's cameras."""
        cam_idx = pixels.cam_idx[..., 0]
        if self.render_path or self._pixtocams_t.shape[0] == 1:
            pixtocams = self._pixtocams_t[torch.zeros_like(cam_idx)]
        else:
            pixtocams = self._pixtocams_t[cam_idx]
        camtoworlds = self._camtoworlds_t[cam_idx]
        dist = self._distortion_t
        if dist is not None and self._distortion_per_image:
            dist = {k: v[cam_idx] for k, v in dist.items()}
        origins, directions, viewdirs, radii, imageplane = camera_utils.pixels_to_rays(
                pixels.pix_x_int, pixels.pix_y_int, pixtocams, camtoworlds, distortion_params=dist,
                pixtocam_ndc=self._pixtocam_ndc_t, camtype=self.camtype, xnp=torch)
        return utils.Rays(origins=origins, directions=directions, viewdirs=viewdirs, radii=radii,
                          imageplane=imageplane, lossmult=pixels.lossmult, near=pixels.near, far=pixels.far,
                          cam_idx=pixels.cam_idx, exposure_idx=pixels.exposure_idx,
                          exposure_values=pixels.exposure_values)

    def _make_ray_batch(self, pix_x_int: torch.Tensor, pix_y_int: torch.Tensor, cam_idx: torch.Tensor,
                        lossmult: Optional[torch.Tensor] = None, cast: Optional[bool] = None) -> utils.Batch:
        """A Batch for integer pixel coordinates and camera indices (long tensors on the device, broadcastable
        to one shape SH); ray fields are `SH + [C]`. `cast`: True casts rays, False keeps `utils.Pixels`, None
        (training batches) keeps Pixels only with `Config.cast_rays_in_train_step` on the train split."""
        pix_x_int, pix_y_int, cam_idx = torch.broadcast_tensors(pix_x_int, pix_y_int, cam_idx)
        shape = pix_x_int.shape
        dev = self.device
        full = lambda v: torch.full(shape + (1,), float(v), device=dev, dtype=torch.float32)
        kw: Dict[str, Any] = {
                'lossmult': full(1.) if lossmult is None else lossmult.to(dev, torch.float32),
                'near': full(self.near),
                'far': full(self.far),
                'cam_idx': cam_idx[..., None],
        }
        src_idx = torch.zeros_like(cam_idx) if self.render_path else cam_idx
        if self._metadata_t is not None:
            for key in ['exposure_idx', 'exposure_values']:
                kw[key] = self._metadata_t[key][src_idx][..., None]
        if self._exposures_t is not None:
            kw['exposure_values'] = self._exposures_t[src_idx][..., None]
        if self.render_path and self._render_exposures_t is not None:
            kw['exposure_values'] = self._render_exposures_t[cam_idx][..., None]
        pixels = utils.Pixels(pix_x_int, pix_y_int, **kw)
        if cast is None:
            cast = not (self._cast_rays_in_train_step and self.split == utils.DataSplit.TRAIN)
        if not cast:
            rays = pixels
        else:
            rays = self.cast_rays(pixels)
        batch: Dict[str, Any] = {'rays': rays}
        if not self.render_path and self._images_t is not None:
            batch['rgb'] = self._images_t[cam_idx, pix_y_int, pix_x_int]
        if self._load_disps and self._disp_t is not None:
            batch['disps'] = self._disp_t[cam_idx, pix_y_int, pix_x_int]
        if self._load_normals and self._normals_t is not None:
            batch['normals'] = self._normals_t[cam_idx, pix_y_int, pix_x_int]
            batch['alphas'] = self._alphas_t[cam_idx, pix_y_int, pix_x_int]
        return utils.Batch(**batch)

    def train_generator(self, step: int) -> torch.Generator:
        """The torch.Generator (on the device) that draws the batch of `step` for this rank."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_seed_for(self._seed, step, self.rank))
        return gen

    def get_train_batch(self, step: int) -> utils.Batch:
        """The training batch of `step`: a pure function of (config.seed, step, rank).

        Patches of `patch_size`^2 pixels (1 = single rays) are drawn uniformly, with replacement, over all valid
        patch positions of all training images ('all_images') or of one random image ('single_image').
        Returns a Batch with fields `[num_patches, patch_size, patch_size, C]`.
        """
        gen = self.train_generator(step)
        dev = self.device
        p = self._patch_size
        num_patches = self._batch_size // p ** 2
        lo = self._num_border_pixels_to_mask
        if self._batching == utils.BatchingMethod.ALL_IMAGES:
            flat = torch.randint(0, self._total_count, (num_patches,), generator=gen, device=dev)
            cam_idx = torch.searchsorted(self._cum_counts, flat, right=True)
            local = flat - (self._cum_counts[cam_idx] - self._valid_w[cam_idx] * self._valid_h[cam_idx])
            vw = self._valid_w[cam_idx]
            pix_x = lo + local % vw
            pix_y = lo + torch.div(local, vw, rounding_mode='floor')
        else:
            cam = torch.randint(0, self._n_examples, (1,), generator=gen, device=dev)
            cam_idx = cam.expand(num_patches)
            u = torch.rand((2, num_patches), generator=gen, device=dev, dtype=torch.float64)
            pix_x = lo + torch.minimum((u[0] * self._valid_w[cam]).long(), self._valid_w[cam] - 1)
            pix_y = lo + torch.minimum((u[1] * self._valid_h[cam]).long(), self._valid_h[cam] - 1)
        offs = torch.arange(p, device=dev)
        pix_x = pix_x[:, None, None] + offs[None, None, :]
        pix_y = pix_y[:, None, None] + offs[None, :, None]
        cam_idx = cam_idx[:, None, None]
        lossmult = None
        if self._apply_bayer_mask:
            from mipnerf360 import raw_utils  # pylint: disable=import-outside-toplevel
            lossmult = torch.as_tensor(raw_utils.pixels_to_bayer_mask(
                    pix_x.cpu().numpy(), pix_y.cpu().numpy()), device=dev, dtype=torch.float32)
        return self._make_ray_batch(pix_x, pix_y, cam_idx, lossmult=lossmult)

    def generate_ray_batch(self, cam_idx: int) -> utils.Batch:
        """The whole image of camera `cam_idx`: fields `[H_i, W_i, C]` on the device."""
        cam_idx = int(cam_idx)
        if self._render_spherical:
            camtoworld = self._camtoworlds_t[cam_idx]
            rays = camera_utils.cast_spherical_rays(camtoworld, self.height, self.width, self.near, self.far,
                                                    xnp=torch)
            return utils.Batch(rays=rays)
        w, h = int(self.widths[cam_idx]), int(self.heights[cam_idx])
        pix_y, pix_x = torch.meshgrid(torch.arange(h, device=self.device), torch.arange(w, device=self.device),
                                      indexing='ij')
        return self._make_ray_batch(pix_x, pix_y, torch.full_like(pix_x, cam_idx), cast=True)


def _stack_if_same(images: List[np.ndarray]) -> Union[np.ndarray, List[np.ndarray]]:
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


# ---------------------------------------------------------------------------------------------------------------
# Loaders.


class Blender(Dataset):
    """NeRF-synthetic scenes: transforms_{split}.json + RGBA PNGs (composited on white).

    Unlike the reference (which refuses `render_path` here), `Config.render_path` renders a circular orbit
    (`generate_orbit_path`) at the test cameras' median distance and elevation around the point they look at,
    with `Config.render_path_frames` frames. With `Config.use_tiffs` the 32-bit linear `_R/_G/_B/_A.tiff`
    channels are read and the colour converted to sRGB; alpha stays linear (the reference also passes alpha
    through the sRGB curve, which changes partial coverage at edges).
    """

    def _load_renderings(self, config):
        pose_file = os.path.join(self.data_dir, f'transforms_{self.split.value}.json')
        if not os.path.isfile(pose_file):
            raise DatasetNotFoundError(f'Camera file {pose_file} does not exist; is Config.data_dir a Blender '
                                       "scene (else set Config.dataset_loader='llff')?")
        with open(pose_file, 'r') as fp:
            meta = json.load(fp)
        images, disp_images, normal_images, cams = [], [], [], []
        for frame in meta['frames']:
            fprefix = os.path.join(self.data_dir, frame['file_path'])

            def get_img(suffix, fprefix=fprefix):
                path = fprefix + suffix
                if not os.path.isfile(path):
                    raise DatasetNotFoundError(f'Image file {path} listed in {pose_file} does not exist.')
                image = utils.load_img(path)
                if config.factor > 1:
                    image = downsample(image, config.factor)
                return image

            if self._use_tiffs:
                from mipnerf360 import image as lib_image  # pylint: disable=import-outside-toplevel
                channels = [get_img(f'_{ch}.tiff') for ch in ['R', 'G', 'B', 'A']]
                bad = [ch for ch, c in zip('RGBA', channels) if c.ndim != 2]
                if bad:
                    raise DatasetError(f'{fprefix}_{bad[0]}.tiff must be a single-channel float image.')
                rgb_lin = np.stack(channels[:3], axis=-1)
                image = np.concatenate([np.asarray(lib_image.linear_to_srgb(rgb_lin)), channels[3][..., None]],
                                       axis=-1)
            else:
                image = get_img('.png') / 255.
            if image.ndim != 3 or image.shape[-1] != 4:
                raise DatasetError(f'Blender image {fprefix} must be RGBA, got shape {image.shape}.')
            images.append(image)
            if self._load_disps:
                disp_images.append(get_img('_disp.tiff'))
            if self._load_normals:
                normal_images.append(get_img('_normal.png')[..., :3] * 2. / 255. - 1.)
            cams.append(np.array(frame['transform_matrix'], dtype=np.float32)[:3, :4])
        if not images:
            raise DatasetError(f'{pose_file} lists no frames.')
        images = np.stack(images, axis=0)
        if self._load_disps:
            self.disp_images = np.stack(disp_images, axis=0)
        if self._load_normals:
            self.normal_images = np.stack(normal_images, axis=0)
            self.alphas = images[..., -1]
        rgb, alpha = images[..., :3], images[..., -1:]
        self.images = (rgb * alpha + (1. - alpha)).astype(np.float32)  # White background.
        self.height, self.width = self.images.shape[1:3]
        self.camtoworlds = np.stack(cams, axis=0)
        self.focal = .5 * self.width / np.tan(.5 * float(meta['camera_angle_x']))
        self.pixtocams = camera_utils.get_pixtocam(self.focal, self.width, self.height)
        if config.render_path:
            ref_poses = self.camtoworlds
            test_file = os.path.join(self.data_dir, 'transforms_test.json')
            if self.split != utils.DataSplit.TEST and os.path.isfile(test_file):
                with open(test_file, 'r') as fp:
                    ref_poses = np.stack([np.array(f['transform_matrix'], np.float64)[:3, :4]
                                          for f in json.load(fp)['frames']])
            self.render_poses = generate_orbit_path(ref_poses, n_frames=config.render_path_frames)
            self.camtoworlds = self.render_poses


class LLFF(Dataset):
    """COLMAP scenes (mip-NeRF 360 and LLFF layouts): `sparse/0`, `images/`, `images_N/`.

    Poses come from `sparse/0` (binary or text), else `transforms.json`, else `poses_bounds.npy`. Images are
    paired with the COLMAP names through the sorted file lists of `images/` and `images_N/` (the downsampled
    copies may be named differently, as in the reference).
    """

    def _load_posedata(self):
        """-> names, poses [N, 3, 4], pixtocams [N, 3, 3] (full resolution), distortion, camtype, sizes."""
        colmap_dir = os.path.join(self.data_dir, 'sparse', '0')
        if os.path.isdir(colmap_dir):
            mgr = colmap.NeRFSceneManager(colmap_dir)
            try:
                names, poses, pixtocams, dist, camtype = mgr.process()
            except colmap.ColmapError as e:
                raise DatasetError(str(e)) from None
            return names, poses, pixtocams, dist, camtype, mgr.sizes
        if os.path.isfile(os.path.join(self.data_dir, 'transforms.json')):
            names, poses, pixtocams, dist, camtype, sizes = load_blender_posedata(self.data_dir)
            return [os.path.basename(n) for n in names], poses, pixtocams, dist, camtype, sizes
        if os.path.isfile(os.path.join(self.data_dir, 'poses_bounds.npy')):
            return self._load_poses_bounds()
        raise DatasetNotFoundError(f'No cameras in {self.data_dir}: expected sparse/0 (COLMAP), transforms.json '
                                   'or poses_bounds.npy; run `python -m mipnerf360.colmap DATA_DIR` or '
                                   'scripts/local_colmap_and_resize.sh DATA_DIR first.')

    def _load_poses_bounds(self):
        """LLFF's poses_bounds.npy (no COLMAP model): one row per image of `images/` (sorted by name), holding
        a flattened `[3, 5]` matrix [R | t | hwf] and the near/far bounds. R's columns are the camera's (down,
        right, back) axes (LLFF's imgs2poses order); t the camera centre; hwf the full-resolution height, width
        and focal length (principal point at the image centre). OpenGL camera-to-world = (right, -down, back).
        """
        path = os.path.join(self.data_dir, 'poses_bounds.npy')
        arr = load_poses_bounds(path)
        names = _list_images(os.path.join(self.data_dir, 'images'))
        if len(names) != arr.shape[0]:
            raise DatasetError(f'{path} has {arr.shape[0]} poses but {os.path.join(self.data_dir, "images")} '
                               f'has {len(names)} images; they must match one to one (one row per image, in '
                               'sorted name order): regenerate poses_bounds.npy for these images.')
        mats = arr[:, :15].reshape(-1, 3, 5)
        hwf = mats[:, :, 4]
        poses = np.concatenate([mats[:, :, 1:2], -mats[:, :, 0:1], mats[:, :, 2:4]], -1)
        pixtocams = np.stack([np.linalg.inv(camera_utils.intrinsic_matrix(f, f, w / 2., h / 2.))
                              for h, w, f in hwf])
        sizes = np.round(hwf[:, [1, 0]]).astype(np.int64)
        return names, poses, pixtocams, None, camera_utils.ProjectionType.PERSPECTIVE, sizes

    def _image_paths(self, names: Sequence[str], image_dir_suffix: str) -> List[str]:
        colmap_image_dir = os.path.join(self.data_dir, 'images')
        image_dir = os.path.join(self.data_dir, 'images' + image_dir_suffix)
        colmap_files = _list_images(colmap_image_dir)
        image_files = _list_images(image_dir)
        if not image_files:
            raise DatasetError(f'No images in {image_dir}; add the images (PNG/JPEG) or fix Config.data_dir.')
        if len(colmap_files) != len(image_files):
            raise DatasetError(f'{colmap_image_dir} has {len(colmap_files)} images but {image_dir} has '
                               f'{len(image_files)}; regenerate {image_dir} from images/.')
        colmap_to_image = dict(zip(colmap_files, image_files))
        missing = [n for n in names if n not in colmap_to_image]
        if missing:
            raise DatasetError(f'{len(missing)} posed images (e.g. {missing[0]!r}) are not in {colmap_image_dir}; '
                               'the images and poses do not match, re-run COLMAP on these images.')
        return [os.path.join(image_dir, colmap_to_image[n]) for n in names]

    def _load_renderings(self, config):
        image_dir_suffix = ''
        if config.factor > 0 and not (config.rawnerf_mode and self.split == utils.DataSplit.TRAIN):
            image_dir_suffix = f'_{config.factor}'
            factor = config.factor
        else:
            factor = 1
        image_names, poses, pixtocams, distortion_params, camtype, sizes = self._load_posedata()
        if config.load_alphabetical:
            inds = np.argsort(image_names, kind='stable')
            image_names = [image_names[i] for i in inds]
            poses = poses[inds]
            pixtocams = pixtocams[inds]
            sizes = None if sizes is None else sizes[inds]
            if distortion_params is not None:
                distortion_params = {k: (v[inds] if np.ndim(v) else v) for k, v in distortion_params.items()}
        self.image_names = image_names
        self.distortion_params = distortion_params
        self.camtype = camtype

        raw_testscene = False
        if config.rawnerf_mode:
            from mipnerf360 import raw_utils  # pylint: disable=import-outside-toplevel
            images, metadata, raw_testscene = raw_utils.load_raw_dataset(
                    self.split, self.data_dir, image_names, config.exposure_percentile, factor)
            self.metadata = metadata
            images = list(images)
            pixtocams = pixtocams @ np.diag([factor, factor, 1.])
        else:
            paths = self._load_image_paths(image_names, image_dir_suffix)
            images = [self._read_image(p, factor) for p in paths]
            pixtocams = np.stack([
                    _scaled_pixtocam(pixtocams[i], None if sizes is None else tuple(sizes[i]),
                                     (im.shape[1], im.shape[0]), factor, paths[i])
                    for i, im in enumerate(images)])
            self._load_exposures(image_names)
        self.pixtocams = pixtocams.astype(np.float32)
        self.focal = 1. / self.pixtocams[0, 0, 0]

        posefile = os.path.join(self.data_dir, 'poses_bounds.npy')
        if os.path.isfile(posefile):
            bounds = load_poses_bounds(posefile)[:, -2:]
        else:
            bounds = np.array([0.01, 1.])
        self.colmap_to_world_transform = np.eye(4)

        if config.forward_facing:
            self.pixtocam_ndc = self.pixtocams[0]
            scale = 1. / (bounds.min() * .75)
            poses = poses.copy()
            poses[:, :3, 3] *= scale
            self.colmap_to_world_transform = np.diag([scale] * 3 + [1])
            bounds = bounds * scale
            poses, transform = camera_utils.recenter_poses(poses)
            self.colmap_to_world_transform = transform @ self.colmap_to_world_transform
            self.render_poses = camera_utils.generate_spiral_path(
                    poses, bounds, n_frames=config.render_path_frames)
        else:
            poses, transform = camera_utils.transform_poses_pca(poses)
            self.colmap_to_world_transform = transform
            if config.render_spline_keyframes is not None:
                rets = camera_utils.create_render_spline_path(config, image_names, poses, self.exposures)
                self.spline_indices, self.render_poses, self.render_exposures = rets
            else:
                self.render_poses = camera_utils.generate_ellipse_path(
                        poses, n_frames=config.render_path_frames, z_variation=config.z_variation,
                        z_phase=config.z_phase)

        if raw_testscene:
            poses = {utils.DataSplit.TEST: poses[:1], utils.DataSplit.TRAIN: poses[1:]}[self.split]
            pixtocams = {utils.DataSplit.TEST: self.pixtocams[:1], utils.DataSplit.TRAIN: self.pixtocams[1:]
                         }[self.split]
            self.pixtocams = pixtocams
        self.poses = poses

        all_indices = np.arange(len(images))
        if config.llff_use_all_images_for_training or raw_testscene:
            train_indices = all_indices
        else:
            train_indices = all_indices[all_indices % config.llffhold != 0]
        indices = {utils.DataSplit.TEST: all_indices[all_indices % config.llffhold == 0],
                   utils.DataSplit.TRAIN: train_indices}[self.split]
        if raw_testscene:
            indices = all_indices
        if len(indices) == 0:
            raise DatasetError(f'The {self.split.value} split of {self.data_dir} is empty ({len(images)} images, '
                               f'llffhold={config.llffhold}); add images or change Config.llffhold.')
        images = [images[i] for i in indices]
        poses = poses[indices]
        if not raw_testscene:
            self.pixtocams = self.pixtocams[indices]
        if self.distortion_params is not None:
            self.distortion_params = {k: (v[indices] if np.ndim(v) else v)
                                      for k, v in self.distortion_params.items()}
        if self.exposures is not None:
            self.exposures = self.exposures[indices]
        if config.rawnerf_mode:
            for key in ['exposure_idx', 'exposure_values']:
                self.metadata[key] = self.metadata[key][indices]
        self.split_indices = indices
        self.split_names = [image_names[i] for i in indices] if not raw_testscene else list(image_names)
        self.images = _stack_if_same(images)
        self.camtoworlds = self.render_poses if config.render_path else poses
        self.height, self.width = images[0].shape[:2]

    def _load_image_paths(self, image_names, image_dir_suffix):
        return self._image_paths(image_names, image_dir_suffix)

    def _read_image(self, path: str, factor: int) -> np.ndarray:  # pylint: disable=unused-argument
        return _load_rgb(path)

    def _load_exposures(self, image_names):
        jpeg_paths = [os.path.join(self.data_dir, 'images', f) for f in image_names]
        if not jpeg_paths or not jpeg_paths[0].lower().endswith(('.jpg', '.jpeg')):
            return
        try:
            exifs = [utils.load_exif(p) for p in jpeg_paths]
        except (OSError, ValueError):
            return
        self.exifs = exifs
        if 'ExposureTime' in exifs[0] and 'ISOSpeedRatings' in exifs[0]:
            gather = lambda k: np.array([float(x[k]) for x in exifs])
            self.exposures = gather('ExposureTime') * gather('ISOSpeedRatings') / 1000.


class NerfStudio(LLFF):
    """nerfstudio / instant-NGP captures: `transforms.json` (shared or per-frame intrinsics) + images.

    Frames' `file_path`s are relative to the data directory; with `Config.factor = f`, the image is read from
    the sibling folder `<dir>_f` (nerfstudio's `images_2`, ...) when it exists, else downsampled in memory.
    Processed as LLFF scenes (PCA-aligned unless forward_facing, every llffhold-th image held out).
    """

    def _load_posedata(self):
        names, poses, pixtocams, dist, camtype, sizes = load_blender_posedata(self.data_dir)
        return names, poses, pixtocams, dist, camtype, sizes

    def _load_image_paths(self, image_names, image_dir_suffix):
        paths = []
        for name in image_names:
            full = os.path.join(self.data_dir, name)
            if image_dir_suffix:
                head, tail = os.path.split(name)
                cand = os.path.join(self.data_dir, (head or 'images').rstrip('/') + image_dir_suffix, tail)
                if os.path.isfile(cand):
                    paths.append(cand)
                    continue
            paths.append(full)
        return paths

    def _read_image(self, path: str, factor: int) -> np.ndarray:
        img = _load_rgb(path)
        if factor > 1 and not os.path.normpath(os.path.dirname(path)).endswith(f'_{factor}'):
            h, w = img.shape[:2]  # No pre-shrunk copy: downsample in memory, size rounded as COLMAP folders.
            img = _resize_area(img, (int(np.floor(w / factor + .5)), int(np.floor(h / factor + .5))))
        return img


class TanksAndTemplesNerfPP(Dataset):
    """Tanks and Temples as processed by NeRF++: `<split>/{pose,intrinsics,rgb}/`, one file per image.

    `pose/*.txt` are 4x4 OpenCV camera-to-worlds, `intrinsics/*.txt` 4x4 matrices with K in the top-left block
    (16 numbers each, any line layout). Files of the three folders are paired by sorted order. With
    `Config.render_path` the poses come from `camera_path/` (size from the first test image). Unlike the
    reference (first focal length, centred principal point for all images) every image's own intrinsics are
    used for training and test.
    """

    def _load_renderings(self, config):
        split_str = 'camera_path' if config.render_path else self.split.value
        basedir = os.path.join(self.data_dir, split_str)

        def load_mats(dirname):
            folder = os.path.join(basedir, dirname)
            if not os.path.isdir(folder):
                raise DatasetNotFoundError(f'Folder {folder} does not exist; is Config.data_dir a NeRF++ '
                                           "Tanks and Temples scene (else fix Config.dataset_loader)?")
            files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if not f.startswith('.')]
            if not files:
                raise DatasetError(f'Folder {folder} is empty; it needs one 4x4 matrix text file per image.')
            mats = []
            for f in files:
                try:
                    m = np.loadtxt(f, dtype=np.float64)
                except ValueError as e:
                    raise DatasetError(f'Cannot parse {f} ({e}); it must hold 16 numbers (a 4x4 '
                                       'matrix).') from None
                if m.size != 16 or not np.all(np.isfinite(m)):
                    raise DatasetError(f'{f} holds {m.size} numbers; it must hold a finite 4x4 matrix '
                                       '(16 numbers).')
                mats.append(m.reshape(4, 4))
            return np.stack(mats)

        poses = load_mats('pose')
        poses = np.matmul(poses, np.diag(np.array([1., -1., -1., 1.])))[:, :3, :4]
        intrinsics = load_mats('intrinsics')
        if len(intrinsics) != len(poses):
            raise DatasetError(f'{basedir} has {len(poses)} pose files but {len(intrinsics)} intrinsics files; '
                               'every image needs one of each.')
        if not config.render_path:
            rgb_dir = os.path.join(basedir, 'rgb')
            images = [_load_rgb(os.path.join(rgb_dir, f)) for f in _list_images(rgb_dir)]
            if len(images) != len(poses):
                raise DatasetError(f'{rgb_dir} has {len(images)} images but {basedir}/pose has {len(poses)} '
                                   'poses; they must match one to one (paired in sorted name order).')
            self.images = _stack_if_same(images)
            self.height, self.width = images[0].shape[:2]
            self.pixtocams = np.stack([np.linalg.inv(k[:3, :3]) for k in intrinsics]).astype(np.float32)
        else:
            d = os.path.join(self.data_dir, 'test', 'rgb')
            names = _list_images(d)
            if not names:
                raise DatasetError(f'No images in {d}; the render path takes its image size from the first test '
                                   'image (or set Config.render_resolution).')
            shape = _load_rgb(os.path.join(d, names[0])).shape
            self.height, self.width = shape[:2]
            self.images = None
            self.pixtocams = camera_utils.get_pixtocam(intrinsics[0, 0, 0], self.width, self.height)
            self.render_poses = poses
        self.camtoworlds = poses
        self.focal = intrinsics[0, 0, 0]


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f'{path} does not exist; an FVS scene folder needs Ks.npy, Rs.npy and ts.npy '
                                   f'({what}) next to the im_*.jpg images.')
    try:
        return np.load(path, allow_pickle=False).astype(np.float64)
    except (OSError, ValueError) as e:
        raise DatasetError(f'Cannot read {path} ({e}); re-save it with numpy.save.') from None


class TanksAndTemplesFVS(Dataset):
    """Tanks and Temples as processed by Free View Synthesis: `dense/ibr3d_*/{im_*.jpg, Ks, Rs, ts}.npy`.

    `Ks` `[N, 3, 3]` intrinsics, `Rs` `[N, 3, 3]` and `ts` `[N, 3]` the OpenCV world-to-camera transforms
    (x_cam = R x + t), in the sorted order of the `im_*` files. The `ibr3d_*` folders sorted in reverse order
    are indexed by `Config.factor` (0: the last name, e.g. ibr3d_pw_0.50). Poses are PCA-aligned
    (`transform_poses_pca`, the transform kept in `colmap_to_world_transform`); every image's own
    intrinsics are used (the reference takes the first focal length and a centred principal point for all).
    """

    def _load_renderings(self, config):
        render_only = config.render_path and self.split == utils.DataSplit.TEST
        basedir = os.path.join(self.data_dir, 'dense')
        if not os.path.isdir(basedir):
            raise DatasetNotFoundError(f'Folder {basedir} does not exist; is Config.data_dir an FVS scene '
                                       '(else fix Config.dataset_loader)?')
        sizes = [f for f in sorted(os.listdir(basedir)) if f.startswith('ibr3d')][::-1]
        if not sizes:
            raise DatasetNotFoundError(f'No ibr3d_* folder in {basedir}; is Config.data_dir an FVS scene?')
        if not 0 <= config.factor < len(sizes):
            raise DatasetError(f'Config.factor {config.factor} must be between 0 and {len(sizes) - 1} (it picks '
                               f'one of the folders {", ".join(sizes)} of {basedir}).')
        basedir = os.path.join(basedir, sizes[config.factor])
        files = [f for f in sorted(os.listdir(basedir))
                 if f.startswith('im_') and f.lower().endswith(IMAGE_EXTENSIONS)]
        intrinsics = _load_npy(os.path.join(basedir, 'Ks.npy'), 'intrinsics')
        rot = _load_npy(os.path.join(basedir, 'Rs.npy'), 'world-to-camera rotations')
        trans = _load_npy(os.path.join(basedir, 'ts.npy'), 'world-to-camera translations')
        n = len(files)
        if n == 0:
            raise DatasetError(f'No im_* images in {basedir}; the FVS layout needs im_00000000.jpg, ...')
        expect = {'Ks.npy': (intrinsics, (n, 3, 3)), 'Rs.npy': (rot, (n, 3, 3)), 'ts.npy': (trans, (n, 3))}
        for name, (arr, shape) in expect.items():
            if arr.size != int(np.prod(shape)) or arr.shape[0] != n:
                raise DatasetError(f'{os.path.join(basedir, name)} has shape {arr.shape} but {basedir} has {n} '
                                   f'im_* images, so it must be {list(shape)}; the images and cameras must match.')
        intrinsics, rot, trans = intrinsics.reshape(n, 3, 3), rot.reshape(n, 3, 3), trans.reshape(n, 3)
        if render_only:
            files = files[:1]
        images = [_load_rgb(os.path.join(basedir, f)) for f in files]

        w2c = np.concatenate([rot, trans[..., None]], axis=-1)
        c2w_colmap = np.linalg.inv(camera_utils.pad_poses(w2c))[:, :3, :4]
        c2w = c2w_colmap @ np.diag(np.array([1., -1., -1., 1.]))
        poses, transform = camera_utils.transform_poses_pca(c2w)
        self.colmap_to_world_transform = transform
        self.poses = poses
        self.image_names = files
        self.height, self.width = images[0].shape[:2]
        self.focal = intrinsics[0, 0, 0]
        pixtocams = np.linalg.inv(intrinsics).astype(np.float32)
        if render_only:
            self.render_poses = camera_utils.generate_ellipse_path(
                    poses, config.render_path_frames, z_variation=config.z_variation, z_phase=config.z_phase)
            self.images = None
            self.camtoworlds = self.render_poses
            self.pixtocams = pixtocams[0]
        else:
            all_indices = np.arange(n)
            indices = {utils.DataSplit.TEST: all_indices[all_indices % config.llffhold == 0],
                       utils.DataSplit.TRAIN: all_indices[all_indices % config.llffhold != 0]}[self.split]
            if len(indices) == 0:
                raise DatasetError(f'The {self.split.value} split of {basedir} is empty ({n} images, '
                                   f'llffhold={config.llffhold}); add images or change Config.llffhold.')
            self.split_indices = indices
            self.split_names = [files[i] for i in indices]
            self.images = _stack_if_same([images[i] for i in indices])
            self.camtoworlds = poses[indices]
            self.pixtocams = pixtocams[indices]


_DTU_NAME = re.compile(r'^rect_(\d{3})_.*\.png$')


class DTU(Dataset):
    """DTU: `<scan>/rect_{i:03d}_{light}_r5000.png` (r7000 from image 50 on; `rect_{i:03d}_max.png` for light
    7) and `<scan>/../../cal18/pos_{i:03d}.txt` 3x4 projection matrices P = K [R | t] (up to scale).

    `Config.dtu_light_cond` picks the lighting (0-6, 7 = max) and every `Config.dtuhold`-th image is a test
    image. Poses are decomposed with OpenCV, recentred on their average pose, scaled so that the largest
    centre coordinate is 1, then flipped to OpenGL (the world transform is kept in
    `colmap_to_world_transform`). The images are those numbered 1..n where n is the number of distinct image
    numbers in the folder (the reference counts the files and divides by 8).
    """

    def _load_renderings(self, config):
        import cv2  # pylint: disable=import-outside-toplevel
        if config.render_path:
            raise DatasetError('render_path cannot be used with the DTU dataset (as in the reference); set '
                               'Config.render_path=False.')
        light_cond = int(getattr(config, 'dtu_light_cond', 3))
        dtuhold = int(getattr(config, 'dtuhold', 8))
        numbers = {int(m.group(1)) for m in map(_DTU_NAME.match, os.listdir(self.data_dir)) if m}
        n_images = len(numbers)
        if n_images == 0:
            raise DatasetError(f'No DTU images (rect_XXX_*.png) in {self.data_dir}; set Config.data_dir to a scan '
                               'folder of the Rectified DTU images.')
        images, pixtocams, camtoworlds = [], [], []
        for i in range(1, n_images + 1):
            if light_cond < 7:
                light_str = f'{light_cond}_r' + ('5000' if i < 50 else '7000')
            else:
                light_str = 'max'
            image = _load_rgb(os.path.join(self.data_dir, f'rect_{i:03d}_{light_str}.png'))
            if config.factor > 1:
                image = downsample(image, config.factor)
            images.append(image)
            fname = os.path.normpath(os.path.join(self.data_dir, f'../../cal18/pos_{i:03d}.txt'))
            if not os.path.isfile(fname):
                raise DatasetNotFoundError(f'DTU calibration file {fname} does not exist; the cal18 folder must '
                                           'sit two levels above the scan folder (DTU/cal18, '
                                           'DTU/Rectified/scanN).')
            try:
                projection = np.loadtxt(fname, dtype=np.float64)
            except ValueError as e:
                raise DatasetError(f'Cannot parse DTU calibration file {fname} ({e}); it must hold a 3x4 '
                                   'projection matrix P = K [R | t] (3 lines of 4 numbers).') from None
            if projection.shape != (3, 4) or not np.all(np.isfinite(projection)):
                raise DatasetError(f'DTU calibration file {fname} holds an array of shape {projection.shape}; it '
                                   'must hold a finite 3x4 projection matrix P = K [R | t] (3 lines of 4 '
                                   'numbers).')
            if abs(np.linalg.det(projection[:, :3])) < 1e-12 * np.abs(projection).max() ** 3:
                raise DatasetError(f'DTU calibration file {fname} holds a degenerate projection matrix (its left '
                                   '3x3 block is singular); restore the original file.')
            camera_mat, rot_mat, t = cv2.decomposeProjectionMatrix(projection)[:3]
            camera_mat = camera_mat / camera_mat[2, 2]
            pose = np.eye(4)
            pose[:3, :3] = rot_mat.transpose()
            pose[:3, 3] = (t[:3] / t[3])[:, 0]
            camtoworlds.append(pose[:3])
            if config.factor > 0:
                camera_mat = np.diag([1. / config.factor, 1. / config.factor, 1.]) @ camera_mat
            pixtocams.append(np.linalg.inv(camera_mat))
        pixtocams = np.stack(pixtocams)
        camtoworlds = np.stack(camtoworlds)
        camtoworlds, transform = camera_utils.recenter_poses(camtoworlds)
        camtoworlds = camtoworlds.copy()
        scale = 1. / np.max(np.abs(camtoworlds[:, :3, -1]))
        camtoworlds[:, :3, -1] *= scale
        self.colmap_to_world_transform = np.diag([scale] * 3 + [1.]) @ transform
        camtoworlds = camtoworlds @ np.diag([1., -1., -1., 1.])
        all_indices = np.arange(len(images))
        indices = {utils.DataSplit.TEST: all_indices[all_indices % dtuhold == 0],
                   utils.DataSplit.TRAIN: all_indices[all_indices % dtuhold != 0]}[self.split]
        if len(indices) == 0:
            raise DatasetError(f'The {self.split.value} split of {self.data_dir} is empty ({len(images)} images, '
                               f'dtuhold={dtuhold}); add images or change Config.dtuhold.')
        self.split_indices = indices
        self.split_names = [f'rect_{i + 1:03d}' for i in indices]
        self.images = _stack_if_same([images[i] for i in indices])
        self.height, self.width = images[0].shape[:2]
        self.camtoworlds = camtoworlds[indices]
        self.pixtocams = pixtocams[indices].astype(np.float32)
        self.focal = 1. / self.pixtocams[0, 0, 0]
