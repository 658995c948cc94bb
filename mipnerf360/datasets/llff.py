"""COLMAP scenes (mip-NeRF 360 and LLFF layouts): `sparse/0`, `images/`, `images_N/` (matched by file stem);
else `transforms.json`; else LLFF's `poses_bounds.npy`. 360 scenes are PCA-normalised; forward-facing scenes
(`Config.forward_facing`) scaled by 1 / (0.75 near_min), recentred and rendered in NDC. RawNeRF scenes
(`Config.rawnerf_mode`) read the raw files through `raw_utils`.

`images_N` folders whose size differs from the COLMAP size / N by up to one pixel (the official rounded folders)
are accepted with intrinsics scaled by the actual ratio; larger differences raise.

COLMAP scenes print how many of the photos in `images/` the model registered (`check_registration`); fewer
than `Config.min_registered_fraction` of them is a DatasetError.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, Set, Tuple

import numpy as np

from mipnerf360 import camera_utils
from mipnerf360 import colmap
from mipnerf360 import configs
from mipnerf360 import utils
from mipnerf360.datasets.blender import load_blender_posedata
from mipnerf360.datasets.scene import (DatasetError, DatasetNotFoundError, Scene, check_camera, list_images,
                                       load_rgb, make_scene, split_indices, stack_if_same)

PoseData = Tuple[List[str], np.ndarray, np.ndarray, Optional[dict], camera_utils.ProjectionType,
                 Optional[np.ndarray]]


def load_poses_bounds(path: str) -> np.ndarray:
    """LLFF's `poses_bounds.npy` as a validated `[N, 17]` float64 array (see `_load_poses_bounds_posedata`)."""
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


def _load_poses_bounds_posedata(data_dir: str) -> PoseData:
    """LLFF's poses_bounds.npy (no COLMAP model): one row per image of `images/` (sorted by name), holding
    a flattened `[3, 5]` matrix [R | t | hwf] and the near/far bounds. R's columns are the camera's (down,
    right, back) axes (LLFF's imgs2poses order); t the camera centre; hwf the full-resolution height, width
    and focal length (principal point at the image centre). OpenGL camera-to-world = (right, -down, back).
    """
    path = os.path.join(data_dir, 'poses_bounds.npy')
    arr = load_poses_bounds(path)
    names = list_images(os.path.join(data_dir, 'images'))
    if len(names) != arr.shape[0]:
        raise DatasetError(f'{path} has {arr.shape[0]} poses but {os.path.join(data_dir, "images")} '
                           f'has {len(names)} images; they must match one to one (one row per image, in '
                           'sorted name order): regenerate poses_bounds.npy for these images.')
    mats = arr[:, :15].reshape(-1, 3, 5)
    hwf = mats[:, :, 4]
    poses = np.concatenate([mats[:, :, 1:2], -mats[:, :, 0:1], mats[:, :, 2:4]], -1)
    pixtocams = np.stack([np.linalg.inv(camera_utils.intrinsic_matrix(f, f, w / 2., h / 2.))
                          for h, w, f in hwf])
    for i, name in enumerate(names):
        check_camera(poses[i], pixtocams[i], f'{path} row {i} ({name})')
        near, far = arr[i, 15:]
        if not 0 < near < far:
            raise DatasetError(f'{path} row {i} ({name}) has bounds near={near:g}, far={far:g}; they must satisfy '
                               '0 < near < far: regenerate poses_bounds.npy.')
    sizes = np.round(hwf[:, [1, 0]]).astype(np.int64)
    return names, poses, pixtocams, None, camera_utils.ProjectionType.PERSPECTIVE, sizes


def load_llff_posedata(data_dir: str) -> PoseData:
    """-> names, poses [N, 3, 4], pixtocams [N, 3, 3] (full resolution), distortion, camtype, sizes."""
    colmap_dir = os.path.join(data_dir, 'sparse', '0')
    if os.path.isdir(colmap_dir):
        mgr = colmap.NeRFSceneManager(colmap_dir)
        try:
            names, poses, pixtocams, dist, camtype = mgr.process()
        except colmap.ColmapError as e:
            raise DatasetError(str(e)) from None
        return names, poses, pixtocams, dist, camtype, mgr.sizes
    if os.path.isfile(os.path.join(data_dir, 'transforms.json')):
        names, poses, pixtocams, dist, camtype, sizes = load_blender_posedata(data_dir)
        return [os.path.basename(n) for n in names], poses, pixtocams, dist, camtype, sizes
    if os.path.isfile(os.path.join(data_dir, 'poses_bounds.npy')):
        return _load_poses_bounds_posedata(data_dir)
    if os.path.isfile(os.path.join(data_dir, 'transforms_train.json')):
        raise DatasetNotFoundError(f'{data_dir} is a Blender scene (transforms_train.json), but Config.dataset_loader '
                                   "is 'llff' (COLMAP / LLFF layouts); use --gin_configs=configs/blender_256.gin, or "
                                   "add --gin_bindings=\"Config.dataset_loader = 'blender'\".")
    raise DatasetNotFoundError(f'No cameras in {data_dir}: expected sparse/0 (COLMAP), transforms.json '
                               'or poses_bounds.npy; run `python -m mipnerf360.colmap DATA_DIR` or '
                               'scripts/local_colmap_and_resize.sh DATA_DIR first.')


_MAX_LISTED = 10  # Names of left-out photos printed before "and K more".
_reported: Set[Tuple[str, int, int]] = set()  # (data_dir, registered, total) already printed by this process.


def _report_detail(data_dir: str, registered: int, total: int) -> str:
    """What `python -m mipnerf360.colmap` wrote to sparse/colmap_report.json about this model, or ''."""
    path = os.path.join(data_dir, 'sparse', colmap.REPORT_NAME)
    try:
        with open(path) as f:
            report = json.load(f)
        if report['registered'] != registered or report['total'] != total:
            return f'; {path} describes another model ({report["registered"]} of {report["total"]}), ignored'
        attempts = ', '.join(f'{a["settings"]["name"]} settings {a["registered"]}' for a in report['attempts'])
        error = report['mean_reprojection_error_px']
        return f'; pycolmap attempts: {attempts}; mean reprojection error {error:.2f} px'
    except FileNotFoundError:
        return ''
    except (OSError, ValueError, KeyError, TypeError):
        return f'; {path} is unreadable, ignored'


def check_registration(data_dir: str, names: Sequence[str], min_fraction: float) -> str:
    """Compares the COLMAP model's image names with the photos of `images/`; prints (once per process) and
    returns the line "COLMAP registered M of N photos in DIR; left out: ...". Raises DatasetError when fewer than
    `min_fraction` of the photos registered (Config.min_registered_fraction)."""
    photos = list_images(os.path.join(data_dir, 'images'))
    posed = set(names)
    left_out = [p for p in photos if p not in posed]
    m, n = len(photos) - len(left_out), len(photos)
    line = f'COLMAP registered {m} of {n} photos in {data_dir}'
    if left_out:
        more = f' and {len(left_out) - _MAX_LISTED} more' if len(left_out) > _MAX_LISTED else ''
        line += (f'; left out: {", ".join(left_out[:_MAX_LISTED])}{more} (see README: When too few photos '
                 'register)')
    line += _report_detail(data_dir, m, n)
    if m < min_fraction * n:
        raise DatasetError(f'{line}. That is fewer than Config.min_registered_fraction = {min_fraction:g} of them: '
                           'pose the photos again (python -m mipnerf360.colmap DATA_DIR retries with settings for '
                           'hard captures; the script: HARD=2) or take more overlapping photos, or set '
                           'Config.min_registered_fraction = 0 to train on the registered ones.')
    key = (os.path.abspath(data_dir), m, n)
    if key not in _reported:
        _reported.add(key)
        print(line, flush=True)
    return line


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def llff_image_paths(data_dir: str, names: Sequence[str], image_dir_suffix: str) -> List[str]:
    """The files of `images{suffix}/` for the COLMAP image names (files of `images/`).

    The files are matched by name without extension (`images_4/a.png` for `images/a.JPG`); a file missing from
    either folder raises. A folder none of whose names match (LLFF's release renames `images_8/` to
    image000.png, ...) is paired by sorted position, as the reference does, when the counts agree.
    """
    colmap_image_dir = os.path.join(data_dir, 'images')
    image_dir = os.path.join(data_dir, 'images' + image_dir_suffix)
    colmap_files = list_images(colmap_image_dir)
    image_files = list_images(image_dir)
    if not image_files:
        raise DatasetError(f'No images in {image_dir}; add the images (PNG/JPEG) or fix Config.data_dir.')
    missing = [n for n in names if n not in colmap_files]
    if missing:
        raise DatasetError(f'{len(missing)} posed images (e.g. {missing[0]!r}) are not in {colmap_image_dir}; '
                           'the images and poses do not match, re-run COLMAP on these images.')
    by_stem = {}
    for f in image_files:
        if _stem(f) in by_stem:
            raise DatasetError(f'{image_dir} holds both {by_stem[_stem(f)]} and {f}; keep one image per name.')
        by_stem[_stem(f)] = f
    colmap_stems = {_stem(f) for f in colmap_files}
    if colmap_stems.isdisjoint(by_stem):
        if len(colmap_files) != len(image_files):
            raise DatasetError(f'{colmap_image_dir} has {len(colmap_files)} images but {image_dir} has '
                               f'{len(image_files)} (paired by sorted position since no name matches); '
                               f'regenerate {image_dir} from images/.')
        colmap_to_image = dict(zip(colmap_files, image_files))
        return [os.path.join(image_dir, colmap_to_image[n]) for n in names]
    absent = [f for f in colmap_files if _stem(f) not in by_stem]
    if absent:
        raise DatasetError(f'{image_dir} has no image named {_stem(absent[0])}.* for {colmap_image_dir}/'
                           f'{absent[0]} ({len(absent)} missing); regenerate {image_dir} from images/.')
    extra = [f for f in image_files if _stem(f) not in colmap_stems]
    if extra:
        raise DatasetError(f'{image_dir}/{extra[0]} has no counterpart in {colmap_image_dir} ({len(extra)} extra '
                           f'files); remove it or regenerate {image_dir} from images/.')
    return [os.path.join(image_dir, by_stem[_stem(n)]) for n in names]


def scaled_pixtocam(pixtocam: np.ndarray, full_size: Optional[Tuple[int, int]], actual_size: Tuple[int, int],
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


def load_exposures(data_dir: str, image_names: Sequence[str]) -> Optional[np.ndarray]:
    """Exposure time x ISO / 1000 per image from the EXIF of the JPEGs of `images/` (None without them)."""
    jpeg_paths = [os.path.join(data_dir, 'images', f) for f in image_names]
    if not jpeg_paths or not jpeg_paths[0].lower().endswith(('.jpg', '.jpeg')):
        return None
    try:
        exifs = [utils.load_exif(p) for p in jpeg_paths]
    except (OSError, ValueError):
        return None
    if 'ExposureTime' in exifs[0] and 'ISOSpeedRatings' in exifs[0]:
        gather = lambda k: np.array([float(x[k]) for x in exifs])
        return gather('ExposureTime') * gather('ISOSpeedRatings') / 1000.
    return None


def load_colmap_like(config: configs.Config, split: utils.DataSplit, data_dir: str,
                     load_posedata: Callable[[str], PoseData],
                     image_paths: Callable[[str, Sequence[str], str], List[str]],
                     read_image: Callable[[str, int], np.ndarray]) -> Scene:
    """The LLFF processing of posed images: reading, intrinsics scaling, normalisation, render path, split."""
    image_dir_suffix = ''
    if config.factor > 0 and not (config.rawnerf_mode and split == utils.DataSplit.TRAIN):
        image_dir_suffix = f'_{config.factor}'
        factor = config.factor
    else:
        factor = 1
    image_names, poses, pixtocams, distortion_params, camtype, sizes = load_posedata(data_dir)
    if config.load_alphabetical:
        inds = np.argsort(image_names, kind='stable')
        image_names = [image_names[i] for i in inds]
        poses = poses[inds]
        pixtocams = pixtocams[inds]
        sizes = None if sizes is None else sizes[inds]
        if distortion_params is not None:
            distortion_params = {k: (v[inds] if np.ndim(v) else v) for k, v in distortion_params.items()}

    raw_testscene = False
    metadata, exposures = None, None
    if config.rawnerf_mode:
        from mipnerf360 import raw_utils  # pylint: disable=import-outside-toplevel
        images, metadata, raw_testscene = raw_utils.load_raw_dataset(
                split, data_dir, image_names, config.exposure_percentile, factor)
        images = list(images)
        pixtocams = pixtocams @ np.diag([factor, factor, 1.])
    else:
        paths = image_paths(data_dir, image_names, image_dir_suffix)
        images = [read_image(p, factor) for p in paths]
        pixtocams = np.stack([
                scaled_pixtocam(pixtocams[i], None if sizes is None else tuple(sizes[i]),
                                (im.shape[1], im.shape[0]), factor, paths[i])
                for i, im in enumerate(images)])
        exposures = load_exposures(data_dir, image_names)
    pixtocams = pixtocams.astype(np.float32)
    focal = 1. / pixtocams[0, 0, 0]

    posefile = os.path.join(data_dir, 'poses_bounds.npy')
    if os.path.isfile(posefile):
        bounds = load_poses_bounds(posefile)[:, -2:]
    else:
        bounds = np.array([0.01, 1.])

    pixtocam_ndc, spline_indices, render_exposures = None, None, None
    if config.forward_facing:
        pixtocam_ndc = pixtocams[0]
        scale = 1. / (bounds.min() * .75)
        poses = poses.copy()
        poses[:, :3, 3] *= scale
        bounds = bounds * scale
        poses, transform = camera_utils.recenter_poses(poses)
        world_transform = transform @ np.diag([scale] * 3 + [1])
        render_poses = camera_utils.generate_spiral_path(poses, bounds, n_frames=config.render_path_frames)
    else:
        poses, world_transform = camera_utils.transform_poses_pca(poses)
        if config.render_spline_keyframes is not None:
            # Raw scenes' exposures are their shutters relative to the longest (one per posed image, except
            # in a test scene, whose metadata covers only the split).
            path_exposures = exposures
            if config.rawnerf_mode and not raw_testscene:
                path_exposures = metadata['exposure_values']
            spline_indices, render_poses, render_exposures = camera_utils.create_render_spline_path(
                    config, image_names, poses, path_exposures)
        else:
            render_poses = camera_utils.generate_ellipse_path(
                    poses, n_frames=config.render_path_frames, z_variation=config.z_variation,
                    z_phase=config.z_phase)

    if raw_testscene:
        # RawNeRF test scenes: image 0 is the merged test frame, the others the training frames.
        poses = {utils.DataSplit.TEST: poses[:1], utils.DataSplit.TRAIN: poses[1:]}[split]
        pixtocams = {utils.DataSplit.TEST: pixtocams[:1], utils.DataSplit.TRAIN: pixtocams[1:]}[split]
        indices = np.arange(len(images))
    else:
        indices = split_indices(len(images), config.llffhold, split, data_dir, 'llffhold',
                                train_all=config.llff_use_all_images_for_training)
        pixtocams = pixtocams[indices]
    all_poses = poses
    images = [images[i] for i in indices]
    poses = poses[indices]
    if distortion_params is not None:
        distortion_params = {k: (v[indices] if np.ndim(v) else v) for k, v in distortion_params.items()}
    if exposures is not None:
        exposures = exposures[indices]
    if config.rawnerf_mode:
        for key in ['exposure_idx', 'exposure_values']:
            metadata[key] = metadata[key][indices]
    split_names = [image_names[i] for i in indices] if not raw_testscene else list(image_names)
    return make_scene(
            split, data_dir, config, stack_if_same(images), render_poses if config.render_path else poses,
            pixtocams, camtype=camtype, distortion_params=distortion_params, pixtocam_ndc=pixtocam_ndc,
            image_names=image_names, split_names=split_names, split_indices=indices, exposures=exposures,
            metadata=metadata, poses=all_poses, render_poses=render_poses, render_exposures=render_exposures,
            spline_indices=spline_indices, focal=focal, world_transform=world_transform)


def _read_llff_image(path: str, factor: int) -> np.ndarray:  # pylint: disable=unused-argument
    return load_rgb(path)


def load_llff(config: configs.Config, split: utils.DataSplit, data_dir: str) -> Scene:
    """COLMAP / LLFF scene (see the module docstring); images come from `images_{Config.factor}/`."""
    def load_posedata(d: str) -> PoseData:
        posedata = load_llff_posedata(d)
        if os.path.isdir(os.path.join(d, 'sparse', '0')) and os.path.isdir(os.path.join(d, 'images')):
            check_registration(d, posedata[0], config.min_registered_fraction)
        return posedata

    return load_colmap_like(config, split, data_dir, load_posedata, llff_image_paths, _read_llff_image)
