"""nerfstudio / instant-NGP captures: `transforms.json` (shared or per-frame intrinsics) + images.

Frames' `file_path`s are relative to the data directory; with `Config.factor = f`, the image is read from the
sibling folder `<dir>_f` (nerfstudio's `images_2`, ...) when it exists, else downsampled in memory. Processed as
LLFF scenes (PCA-aligned unless forward_facing, every llffhold-th image held out).
"""

from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np

from mipnerf360 import configs
from mipnerf360 import utils
from mipnerf360.datasets.blender import load_blender_posedata
from mipnerf360.datasets.llff import load_colmap_like
from mipnerf360.datasets.scene import Scene, image_as_float, load_rgb, resize_area


def _image_paths(data_dir: str, image_names: Sequence[str], image_dir_suffix: str) -> List[str]:
    paths = []
    for name in image_names:
        full = os.path.join(data_dir, name)
        if image_dir_suffix:
            head, tail = os.path.split(name)
            cand = os.path.join(data_dir, (head or 'images').rstrip('/') + image_dir_suffix, tail)
            if os.path.isfile(cand):
                paths.append(cand)
                continue
        paths.append(full)
    return paths


def _read_image(path: str, factor: int) -> np.ndarray:
    img = load_rgb(path)
    if factor > 1 and not os.path.normpath(os.path.dirname(path)).endswith(f'_{factor}'):
        h, w = img.shape[:2]  # No pre-shrunk copy: downsample in memory, size rounded as COLMAP folders.
        img = resize_area(image_as_float(img), (int(np.floor(w / factor + .5)), int(np.floor(h / factor + .5))))
    return img


def load_nerfstudio(config: configs.Config, split: utils.DataSplit, data_dir: str) -> Scene:
    """A nerfstudio capture (see the module docstring)."""
    return load_colmap_like(config, split, data_dir, load_blender_posedata, _image_paths, _read_image)
