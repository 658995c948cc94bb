"""Tanks and Temples, as processed by NeRF++ (`tat_nerfpp`) and by Free View Synthesis (`tat_fvs`)."""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from mipnerf360 import camera_utils
from mipnerf360 import configs
from mipnerf360 import utils
from mipnerf360.datasets.scene import (IMAGE_EXTENSIONS, DatasetError, DatasetNotFoundError, Scene, check_camera,
                                       inverse_intrinsics, list_images, load_rgb, make_scene, split_indices,
                                       stack_if_same)

_OPENCV_TO_OPENGL = np.diag(np.array([1., -1., -1., 1.]))


def _load_matrices(basedir: str, dirname: str) -> Tuple[np.ndarray, List[str]]:
    """The 4x4 matrices `[N, 4, 4]` of the text files of `basedir/dirname`, in sorted name order, and the files."""
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
    return np.stack(mats), files


def load_nerfpp(config: configs.Config, split: utils.DataSplit, data_dir: str) -> Scene:
    """NeRF++'s layout: `<split>/{pose,intrinsics,rgb}/`, one file per image.

    `pose/*.txt` are 4x4 OpenCV camera-to-worlds, `intrinsics/*.txt` 4x4 matrices with K in the top-left block
    (16 numbers each, any line layout). Files of the three folders are paired by sorted order. With
    `Config.render_path` the poses come from `camera_path/` (size from the first test image). Unlike the
    reference (first focal length, centred principal point for all images) every image's own intrinsics are
    used for training and test. The world is the files' (identity `world_transform`).
    """
    basedir = os.path.join(data_dir, 'camera_path' if config.render_path else split.value)
    poses, pose_files = _load_matrices(basedir, 'pose')
    poses = (poses @ _OPENCV_TO_OPENGL)[:, :3, :4]
    intrinsics, intrinsics_files = _load_matrices(basedir, 'intrinsics')
    if len(intrinsics) != len(poses):
        raise DatasetError(f'{basedir} has {len(poses)} pose files but {len(intrinsics)} intrinsics files; '
                           'every image needs one of each.')
    for pose, k, pose_file, k_file in zip(poses, intrinsics, pose_files, intrinsics_files):
        check_camera(pose, inverse_intrinsics(k[:3, :3]), f'{pose_file} / {k_file}')
    focal = intrinsics[0, 0, 0]
    if not config.render_path:
        rgb_dir = os.path.join(basedir, 'rgb')
        images = [load_rgb(os.path.join(rgb_dir, f)) for f in list_images(rgb_dir)]
        if len(images) != len(poses):
            raise DatasetError(f'{rgb_dir} has {len(images)} images but {basedir}/pose has {len(poses)} '
                               'poses; they must match one to one (paired in sorted name order).')
        pixtocams = np.stack([np.linalg.inv(k[:3, :3]) for k in intrinsics]).astype(np.float32)
        return make_scene(split, data_dir, config, stack_if_same(images), poses, pixtocams, focal=focal)
    d = os.path.join(data_dir, 'test', 'rgb')
    names = list_images(d)
    if not names:
        raise DatasetError(f'No images in {d}; the render path takes its image size from the first test '
                           'image (or set Config.render_resolution).')
    height, width = load_rgb(os.path.join(d, names[0])).shape[:2]
    return make_scene(split, data_dir, config, None, poses, camera_utils.get_pixtocam(focal, width, height),
                      width=width, height=height, focal=focal, render_poses=poses)


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f'{path} does not exist; an FVS scene folder needs Ks.npy, Rs.npy and ts.npy '
                                   f'({what}) next to the im_*.jpg images.')
    try:
        return np.load(path, allow_pickle=False).astype(np.float64)
    except (OSError, ValueError) as e:
        raise DatasetError(f'Cannot read {path} ({e}); re-save it with numpy.save.') from None


def load_fvs(config: configs.Config, split: utils.DataSplit, data_dir: str) -> Scene:
    """Free View Synthesis' layout: `dense/ibr3d_*/{im_*.jpg, Ks, Rs, ts}.npy`.

    `Ks` `[N, 3, 3]` intrinsics, `Rs` `[N, 3, 3]` and `ts` `[N, 3]` the OpenCV world-to-camera transforms
    (x_cam = R x + t), in the sorted order of the `im_*` files. The `ibr3d_*` folders sorted in reverse order
    are indexed by `Config.factor` (0: the last name, e.g. ibr3d_pw_0.50). Poses are PCA-aligned
    (`transform_poses_pca`, the transform kept in `world_transform`); every image's own intrinsics are used
    (the reference takes the first focal length and a centred principal point for all).
    """
    render_only = config.render_path and split == utils.DataSplit.TEST
    basedir = os.path.join(data_dir, 'dense')
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
    for i, f in enumerate(files):
        w2c = np.concatenate([rot[i], trans[i][:, None]], -1)
        check_camera(w2c, inverse_intrinsics(intrinsics[i]), f'{basedir} Rs.npy / ts.npy / Ks.npy entry {i} '
                                                             f'({f})')
    images = [load_rgb(os.path.join(basedir, f)) for f in (files[:1] if render_only else files)]

    w2c = np.concatenate([rot, trans[..., None]], axis=-1)
    c2w = np.linalg.inv(camera_utils.pad_poses(w2c))[:, :3, :4] @ _OPENCV_TO_OPENGL
    poses, transform = camera_utils.transform_poses_pca(c2w)
    pixtocams = np.linalg.inv(intrinsics).astype(np.float32)
    common = dict(image_names=files, poses=poses, focal=intrinsics[0, 0, 0], world_transform=transform)
    if render_only:
        render_poses = camera_utils.generate_ellipse_path(
                poses, config.render_path_frames, z_variation=config.z_variation, z_phase=config.z_phase)
        height, width = images[0].shape[:2]
        return make_scene(split, data_dir, config, None, render_poses, pixtocams[0], width=width, height=height,
                          render_poses=render_poses, **common)
    indices = split_indices(n, config.llffhold, split, basedir, 'llffhold')
    return make_scene(split, data_dir, config, stack_if_same([images[i] for i in indices]), poses[indices],
                      pixtocams[indices], split_indices=indices, split_names=[files[i] for i in indices],
                      **common)
