"""Camera paths as nerfstudio `camera_path.json` files: read them for `Config.render_path_file`, write ours.

The file (as nerfstudio's viewer exports it, read by nerfstudio's `get_path_from_json`):
    render_width, render_height: the frame size in pixels.
    fps (and/or seconds): frame rate; fps = len(camera_path) / seconds when only `seconds` is given.
    camera_type: 'perspective' (default), 'fisheye' (equidistant) or 'equirectangular' (a panorama).
    camera_path: one entry per frame: camera_to_world (16 numbers, a 4x4 matrix row by row; OpenGL camera
        axes: x right, y up, z backward), fov (vertical field of view in degrees), aspect (width / height,
        informative: the size comes from render_width / render_height).
    keyframes, smoothness_value...: the viewer's editing state, ignored when reading (the frames are already
        interpolated); `export` writes one keyframe per frame so the viewer can open the file.
    frame (ours, optional): 'input' (default) or 'normalized'.

Frames of reference: the poses of a camera_path.json are in the *input data's* world frame (the frame of the
files the loader read: COLMAP's `sparse/0`, transforms.json, poses_bounds.npy), with `frame: 'normalized'`
in this port's normalised frame (`Scene.world_transform` maps the first to the second: for 360 scenes the PCA
alignment and scaling, for forward-facing ones the recentring and scaling). A similarity maps a pose by its
rotation part (re-orthonormalised, i.e. without the scale) and the full transform of the camera centre. A path
exported from nerfstudio's viewer for a nerfstudio model is in nerfstudio's dataparser frame: undo its
`dataparser_transforms.json` first (`from_nerfstudio_frame`).

CLI (`python -m mipnerf360.camera_path --help`):
    export --gin_configs=... [--gin_bindings=...] --output camera_path.json [--frame input|normalized]
        writes the render path the config would render (ellipse / spiral / orbit / spline / path file).
    from-images --gin_configs=... --names a.jpg,b.jpg,... --output camera_path.json
        a spline path through the chosen training views (`Config.render_spline_n_interp` frames per pair).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence

import gin
import numpy as np

from mipnerf360 import camera_utils
from mipnerf360 import configs
from mipnerf360 import utils
from mipnerf360.datasets.scene import DatasetError, DatasetNotFoundError, check_camera

CAMERA_TYPES = ('perspective', 'fisheye', 'equirectangular')
FRAMES = ('input', 'normalized')


@dataclasses.dataclass
class CameraPath:
    """A camera path: camtoworlds `[N, 3, 4]` (OpenGL) in `frame`, vertical fields of view `fovs` `[N]`
    (degrees) of pinhole cameras of `width` x `height` with the principal point at the centre."""
    camtoworlds: np.ndarray
    fovs: np.ndarray
    width: int
    height: int
    fps: Optional[float] = None
    camera_type: str = 'perspective'
    frame: str = 'input'

    @property
    def size(self) -> int:
        return int(self.camtoworlds.shape[0])

    def pixtocams(self, width: Optional[int] = None, height: Optional[int] = None) -> np.ndarray:
        """Inverse intrinsics `[N, 3, 3]` at `width` x `height` (default the file's), keeping the vertical fov."""
        width, height = width or self.width, height or self.height
        return np.stack([camera_utils.get_pixtocam(f, width, height) for f in fov_to_focal(self.fovs, height)])

    def normalized_camtoworlds(self, world_transform: np.ndarray) -> np.ndarray:
        """The poses in the normalised frame of a Scene whose `world_transform` is given."""
        if self.frame == 'normalized':
            return self.camtoworlds
        return transform_poses(self.camtoworlds, world_transform)


def fov_to_focal(fov_degrees, height: float) -> np.ndarray:
    """Focal length in pixels of a vertical field of view (as nerfstudio / three.js)."""
    return 0.5 * height / np.tan(0.5 * np.radians(np.asarray(fov_degrees, np.float64)))


def focal_to_fov(focal, height: float) -> np.ndarray:
    """Vertical field of view in degrees of a focal length in pixels (inverse of `fov_to_focal`)."""
    return np.degrees(2. * np.arctan(0.5 * height / np.asarray(focal, np.float64)))


def transform_poses(camtoworlds: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Camera-to-worlds `[N, 3, 4]` moved by the similarity `transform` `[4, 4]` (world -> new world): centres
    by the full transform, rotations by its rotation part (the nearest rotation, i.e. the scale removed)."""
    transform = np.asarray(transform, np.float64)
    u, _, vt = np.linalg.svd(transform[:3, :3])
    rotation = u @ vt
    poses = np.asarray(camtoworlds, np.float64)
    rotations = rotation @ poses[:, :3, :3]
    centres = poses[:, :3, 3] @ transform[:3, :3].T + transform[:3, 3]
    return np.concatenate([rotations, centres[..., None]], -1)


def from_nerfstudio_frame(camtoworlds: np.ndarray, dataparser_transform: np.ndarray, scale: float) -> np.ndarray:
    """Poses of nerfstudio's dataparser frame (`dataparser_transforms.json`: `transform` `[3, 4]`, `scale`)
    back in the input data's frame, where nerfstudio's world = scale * (transform @ [input, 1])."""
    t = np.eye(4)
    t[:3, :4] = dataparser_transform
    return transform_poses(camtoworlds, np.linalg.inv(np.diag([scale] * 3 + [1.]) @ t))


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing.


def _fail(path: str, what: str, fix: str):
    raise DatasetError(f'Camera path file {path}: {what}; {fix}')


def _number(path: str, where: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        _fail(path, f'{where} = {value!r} must be a {"positive " if positive else ""}finite number',
              'fix the value or re-export the path.')
    return float(value)


def _integer(path: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        _fail(path, f'{key} = {value!r} must be an integer >= 1', 'fix the value or re-export the path.')
    return int(value)


def parse_camera_path(data: Any, path: str) -> CameraPath:
    """A CameraPath from the parsed json `data` of file `path` (named in the errors, which are DatasetErrors)."""
    if not isinstance(data, dict):
        _fail(path, f'the top level is a {type(data).__name__}, not an object',
              'write a nerfstudio camera path ({"camera_path": [...], "render_width": ..., ...}).')
    for key in ('camera_path', 'render_width', 'render_height'):
        if key not in data:
            _fail(path, f'missing key "{key}"', 'export the path again from nerfstudio\'s viewer or with '
                  '`python -m mipnerf360.camera_path export`.')
    width, height = (_integer(path, k, data[k]) for k in ('render_width', 'render_height'))
    camera_type = data.get('camera_type', 'perspective')
    if camera_type not in CAMERA_TYPES:
        _fail(path, f'camera_type = {camera_type!r} is not one of {", ".join(CAMERA_TYPES)}',
              'choose one of them.')
    frame = data.get('frame', 'input')
    if frame not in FRAMES:
        _fail(path, f'frame = {frame!r} is not one of {", ".join(FRAMES)}',
              '"input" for poses in the data\'s own world frame, "normalized" for ours.')
    frames = data['camera_path']
    if not isinstance(frames, list) or not frames:
        _fail(path, 'camera_path must be a non-empty list of frames', 'add at least one frame.')
    poses, fovs = [], []
    for i, f in enumerate(frames):
        where = f'camera_path[{i}]'
        if not isinstance(f, dict):
            _fail(path, f'{where} is not an object', 'each frame is {"camera_to_world": [16 numbers], "fov": ...}.')
        for key in ('camera_to_world', 'fov'):
            if key not in f and (key == 'camera_to_world' or camera_type != 'equirectangular'):
                _fail(path, f'{where} has no key "{key}"', 'every frame needs camera_to_world (a flattened 4x4 '
                      'matrix) and fov (vertical, degrees).')
        mat = np.asarray(f['camera_to_world'], dtype=object)
        if mat.size != 16 or mat.ndim not in (1, 2) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in mat.reshape(-1)):
            _fail(path, f'{where}.camera_to_world must be 16 numbers (a 4x4 matrix row by row), got '
                  f'{mat.size} values of shape {list(mat.shape)}', 'write the full 4x4 camera-to-world matrix.')
        mat = mat.astype(np.float64).reshape(4, 4)
        check_camera(mat[:3], None, f'Camera path file {path} {where}.camera_to_world')
        poses.append(mat[:3])
        fov = f.get('fov', 180.)
        fovs.append(_number(path, f'{where}.fov', fov))
        if not fovs[-1] < 180. and camera_type == 'perspective':
            _fail(path, f'{where}.fov = {fov!r} must be below 180 degrees for a perspective camera',
                  'use a smaller fov or camera_type "fisheye".')
    fps = data.get('fps')
    if fps is not None:
        fps = _number(path, 'fps', fps)
    elif data.get('seconds') is not None:
        fps = len(frames) / _number(path, 'seconds', data['seconds'])
    return CameraPath(np.stack(poses), np.array(fovs), width, height, fps, camera_type, frame)


def read_camera_path(path: str) -> CameraPath:
    """Reads and checks a camera_path.json (see the module docstring)."""
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f'Camera path file {path} does not exist; export one from nerfstudio\'s viewer '
                                   'or with `python -m mipnerf360.camera_path export`.')
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f'Camera path file {path} is not valid JSON ({" ".join(str(e).split())}); '
                           're-export it.') from None
    return parse_camera_path(data, path)


def camera_path_dict(cpath: CameraPath) -> Dict[str, Any]:
    """The nerfstudio camera_path.json contents of `cpath` (one viewer keyframe per frame)."""
    aspect = cpath.width / cpath.height
    frames = [{'camera_to_world': camera_utils.pad_poses(p).reshape(-1).tolist(), 'fov': float(fov),
               'aspect': aspect} for p, fov in zip(cpath.camtoworlds, cpath.fovs)]
    data = {
            'camera_type': cpath.camera_type, 'render_width': cpath.width, 'render_height': cpath.height,
            'fps': cpath.fps, 'seconds': None if cpath.fps is None else cpath.size / cpath.fps,
            'smoothness_value': 0, 'is_cycle': False, 'frame': cpath.frame,
            'keyframes': [{'matrix': f['camera_to_world'], 'fov': f['fov'], 'aspect': aspect} for f in frames],
            'camera_path': frames,
    }
    return data


def write_camera_path(path: str, cpath: CameraPath):
    """Writes `cpath` as a nerfstudio camera_path.json (atomically)."""
    text = json.dumps(camera_path_dict(cpath), indent=1)

    def save(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    utils._atomic_save(path, save)  # pylint: disable=protected-access


def fps_of(path: str) -> Optional[float]:
    """The frame rate of a camera_path.json (None when the file gives none)."""
    return read_camera_path(path).fps


# ---------------------------------------------------------------------------------------------------------------
# Our paths as camera paths.


def scene_camera_path(scene, fps: Optional[float], frame: str = 'input') -> CameraPath:
    """The cameras of a `Scene` (e.g. its render path) as a CameraPath in `frame` ('input': mapped back to the
    input data's world frame with the inverse of `scene.world_transform`)."""
    if frame not in FRAMES:
        raise ValueError(f'frame must be one of {FRAMES}, got {frame!r}.')
    poses = scene.camtoworlds
    if frame == 'input':
        poses = transform_poses(poses, np.linalg.inv(scene.world_transform))
    camera_type = 'perspective'
    if scene.render_spherical:
        camera_type = 'equirectangular'
    elif scene.camtype == camera_utils.ProjectionType.FISHEYE:
        camera_type = 'fisheye'
    fovs = focal_to_fov(1. / np.asarray(scene.pixtocams, np.float64)[:, 1, 1], scene.height)
    return CameraPath(poses, fovs, scene.width, scene.height, fps, camera_type, frame)


def export_render_path(config: configs.Config, frame: str = 'input') -> CameraPath:
    """The render path that `config` (with `render_path = True`) would render, as a CameraPath."""
    from mipnerf360 import datasets  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(config, render_path=True)
    scene = datasets.load_scene(config, 'test')
    return scene_camera_path(scene, config.render_video_fps, frame)


def path_through_images(config: configs.Config, names: Sequence[str], frame: str = 'input') -> CameraPath:
    """A B-spline path (`camera_utils.generate_interpolated_path` with the `Config.render_spline_*` settings)
    through the dataset views `names` in the given order, at the first view's size and focal length."""
    from mipnerf360 import datasets  # pylint: disable=import-outside-toplevel
    scene = datasets.load_scene(dataclasses.replace(config, render_path=False), 'train')
    missing = [n for n in names if n not in scene.image_names]
    if missing or len(names) < 2:
        raise DatasetError(f'--names needs at least 2 images of {config.data_dir}, got {list(names)}'
                           + (f' ({missing[0]!r} is not one of them, e.g. {scene.image_names[0]!r})' if missing
                              else '') + '; list image file names separated by commas.')
    keys = scene.poses[[scene.image_names.index(n) for n in names]]
    poses = camera_utils.generate_interpolated_path(
            keys, n_interp=config.render_spline_n_interp, spline_degree=config.render_spline_degree,
            smoothness=config.render_spline_smoothness, rot_weight=.1)
    n = poses.shape[0]
    path_scene = dataclasses.replace(
            scene, camtoworlds=poses, pixtocams=np.broadcast_to(scene.pixtocams[0], (n, 3, 3)),
            widths=np.full(n, scene.width), heights=np.full(n, scene.height), render_spherical=False)
    return scene_camera_path(path_scene, config.render_video_fps, frame)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m mipnerf360.camera_path', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    for name, what in (('export', 'the render path the config would render'),
                       ('from-images', 'a spline path through chosen training views')):
        p = sub.add_parser(name, help=what)
        p.add_argument('--gin_configs', action='append', default=[], help='gin config file (repeatable)')
        p.add_argument('--gin_bindings', action='append', default=[], help='gin binding (repeatable)')
        p.add_argument('--output', required=True, help='camera_path.json to write')
        p.add_argument('--frame', choices=FRAMES, default='input',
                       help="poses in the input data's world frame (default) or in our normalised one")
        if name == 'from-images':
            p.add_argument('--names', required=True, help='image file names, comma-separated, in path order')
    args = parser.parse_args(argv)
    gin.clear_config()  # Allows several runs in one process; a no-op in a fresh one.
    try:
        config = configs.load_config(save_config=False, gin_configs=args.gin_configs,
                                     gin_bindings=args.gin_bindings)
        if args.command == 'export':
            cpath = export_render_path(config, args.frame)
        else:
            cpath = path_through_images(config, [n for n in args.names.split(',') if n], args.frame)
        write_camera_path(args.output, cpath)
    except (configs.ConfigError, DatasetError, OSError) as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return 2
    print(f'Wrote {cpath.size} frames ({cpath.width}x{cpath.height}, {cpath.camera_type}, {args.frame} frame) '
          f'to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
