"""DTU: `<scan>/rect_{i:03d}_{light}_r5000.png` and `<scan>/../../cal18/pos_{i:03d}.txt` projection matrices."""

from __future__ import annotations

import os
import re

import numpy as np

from mipnerf360 import camera_utils
from mipnerf360 import configs
from mipnerf360 import utils
from mipnerf360.datasets.scene import (DatasetError, DatasetNotFoundError, Scene, downsample, image_as_float,
                                       load_rgb, make_scene, split_indices, stack_if_same)

_DTU_NAME = re.compile(r'^rect_(\d{3})_.*\.png$')


def _load_projection(fname: str) -> np.ndarray:
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
    return projection


def load_dtu(config: configs.Config, split: utils.DataSplit, data_dir: str) -> Scene:
    """DTU: `<scan>/rect_{i:03d}_{light}_r5000.png` (r7000 from image 50 on; `rect_{i:03d}_max.png` for light
    7) and `<scan>/../../cal18/pos_{i:03d}.txt` 3x4 projection matrices P = K [R | t] (up to scale).

    `Config.dtu_light_cond` picks the lighting (0-6, 7 = max) and every `Config.dtuhold`-th image is a test
    image. Poses are decomposed with OpenCV, recentred on their average pose, scaled so that the largest
    centre coordinate is 1, then flipped to OpenGL (the world transform is kept in `world_transform`). The
    images are those numbered 1..n where n is the number of distinct image numbers in the folder (the
    reference counts the files and divides by 8).
    """
    import cv2  # pylint: disable=import-outside-toplevel
    if config.render_path:
        raise DatasetError('render_path cannot be used with the DTU dataset (as in the reference); set '
                           'Config.render_path=False.')
    light_cond = int(getattr(config, 'dtu_light_cond', 3))
    dtuhold = int(getattr(config, 'dtuhold', 8))
    numbers = {int(m.group(1)) for m in map(_DTU_NAME.match, os.listdir(data_dir)) if m}
    n_images = len(numbers)
    if n_images == 0:
        raise DatasetError(f'No DTU images (rect_XXX_*.png) in {data_dir}; set Config.data_dir to a scan '
                           'folder of the Rectified DTU images.')
    images, pixtocams, camtoworlds = [], [], []
    for i in range(1, n_images + 1):
        if light_cond < 7:
            light_str = f'{light_cond}_r' + ('5000' if i < 50 else '7000')
        else:
            light_str = 'max'
        image = load_rgb(os.path.join(data_dir, f'rect_{i:03d}_{light_str}.png'))
        if config.factor > 1:
            image = downsample(image_as_float(image), config.factor)
        images.append(image)
        projection = _load_projection(os.path.normpath(os.path.join(data_dir, f'../../cal18/pos_{i:03d}.txt')))
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
    camtoworlds, transform = camera_utils.recenter_poses(np.stack(camtoworlds))
    camtoworlds = camtoworlds.copy()
    scale = 1. / np.max(np.abs(camtoworlds[:, :3, -1]))
    camtoworlds[:, :3, -1] *= scale
    camtoworlds = camtoworlds @ np.diag([1., -1., -1., 1.])
    indices = split_indices(len(images), dtuhold, split, data_dir, 'dtuhold')
    pixtocams = pixtocams[indices].astype(np.float32)
    return make_scene(split, data_dir, config, stack_if_same([images[i] for i in indices]), camtoworlds[indices],
                      pixtocams, split_indices=indices, split_names=[f'rect_{i + 1:03d}' for i in indices],
                      focal=1. / pixtocams[0, 0, 0], world_transform=np.diag([scale] * 3 + [1.]) @ transform)
