"""Containers for rays and batches, and small file helpers.

``Rays``, ``Pixels`` and ``Batch`` are dataclasses of tensors (or numpy arrays) that share leading batch
dimensions. They move to a device, reshape and slice as one, via ``tree_map``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from PIL import ExifTags, Image

Array = Union[np.ndarray, torch.Tensor]


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Applies `fn` to every array leaf of a (nested) dataclass / dict / list / tuple; None stays None."""
    if tree is None:
        return None
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return type(tree)(**{f.name: tree_map(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree)})
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def tree_leaves(tree: Any) -> list:
    """The array leaves of a tree, in field order (None leaves dropped)."""
    out = []
    tree_map(out.append, tree)
    return out


class _TreeMixin:
    """Device moves, reshapes and indexing shared by the ray/batch containers."""

    def map(self, fn: Callable[[Any], Any]):
        return tree_map(fn, self)

    def to(self, *args, **kwargs):
        """`torch.Tensor.to` on every leaf (numpy leaves are converted to tensors first)."""
        def move(x):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            return x.to(*args, **kwargs) if isinstance(x, torch.Tensor) else x
        return tree_map(move, self)

    def numpy(self):
        return tree_map(lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, self)

    def reshape(self, *batch_shape: int):
        """Reshapes the leading batch dimensions of every leaf (the trailing feature dimension is kept)."""
        return tree_map(lambda x: x.reshape(tuple(batch_shape) + tuple(x.shape[-1:])), self)

    def __getitem__(self, idx):
        return tree_map(lambda x: x[idx], self)

    @property
    def batch_shape(self):
        return tree_leaves(self)[0].shape[:-1]


@dataclasses.dataclass
class Pixels(_TreeMixin):
    """Pixel coordinates from which rays are cast (rays computed on the model's device)."""
    pix_x_int: Array
    pix_y_int: Array
    lossmult: Array
    near: Array
    far: Array
    cam_idx: Array
    exposure_idx: Optional[Array] = None
    exposure_values: Optional[Array] = None


@dataclasses.dataclass
class Rays(_TreeMixin):
    """A bundle of rays; every field is `[..., C]` with the same leading dimensions.

    origins/directions/viewdirs: `[..., 3]` (directions are NOT normalised: unit camera-space z; viewdirs are);
    radii: `[..., 1]` base radius of the cone at unit distance; imageplane: `[..., 2]`;
    lossmult/near/far: `[..., 1]`; cam_idx: `[..., 1]` integer; exposure_*: `[..., 1]` or None.
    """
    origins: Array
    directions: Array
    viewdirs: Array
    radii: Array
    imageplane: Array
    lossmult: Array
    near: Array
    far: Array
    cam_idx: Array
    exposure_idx: Optional[Array] = None
    exposure_values: Optional[Array] = None


def dummy_rays(include_exposure_idx: bool = False, include_exposure_values: bool = False,
                              device=None) -> Rays:
    """A single all-zero ray (useful to build or probe a model)."""
    data_fn = lambda n: torch.zeros((1, n), device=device)
    kwargs = {}
    if include_exposure_idx:
        kwargs['exposure_idx'] = data_fn(1).long()
    if include_exposure_values:
        kwargs['exposure_values'] = data_fn(1)
    return Rays(origins=data_fn(3), directions=data_fn(3), viewdirs=data_fn(3), radii=data_fn(1),
                            imageplane=data_fn(2), lossmult=data_fn(1), near=data_fn(1), far=data_fn(1),
                            cam_idx=data_fn(1).long(), **kwargs)


@dataclasses.dataclass
class Batch(_TreeMixin):
    """Data batch for NeRF training or testing: rays (or pixels) plus the targets that go with them."""
    rays: Union[Pixels, Rays]
    rgb: Optional[Array] = None
    disps: Optional[Array] = None
    normals: Optional[Array] = None
    alphas: Optional[Array] = None


class DataSplit(enum.Enum):
    TRAIN = 'train'
    TEST = 'test'


class BatchingMethod(enum.Enum):
    """Draw rays randomly from a single image or all images, in each batch."""
    ALL_IMAGES = 'all_images'
    SINGLE_IMAGE = 'single_image'


def open_file(pth, mode='r'):
    return open(pth, mode=mode)


def file_exists(pth) -> bool:
    return os.path.exists(pth)


def listdir(pth):
    return os.listdir(pth)


def isdir(pth) -> bool:
    return os.path.isdir(pth)


def makedirs(pth):
    os.makedirs(pth, exist_ok=True)


class ImageFileError(ValueError):
    """An image file that cannot be read (a user-facing error: the message names the file and what to do)."""


class ImageFileNotFoundError(ImageFileError, FileNotFoundError):
    """An image file that does not exist."""


def load_img(pth: str) -> np.ndarray:
    """Loads an image as float32 (values in the file's own range, e.g. 0..255 for 8-bit)."""
    try:
        with open_file(pth, 'rb') as f:
            return np.array(Image.open(f), dtype=np.float32)
    except FileNotFoundError:
        raise ImageFileNotFoundError(f'Image file not found: {pth}') from None
    except OSError as e:
        raise ImageFileError(f'Cannot read image {pth} ({e}); re-export it as PNG or JPEG.') from None


def load_exif(pth: str) -> Dict[str, Any]:
    """EXIF tags of an image, by name ({} when there are none)."""
    with open_file(pth, 'rb') as f:
        exif_pil = Image.open(f).getexif()
    return {ExifTags.TAGS[k]: v for k, v in exif_pil.items() if k in ExifTags.TAGS}


def _atomic_save(pth: str, save_fn: Callable[[str], None]):
    tmp = f'{pth}.tmp{os.getpid()}'
    try:
        save_fn(tmp)
        os.replace(tmp, pth)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_text(pth: str, text: str):
    """Writes `text` to `pth` (atomically)."""
    def save(p):
        with open(p, 'w') as f:
            f.write(text)
    _atomic_save(pth, save)


def to_uint8(img: Any) -> np.ndarray:
    """The 8-bit image of `img` (values in [0, 1]): round-to-nearest of clip(nan_to_num(img), 0, 1) * 255, computed
    in the image's own float precision (float16 in float32, where v * 255 is exact). The one conversion used for
    PNGs, videos, exports, the viewer and eval's quantised metrics, so a saved PNG is exactly the image the metrics
    were computed on. An image already in 8 bits is returned as it is."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if img.dtype.kind != 'f':
        img = img.astype(np.float64)
    elif img.dtype.itemsize < 4:
        img = img.astype(np.float32)
    return np.round(np.clip(np.nan_to_num(img), 0., 1.) * 255.).astype(np.uint8)


def save_img_u8(img: np.ndarray, pth: str):
    """Saves an image in [0, 1] as an 8-bit PNG (`to_uint8`; written atomically)."""
    arr = to_uint8(img)
    _atomic_save(pth, lambda p: Image.fromarray(arr).save(p, 'PNG'))


def save_img_f32(depthmap: np.ndarray, pth: str):
    """Saves a single-channel float image (e.g. a depth map) as a float32 TIFF (written atomically)."""
    arr = np.nan_to_num(np.asarray(depthmap)).astype(np.float32)
    _atomic_save(pth, lambda p: Image.fromarray(arr).save(p, 'TIFF'))


def tune_glibc_malloc() -> bool:
    """Keeps freed memory in the process (glibc only): serve large blocks from the heap rather than fresh mmaps,
    and never trim the heap. Without this every large tensor of a training step is a fresh mapping whose pages
    the kernel faults in and zeroes again (high `sys` time). Same effect as starting Python with
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647. Returns whether it took effect."""
    import ctypes
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
