"""`Scene`: what a loader reads from disk (images, cameras, splits, render poses), host-side numpy; `load_scene`.

`load_scene(config, split)` picks the loader named by `Config.dataset_loader` (each a function of the files to a
`Scene`, one module per layout) and then applies the render-path settings (`Config.render_path_file`: a .npy
of poses or a nerfstudio camera_path.json, see `mipnerf360.camera_path`; `render_resolution`, `render_focal`,
`render_camtype`). User errors raise `DatasetError` (a ValueError;
`DatasetNotFoundError` is also a FileNotFoundError) with a one-line message naming the path and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from mipnerf360 import camera_utils
from mipnerf360 import configs
from mipnerf360 import utils

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.exr', '.webp')

Images = Union[np.ndarray, List[np.ndarray]]


class DatasetError(ValueError):
    """A problem with the data on disk that the user can fix (the message says how)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A required file or folder of the dataset does not exist."""


@dataclasses.dataclass
class Scene:
    """One split of a dataset as read from disk (numpy, on the host).

    images: as read: uint8 `[N, H, W, 3]` for 8-bit files, float32 in [0, 1] for 16-bit / HDR / raw or
        resampled images; a list of `[H_i, W_i, 3]` when the sizes differ; None when only rendering.
    camtoworlds: `[N, 3, 4]` OpenGL camera-to-worlds (the render path's when `render_path`).
    pixtocams: `[N, 3, 3]` inverse intrinsics; widths, heights: `[N]` image sizes.
    world_transform: `[4, 4]` the similarity that took the input files' world frame to this scene's
        (normalised) one: centres_here = world_transform @ [centre_in_file, 1]. Identity when not normalised.
    split_names / split_indices: the names and indices (into `image_names`) of this split's images.
    render_path: True when the cameras are a render path (then exposures / metadata of image 0 are used).
    """
    split: utils.DataSplit
    data_dir: str
    images: Optional[Images]
    camtoworlds: np.ndarray
    pixtocams: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    near: float
    far: float
    camtype: camera_utils.ProjectionType = camera_utils.ProjectionType.PERSPECTIVE
    distortion_params: Optional[Dict[str, Any]] = None
    pixtocam_ndc: Optional[np.ndarray] = None
    image_names: Optional[List[str]] = None
    split_names: Optional[List[str]] = None
    split_indices: Optional[np.ndarray] = None
    disp_images: Optional[Images] = None
    normal_images: Optional[Images] = None
    alphas: Optional[Images] = None
    exposures: Optional[np.ndarray] = None
    metadata: Optional[Dict[str, Any]] = None
    poses: Optional[np.ndarray] = None
    render_poses: Optional[np.ndarray] = None
    render_exposures: Optional[np.ndarray] = None
    spline_indices: Optional[np.ndarray] = None
    focal: Optional[float] = None
    render_path: bool = False
    render_spherical: bool = False
    world_transform: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))

    @property
    def size(self) -> int:
        return int(self.camtoworlds.shape[0])

    @property
    def width(self) -> int:
        """Width of the first image (the render width when rendering)."""
        return int(self.widths[0])

    @property
    def height(self) -> int:
        return int(self.heights[0])


def make_scene(split: utils.DataSplit, data_dir: str, config: configs.Config, images: Optional[Images],
               camtoworlds: np.ndarray, pixtocams: np.ndarray, width: Optional[int] = None,
               height: Optional[int] = None, **fields) -> Scene:
    """A Scene from a loader's outputs: `pixtocams` `[3, 3]` is shared by all cameras, the sizes come from the
    images (or `width`, `height` when there are none)."""
    camtoworlds = np.asarray(camtoworlds)[:, :3, :4]
    n = camtoworlds.shape[0]
    if config.render_path and images is not None:  # The render settings drop the images, keep their size.
        height, width = images[0].shape[:2]
        images = None
    pixtocams = np.asarray(pixtocams)
    if pixtocams.ndim == 2:
        pixtocams = np.broadcast_to(pixtocams, (n, 3, 3)).copy()
    if images is None:
        widths, heights = np.full(n, width, dtype=np.int64), np.full(n, height, dtype=np.int64)
    else:
        if len(images) != n:
            raise DatasetError(f'{len(images)} images but {n} camera poses in {data_dir}; every image '
                               'needs exactly one pose (re-run COLMAP or fix the transforms file).')
        widths = np.array([im.shape[1] for im in images], dtype=np.int64)
        heights = np.array([im.shape[0] for im in images], dtype=np.int64)
    return Scene(split=split, data_dir=data_dir, images=images, camtoworlds=camtoworlds, pixtocams=pixtocams,
                 widths=widths, heights=heights, near=config.near, far=config.far, **fields)


# ---------------------------------------------------------------------------------------------------------------
# Image reading.

_EIGHT_BIT_MODES = ('1', 'L', 'LA', 'La', 'P', 'PA', 'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV')
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def list_images(folder: str) -> List[str]:
    """Sorted names of the image files of `folder` (DatasetNotFoundError if it does not exist)."""
    if not os.path.isdir(folder):
        raise DatasetNotFoundError(f'Image folder {folder} does not exist; put the images there (or run '
                                   '`python -m mipnerf360.colmap DATA_DIR` to make images_2/4/8).')
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))


def load_rgb(path: str) -> np.ndarray:
    """An RGB image `[H, W, 3]` as read: uint8 for 8-bit files (grey repeated, palette expanded, alpha
    dropped), float32 in [0, 1] for 16-bit files; float files are scaled by 1/255 (1/65535 above 255)."""
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f'Image file {path} does not exist; check the dataset folder.')
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in _EIGHT_BIT_MODES:
                return np.asarray(im.convert('RGB'), dtype=np.uint8)
            img = np.asarray(im, dtype=np.float32)
    except OSError as e:
        raise DatasetError(f'Cannot read image {path} ({e}); re-export it as PNG or JPEG.') from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if mode in _SIXTEEN_BIT_MODES:
        scale = 65535.
    else:
        scale = 65535. if img.max() > 255. else 255.
    return (img[..., :3] / scale).astype(np.float32)


def image_as_float(img: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: 8-bit images divided by 255, float images unchanged."""
    if img.dtype == np.uint8:
        return (img / 255.).astype(np.float32)
    return img


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Area-downsamples `[H, W, ...]` by an integer factor that divides H and W."""
    sh = img.shape
    if sh[0] % factor or sh[1] % factor:
        raise DatasetError(f'Downsampling factor {factor} does not evenly divide image shape {sh[:2]}; '
                           'choose another Config.factor.')
    return img.reshape((sh[0] // factor, factor, sh[1] // factor, factor) + sh[2:]).mean((1, 3))


def resize_area(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resizes `[H, W, C]` float images to (width, height) with area averaging (exact when it divides)."""
    w, h = size
    if img.shape[1] % w == 0 and img.shape[0] % h == 0 and img.shape[1] // w == img.shape[0] // h:
        return downsample(img, img.shape[1] // w)
    chans = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), 'F').resize((w, h), Image.BOX))
             for c in range(img.shape[-1])]
    return np.stack(chans, -1)


def stack_if_same(images: List[np.ndarray]) -> Images:
    """One `[N, H, W, ...]` array when all images have the same shape, else the list. A mix of 8-bit and float
    images (8- and 16-bit files) is made float32 in [0, 1] throughout (`image_as_float`)."""
    if len({im.dtype for im in images}) > 1:
        images = [image_as_float(im).astype(np.float32, copy=False) for im in images]
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


def split_indices(n: int, hold: int, split: utils.DataSplit, where: str, field: str,
                  train_all: bool = False) -> np.ndarray:
    """Every `hold`-th of `n` images is a test image, the others (or all with `train_all`) train images."""
    all_indices = np.arange(n)
    if split == utils.DataSplit.TEST:
        indices = all_indices[all_indices % hold == 0]
    else:
        indices = all_indices if train_all else all_indices[all_indices % hold != 0]
    if len(indices) == 0:
        raise DatasetError(f'The {split.value} split of {where} is empty ({n} images, {field}={hold}); add images '
                           f'or change Config.{field}.')
    return indices


def inverse_intrinsics(k: np.ndarray) -> np.ndarray:
    """The inverse of intrinsics `k` `[3, 3]`, NaN when singular (so that `check_camera` reports it)."""
    return np.linalg.inv(k) if np.linalg.det(k) else np.full((3, 3), np.nan)


def check_camera(camtoworld: np.ndarray, pixtocam: Optional[np.ndarray], source: str):
    """Raises a DatasetError naming `source` (the file and frame) unless the pose `[3, 4]` is finite with an
    orthonormal rotation and the inverse intrinsics `[3, 3]` (if given) are finite with positive focal lengths."""
    c2w = np.asarray(camtoworld, np.float64)
    if not np.all(np.isfinite(c2w)):
        raise DatasetError(f'{source}: the camera pose contains NaN or infinite values; fix or re-export the poses.')
    rot = c2w[:3, :3]
    err = np.abs(rot.T @ rot - np.eye(3)).max()
    if err > 1e-2:
        raise DatasetError(f'{source}: the camera rotation is not orthonormal (max |R^T R - I| = {err:.3g}); the '
                           'pose must be a rigid camera-to-world transform, re-export it.')
    if pixtocam is None:
        return
    inv_k = np.asarray(pixtocam, np.float64)
    if not np.all(np.isfinite(inv_k)) or inv_k[0, 0] <= 0 or inv_k[1, 1] <= 0:
        raise DatasetError(f'{source}: the intrinsics must be finite with positive focal lengths, got inverse '
                           f'intrinsics diagonal {np.diag(inv_k).tolist()}; fix the focal length / field of view.')


# ---------------------------------------------------------------------------------------------------------------
# Render paths.


def load_render_path_file(path: str, world_transform: Optional[np.ndarray] = None) -> np.ndarray:
    """Camera-to-worlds `[N, 3, 4]` (OpenGL, this dataset's normalised world) from `Config.render_path_file`:
    a `.npy` file of `[N, 3, 4]` or `[N, 4, 4]` poses (already in the normalised world), or a nerfstudio
    `camera_path.json` (`mipnerf360.camera_path`), whose poses are in the input data's world frame and are mapped
    by `world_transform` (unless the file says `"frame": "normalized"`)."""
    if path.lower().endswith('.json'):
        from mipnerf360 import camera_path  # pylint: disable=import-outside-toplevel
        return camera_path.read_camera_path(path).normalized_camtoworlds(
                np.eye(4) if world_transform is None else world_transform)
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f'Render path file {path} does not exist; set Config.render_path_file to a '
                                   '.npy file of [N, 3, 4] camera-to-world poses or a nerfstudio camera_path.json '
                                   '(or None for the automatic path).')
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


def _apply_render_settings(scene: Scene, config: configs.Config) -> Scene:
    """The render-path overrides of `Config` (path file, resolution, focal, camera type); drops the images.

    A camera_path.json gives the poses, the size, the per-frame fields of view and the camera type; the Config's
    `render_resolution` (the fov is kept), `render_focal` and `render_camtype` override them when set."""
    camtoworlds, render_poses = scene.camtoworlds, scene.render_poses
    width, height = scene.width, scene.height
    focal = scene.focal if config.render_focal is None else config.render_focal
    camtype, spherical = scene.camtype, False
    cpath = None
    path_file = config.render_path_file
    if path_file is not None and path_file.lower().endswith('.json'):
        from mipnerf360 import camera_path  # pylint: disable=import-outside-toplevel
        cpath = camera_path.read_camera_path(path_file)
        camtoworlds = render_poses = cpath.normalized_camtoworlds(scene.world_transform)
        width, height = cpath.width, cpath.height
        camtype = camera_utils.ProjectionType.PERSPECTIVE
        if cpath.camera_type == 'fisheye':
            camtype = camera_utils.ProjectionType.FISHEYE
        spherical = cpath.camera_type == 'equirectangular'
    elif path_file is not None:
        camtoworlds = render_poses = load_render_path_file(path_file)
    if config.render_resolution is not None:
        width, height = config.render_resolution
    if config.render_camtype is not None:
        spherical = config.render_camtype == 'pano'
        if not spherical:
            camtype = camera_utils.ProjectionType(config.render_camtype)
    n = camtoworlds.shape[0]
    if cpath is not None and config.render_focal is None:
        pixtocams = cpath.pixtocams(width, height)
        focal = 1. / pixtocams[0, 0, 0]
    else:
        pixtocams = np.broadcast_to(camera_utils.get_pixtocam(focal, width, height), (n, 3, 3)).copy()
    return dataclasses.replace(
            scene, images=None, camtoworlds=np.asarray(camtoworlds)[:, :3, :4], render_poses=render_poses,
            pixtocams=pixtocams, widths=np.full(n, width, dtype=np.int64), heights=np.full(n, height, dtype=np.int64),
            focal=focal, camtype=camtype, distortion_params=None, render_path=True, render_spherical=spherical)


def _loaders():
    # pylint: disable=import-outside-toplevel
    from mipnerf360.datasets import blender, dtu, llff, nerfstudio, tanks_temples
    return {
            'blender': blender.load_blender,
            'llff': llff.load_llff,
            'nerfstudio': nerfstudio.load_nerfstudio,
            'tat_nerfpp': tanks_temples.load_nerfpp,
            'tat_fvs': tanks_temples.load_fvs,
            'dtu': dtu.load_dtu,
    }


def load_scene(config: configs.Config, split: str, data_dir: Optional[str] = None) -> Scene:
    """Reads `split` ('train' or 'test') of the dataset at `data_dir` (default `config.data_dir`) with the
    loader named by `config.dataset_loader`; with `config.render_path` the cameras are the render path."""
    loaders = _loaders()
    if config.dataset_loader not in loaders:
        raise DatasetError(f'Unknown Config.dataset_loader {config.dataset_loader!r}; use one of '
                           f'{", ".join(sorted(loaders))}.')
    data_dir = config.data_dir if data_dir is None else data_dir
    if data_dir is None or not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f'Data directory {data_dir} does not exist; set Config.data_dir '
                                   "(--gin_bindings=\"Config.data_dir='/path/to/scene'\").")
    scene = loaders[config.dataset_loader](config, utils.DataSplit(split), data_dir)
    if config.render_path:
        scene = _apply_render_settings(scene, config)
    return scene
