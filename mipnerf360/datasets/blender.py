"""NeRF-synthetic (Blender) scenes: `transforms_{split}.json` + RGBA PNGs; the transforms.json reader shared with
the COLMAP-free LLFF and nerfstudio layouts; the circular orbit render path of object captures."""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

import numpy as np
from PIL import Image

from mipnerf360 import camera_utils
from mipnerf360 import colmap
from mipnerf360 import configs
from mipnerf360 import utils
from mipnerf360.datasets.scene import (IMAGE_EXTENSIONS, DatasetError, DatasetNotFoundError, Scene, check_camera,
                                       downsample, inverse_intrinsics, make_scene)


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


def _read_json(pose_file: str) -> dict:
    try:
        with open(pose_file, 'r') as fp:
            return json.load(fp)
    except json.JSONDecodeError as e:
        raise DatasetError(f'Corrupt json in {pose_file} ({e}); re-export it.') from None


def _require(entry: dict, key: str, pose_file: str, where: str):
    """`entry[key]`, or a DatasetError naming the key, the file and where in it."""
    if key not in entry:
        raise DatasetError(f'{pose_file}: {where} has no {key!r} key; add it (transforms.json format: a '
                           "top-level 'frames' list of {'file_path', 'transform_matrix'} and the intrinsics).")
    return entry[key]


def _frame_pose(frame: dict, pose_file: str, where: str, dtype=np.float64) -> np.ndarray:
    """The `[3, 4]` camera-to-world of a frame's transform_matrix (a 4x4 or 3x4 nested list)."""
    matrix = _require(frame, 'transform_matrix', pose_file, where)
    try:
        pose = np.array(matrix, dtype=dtype)
    except (TypeError, ValueError):
        pose = np.zeros(0)
    if pose.shape not in ((4, 4), (3, 4)):
        raise DatasetError(f'{pose_file}: the transform_matrix of {where} must be a 4x4 matrix, got shape '
                           f'{pose.shape}; re-export the poses.')
    return pose[:3, :4]


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
    meta = _read_json(pose_file)
    names, poses, pixtocams, dists, camtypes, sizes = [], [], [], [], [], []
    for i, frame in enumerate(_require(meta, 'frames', pose_file, 'the file')):
        rel = _require(frame, 'file_path', pose_file, f'frame {i}')
        where = f'frame {i} ({rel})'
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
        elif get('camera_angle_x') is not None:
            fx = 0.5 * w / np.tan(0.5 * float(get('camera_angle_x')))
        else:
            raise DatasetError(f"{pose_file}: {where} has no 'fl_x' nor 'camera_angle_x' key (the focal length), "
                               'neither has the top level; add one of them.')
        if get('fl_y') is not None:
            fy = float(get('fl_y'))
        elif get('camera_angle_y') is not None:
            fy = 0.5 * h / np.tan(0.5 * float(get('camera_angle_y')))
        else:
            fy = fx
        cx, cy = float(get('cx', w / 2.)), float(get('cy', h / 2.))
        pixtocam = inverse_intrinsics(camera_utils.intrinsic_matrix(fx, fy, cx, cy))
        pose = _frame_pose(frame, pose_file, where)
        check_camera(pose, pixtocam, f'{pose_file} {where}')
        pixtocams.append(pixtocam)
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
        poses.append(pose)
        sizes.append((int(w), int(h)))
    if not names:
        raise DatasetError(f'No frame of {pose_file} has an existing image file; check the frames\' file_path.')
    if len(set(camtypes)) > 1:
        raise DatasetError(f'{pose_file} mixes fisheye and perspective cameras; this is not supported.')
    return (names, np.stack(poses), np.stack(pixtocams), colmap.merge_distortion(dists), camtypes[0],
            np.array(sizes))


def load_blender(config: configs.Config, split: utils.DataSplit, data_dir: str) -> Scene:
    """NeRF-synthetic scenes: transforms_{split}.json + RGBA PNGs (composited on white, float32).

    Unlike the reference (which refuses `render_path` here), `Config.render_path` renders a circular orbit
    (`generate_orbit_path`) at the test cameras' median distance and elevation around the point they look at,
    with `Config.render_path_frames` frames. With `Config.use_tiffs` the 32-bit linear `_R/_G/_B/_A.tiff`
    channels are read and the colour converted to sRGB; alpha stays linear (the reference also passes alpha
    through the sRGB curve, which changes partial coverage at edges).
    """
    pose_file = os.path.join(data_dir, f'transforms_{split.value}.json')
    if not os.path.isfile(pose_file):
        raise DatasetNotFoundError(f'Camera file {pose_file} does not exist; is Config.data_dir a Blender '
                                   "scene (else set Config.dataset_loader='llff')?")
    meta = _read_json(pose_file)
    images, disp_images, normal_images, cams = [], [], [], []
    for i, frame in enumerate(_require(meta, 'frames', pose_file, 'the file')):
        where = f'frame {i} ({_require(frame, "file_path", pose_file, f"frame {i}")})'
        fprefix = os.path.join(data_dir, frame['file_path'])

        def get_img(suffix, fprefix=fprefix):
            path = fprefix + suffix
            if not os.path.isfile(path):
                raise DatasetNotFoundError(f'Image file {path} listed in {pose_file} does not exist.')
            image = utils.load_img(path)
            if config.factor > 1:
                image = downsample(image, config.factor)
            return image

        if config.use_tiffs:
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
        if config.compute_disp_metrics:
            disp_images.append(get_img('_disp.tiff'))
        if config.compute_normal_metrics:
            normal_images.append(get_img('_normal.png')[..., :3] * 2. / 255. - 1.)
        cams.append(_frame_pose(frame, pose_file, where, np.float32))
        check_camera(cams[-1], None, f'{pose_file} {where}')
    if not images:
        raise DatasetError(f'{pose_file} lists no frames.')
    images = np.stack(images, axis=0)
    fields = {}
    if config.compute_disp_metrics:
        fields['disp_images'] = np.stack(disp_images, axis=0)
    if config.compute_normal_metrics:
        fields['normal_images'] = np.stack(normal_images, axis=0)
        fields['alphas'] = images[..., -1]
    rgb, alpha = images[..., :3], images[..., -1:]
    images = (rgb * alpha + (1. - alpha)).astype(np.float32)  # White background.
    height, width = images.shape[1:3]
    camtoworlds = np.stack(cams, axis=0)
    focal = .5 * width / np.tan(.5 * float(_require(meta, 'camera_angle_x', pose_file, 'the top level')))
    pixtocams = camera_utils.get_pixtocam(focal, width, height)
    check_camera(cams[0], pixtocams, f'{pose_file} (camera_angle_x)')
    render_poses = None
    if config.render_path:
        ref_poses = camtoworlds
        test_file = os.path.join(data_dir, 'transforms_test.json')
        if split != utils.DataSplit.TEST and os.path.isfile(test_file):
            ref_poses = np.stack([_frame_pose(f, test_file, f'frame {i}')
                                  for i, f in enumerate(_require(_read_json(test_file), 'frames', test_file,
                                                                 'the file'))])
        render_poses = camtoworlds = generate_orbit_path(ref_poses, n_frames=config.render_path_frames)
    return make_scene(split, data_dir, config, images, camtoworlds, pixtocams, focal=focal,
                      render_poses=render_poses, **fields)
