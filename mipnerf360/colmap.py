"""COLMAP through the official `pycolmap` (4.x): read models, convert camera models, run SfM on photos.

Reading: `NeRFSceneManager(sparse_dir).process()` returns, like the reference's class of the same name,
`(image_names, poses, pixtocams, distortion_params, camtype)`, with poses `[N, 3, 4]` OpenGL camera-to-worlds
(COLMAP's world-to-camera inverted, then right-multiplied by diag(1, -1, -1, 1)) and one inverse intrinsic
matrix per image `[N, 3, 3]` (the reference assumes a single shared camera; several cameras work here).

SfM (pure pip, CPU): `python -m mipnerf360.colmap DIR [--camera_model OPENCV]` extracts SIFT features from
`DIR/images`, matches them exhaustively, runs incremental mapping, writes the largest model to `DIR/sparse/0`
and the downsampled copies `DIR/images_{2,4,8}`, as scripts/local_colmap_and_resize.sh does with the binary.
Single-threaded by default, so that the same photos give the same model; when fewer than 90% of the photos
register it retries with settings for hard captures, and it writes `DIR/sparse/colmap_report.json`
(registered / total images, mean reprojection error, the images left out, each attempt).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from mipnerf360 import camera_utils

# Distortion parameter keys the ray caster understands, per COLMAP model, and the position in COLMAP's
# parameter vector of the focal lengths (fx, fy), principal point (cx, cy) and each distortion coefficient.
_MODELS: Dict[str, Tuple[Tuple[int, int], Tuple[int, int], Dict[str, int], Tuple[str, ...]]] = {
        'SIMPLE_PINHOLE': ((0, 0), (1, 2), {}, ()),
        'PINHOLE': ((0, 1), (2, 3), {}, ()),
        'SIMPLE_RADIAL': ((0, 0), (1, 2), {'k1': 3}, ('k1', 'k2', 'k3', 'p1', 'p2')),
        'RADIAL': ((0, 0), (1, 2), {'k1': 3, 'k2': 4}, ('k1', 'k2', 'k3', 'p1', 'p2')),
        'OPENCV': ((0, 1), (2, 3), {'k1': 4, 'k2': 5, 'p1': 6, 'p2': 7}, ('k1', 'k2', 'k3', 'p1', 'p2')),
        'OPENCV_FISHEYE': ((0, 1), (2, 3), {'k1': 4, 'k2': 5, 'k3': 6, 'k4': 7}, ('k1', 'k2', 'k3', 'k4')),
}
SUPPORTED_CAMERA_MODELS = tuple(_MODELS)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class ColmapError(ValueError):
    """A COLMAP model that is missing, unreadable or uses an unsupported camera model."""


def camera_model_name(camera) -> str:
    """COLMAP model name ('PINHOLE', ...) of a pycolmap.Camera."""
    model = camera.model
    return getattr(model, 'name', str(model))


def convert_camera(model: str, params: Sequence[float]
                   ) -> Tuple[np.ndarray, Optional[Dict[str, float]], 'camera_utils.ProjectionType']:
    """Converts a COLMAP camera to `(pixtocam [3, 3], distortion_params or None, camtype)`.

    Args:
        model: COLMAP model name, one of SUPPORTED_CAMERA_MODELS.
        params: COLMAP's parameter vector for that model.
    """
    if model not in _MODELS:
        raise ColmapError(f'Unsupported COLMAP camera model {model!r}; supported: '
                          f'{", ".join(SUPPORTED_CAMERA_MODELS)}. Re-run COLMAP with --ImageReader.camera_model '
                          'OPENCV (or undistort the images with colmap image_undistorter).')
    (ifx, ify), (icx, icy), dist_idx, keys = _MODELS[model]
    params = [float(p) for p in params]
    fx, fy, cx, cy = params[ifx], params[ify], params[icx], params[icy]
    pixtocam = np.linalg.inv(camera_utils.intrinsic_matrix(fx, fy, cx, cy))
    if keys:
        distortion = {k: 0. for k in keys}
        distortion.update({k: params[i] for k, i in dist_idx.items()})
    else:
        distortion = None
    if model == 'OPENCV_FISHEYE':
        camtype = camera_utils.ProjectionType.FISHEYE
    else:
        camtype = camera_utils.ProjectionType.PERSPECTIVE
    return pixtocam, distortion, camtype


def find_model_dir(path: str) -> str:
    """The folder holding cameras/images(.bin|.txt): `path` itself or `path/sparse/0`, `path/0`."""
    for cand in (path, os.path.join(path, 'sparse', '0'), os.path.join(path, '0')):
        for ext in ('.bin', '.txt'):
            if os.path.isfile(os.path.join(cand, 'cameras' + ext)) and os.path.isfile(
                    os.path.join(cand, 'images' + ext)):
                return cand
    raise ColmapError(f'No COLMAP model (cameras.bin/images.bin or cameras.txt/images.txt) in {path}; run '
                      '`python -m mipnerf360.colmap DATA_DIR` or scripts/local_colmap_and_resize.sh DATA_DIR.')


def read_model(path: str):
    """Reads a binary or text COLMAP model with pycolmap; returns a `pycolmap.Reconstruction`."""
    import pycolmap
    model_dir = find_model_dir(path)
    rec = pycolmap.Reconstruction()
    try:
        if os.path.isfile(os.path.join(model_dir, 'cameras.bin')):
            rec.read_binary(model_dir)
        else:
            rec.read_text(model_dir)
    except Exception as e:  # pycolmap raises ValueError/RuntimeError with a C++ check message.
        msg = ' '.join(str(e).split())
        raise ColmapError(f'Corrupt COLMAP model in {model_dir} ({msg}); '
                          're-run COLMAP to regenerate it.') from None
    return rec


def _pose_matrix(image) -> np.ndarray:
    cfw = image.cam_from_world
    cfw = cfw() if callable(cfw) else cfw
    return np.asarray(cfw.matrix(), np.float64)


class NeRFSceneManager:
    """Loads a COLMAP model for NeRF. `process()` returns the images in the model's id order.

    Attributes after `process()`: `sizes` `[N, 2]` (width, height of each image's camera), `camera_ids` `[N]`,
    `camera_models` (names per image), `points3D` `[P, 3]`.
    """

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.sizes = None
        self.camera_ids = None
        self.camera_models = None
        self.points3D = None

    def process(self) -> Tuple[List[str], np.ndarray, np.ndarray, Optional[Mapping[str, Union[float, np.ndarray]]],
                               'camera_utils.ProjectionType']:
        """Returns `(names, poses [N, 3, 4], pixtocams [N, 3, 3], distortion_params, camtype)`.

        `distortion_params` is None when no camera is distorted, a dict of floats when all images share the
        same coefficients, otherwise a dict of per-image arrays `[N]`.
        """
        rec = read_model(self.data_dir)
        ids = sorted(i for i, im in rec.images.items() if im.has_pose)
        if not ids:
            raise ColmapError(f'The COLMAP model in {self.data_dir} has no registered images; re-run COLMAP.')
        names, w2c, pixtocams, dists, camtypes, sizes, cam_ids, models = [], [], [], [], [], [], [], []
        for i in ids:
            im = rec.images[i]
            cam = rec.cameras[im.camera_id]
            model = camera_model_name(cam)
            pixtocam, dist, camtype = convert_camera(model, np.asarray(cam.params))
            names.append(im.name)
            m = np.eye(4)
            m[:3, :4] = _pose_matrix(im)
            w2c.append(m)
            pixtocams.append(pixtocam)
            dists.append(dist)
            camtypes.append(camtype)
            sizes.append((int(cam.width), int(cam.height)))
            cam_ids.append(int(im.camera_id))
            models.append(model)
        if len(set(camtypes)) > 1:
            raise ColmapError(f'The COLMAP model in {self.data_dir} mixes fisheye and perspective cameras; '
                              'this is not supported, calibrate all images with one kind of camera model.')
        c2w = np.linalg.inv(np.stack(w2c))[:, :3, :4]
        poses = c2w @ np.diag([1., -1., -1., 1.])  # OpenCV (right, down, forward) -> OpenGL (right, up, back).
        self.sizes = np.array(sizes)
        self.camera_ids = np.array(cam_ids)
        self.camera_models = models
        self.points3D = np.array([rec.points3D[k].xyz for k in sorted(rec.points3D)]).reshape(-1, 3)
        return names, poses, np.stack(pixtocams), merge_distortion(dists), camtypes[0]


def merge_distortion(dists: Sequence[Optional[Dict[str, float]]]
                     ) -> Optional[Dict[str, Union[float, np.ndarray]]]:
    """Per-image distortion dicts -> None, one shared dict of floats, or a dict of per-image arrays `[N]`."""
    if all(d is None for d in dists):
        return None
    keys = sorted({k for d in dists if d is not None for k in d})
    table = {k: np.array([(d or {}).get(k, 0.) for d in dists]) for k in keys}
    if all(np.all(v == v[0]) for v in table.values()):
        return {k: float(v[0]) for k, v in table.items()}
    return table


# ---------------------------------------------------------------------------------------------------------------
# Structure from motion with pycolmap.


def list_images(image_dir: str) -> List[str]:
    return sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))


def resize_images(data_dir: str, factors: Sequence[int] = (2, 4, 8), overwrite: bool = True):
    """Writes `images_{f}` copies of `data_dir/images` shrunk by each factor (size rounded to nearest pixel)."""
    src = os.path.join(data_dir, 'images')
    for f in factors:
        dst = os.path.join(data_dir, f'images_{f}')
        os.makedirs(dst, exist_ok=True)
        for name in list_images(src):
            out = os.path.join(dst, name)
            if os.path.exists(out) and not overwrite:
                continue
            with Image.open(os.path.join(src, name)) as im:
                w, h = im.size
                size = (max(1, int(np.floor(w / f + 0.5))), max(1, int(np.floor(h / f + 0.5))))
                small = im.resize(size, Image.LANCZOS if f > 1 else Image.NEAREST)
                kwargs = {'quality': 95} if name.lower().endswith(('.jpg', '.jpeg')) else {}
                small.save(out, **kwargs)


@dataclasses.dataclass(frozen=True)
class SfmSettings:
    """One attempt's SIFT, matching and mapper settings (pycolmap 4 option names)."""
    name: str
    peak_threshold: float = 0.02 / 3  # COLMAP's default: 0.02 / octave_resolution.
    domain_size_pooling: bool = False
    max_num_features: int = 8192
    guided_matching: bool = False
    min_num_matches: int = 15  # Fewest verified matches for an image pair to count.
    two_view_min_num_inliers: int = 15
    init_min_num_inliers: int = 100
    init_min_tri_angle: float = 16.
    abs_pose_min_num_inliers: int = 30
    abs_pose_min_inlier_ratio: float = 0.25


DEFAULT_SETTINGS = SfmSettings('default')
# For small, blurry or low-texture photos: more, weaker (DSP-)SIFT features, guided matching and a mapper that
# starts from, and registers with, fewer inliers.
HARD_SETTINGS = SfmSettings('hard', peak_threshold=0.002, domain_size_pooling=True, max_num_features=16384,
                            guided_matching=True, min_num_matches=8, two_view_min_num_inliers=8,
                            init_min_num_inliers=30, init_min_tri_angle=4., abs_pose_min_num_inliers=12,
                            abs_pose_min_inlier_ratio=0.1)
REPORT_NAME = 'colmap_report.json'  # Written to DIR/sparse/, next to the model in DIR/sparse/0.


def _sfm_attempt(data_dir: str, settings: SfmSettings, camera_model: str, single_camera: bool, num_threads: int,
                 seed: int, verbose: bool):
    """Extracts, matches and maps `data_dir/images` with `settings`; returns the largest model or None."""
    import pycolmap
    image_dir = os.path.join(data_dir, 'images')
    pycolmap.set_random_seed(seed)
    db = os.path.join(data_dir, 'database.db')
    if os.path.exists(db):
        os.remove(db)
    t0 = time.time()
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.use_gpu = False
    extraction.num_threads = num_threads
    extraction.sift.max_num_features = settings.max_num_features
    extraction.sift.peak_threshold = settings.peak_threshold
    extraction.sift.domain_size_pooling = settings.domain_size_pooling
    mode = pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.AUTO
    pycolmap.extract_features(db, image_dir, camera_mode=mode, reader_options=reader,
                              extraction_options=extraction, device=pycolmap.Device.cpu)
    t1 = time.time()
    matching = pycolmap.FeatureMatchingOptions()
    matching.use_gpu = False
    matching.num_threads = num_threads
    matching.guided_matching = settings.guided_matching
    verification = pycolmap.TwoViewGeometryOptions()
    verification.min_num_inliers = settings.two_view_min_num_inliers
    pycolmap.match_exhaustive(db, matching_options=matching, verification_options=verification,
                              device=pycolmap.Device.cpu)
    t2 = time.time()
    tmp = os.path.join(data_dir, 'sparse_tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = num_threads
    opts.random_seed = seed
    opts.min_num_matches = settings.min_num_matches
    opts.ba_global_function_tolerance = 1e-6  # As the reference script: faster global bundle adjustments.
    opts.mapper.init_min_num_inliers = settings.init_min_num_inliers
    opts.mapper.init_min_tri_angle = settings.init_min_tri_angle
    opts.mapper.abs_pose_min_num_inliers = settings.abs_pose_min_num_inliers
    opts.mapper.abs_pose_min_inlier_ratio = settings.abs_pose_min_inlier_ratio
    try:
        recs = pycolmap.incremental_mapping(db, image_dir, tmp, options=opts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f'[{settings.name} settings] feature extraction {t1 - t0:.1f} s, exhaustive matching '
              f'{t2 - t1:.1f} s, incremental mapping {time.time() - t2:.1f} s', flush=True)
    if not recs:
        return None
    return max(recs.values(), key=lambda r: r.num_reg_images())


def _attempt_summary(settings: SfmSettings, rec, total: int) -> Dict[str, object]:
    n = rec.num_reg_images() if rec is not None else 0
    return {'settings': dataclasses.asdict(settings), 'registered': n, 'total': total,
            'mean_reprojection_error_px': float(rec.compute_mean_reprojection_error()) if n else None}


def run_sfm(data_dir: str, camera_model: str = 'OPENCV', single_camera: bool = True,
            factors: Sequence[int] = (2, 4, 8), num_threads: int = 1, max_num_features: int = 8192,
            seed: int = 0, min_registered: float = 0.9, retry: bool = True, verbose: bool = True):
    """Runs CPU SfM with pycolmap on `data_dir/images`; writes `database.db`, `sparse/0`, `images_{f}` and the
    report `sparse/colmap_report.json`.

    With the default single thread the same photos give the same model every time. When fewer than
    `min_registered` of the images register and `retry` is set, SfM runs again with HARD_SETTINGS and the model
    with the most registered images of the two attempts is kept. Returns that reconstruction.
    """
    image_dir = os.path.join(data_dir, 'images')
    if not os.path.isdir(image_dir):
        raise ColmapError(f'No image folder {image_dir}; put your photos in DIR/images and run again.')
    names = list_images(image_dir)
    if len(names) < 2:
        raise ColmapError(f'Found {len(names)} images in {image_dir}; SfM needs at least 2 (better 20+).')
    if camera_model not in SUPPORTED_CAMERA_MODELS:
        raise ColmapError(f'Unsupported --camera_model {camera_model!r}; use one of '
                          f'{", ".join(SUPPORTED_CAMERA_MODELS)}.')
    if not 0. <= min_registered <= 1.:
        raise ColmapError(f'--min_registered {min_registered} is not a fraction; use a value in [0, 1], '
                          'e.g. 0.9.')
    plan = [dataclasses.replace(DEFAULT_SETTINGS, max_num_features=max_num_features)]
    if retry:
        plan.append(HARD_SETTINGS)
    best, best_settings, attempts = None, None, []
    for settings in plan:
        rec = _sfm_attempt(data_dir, settings, camera_model, single_camera, num_threads, seed, verbose)
        attempts.append(_attempt_summary(settings, rec, len(names)))
        n = attempts[-1]['registered']
        if verbose:
            print(f'[{settings.name} settings] registered {n} / {len(names)} images', flush=True)
        if rec is not None and (best is None or n > best.num_reg_images()):
            best, best_settings = rec, settings
        if best is not None and best.num_reg_images() >= min_registered * len(names):
            break
        if verbose and settings is not plan[-1]:
            print(f'Fewer than {min_registered:.0%} of the images registered; retrying with settings for hard '
                  'captures (more SIFT features, guided matching, a more permissive mapper).', flush=True)
    if best is None:
        raise ColmapError(f'COLMAP could not reconstruct {data_dir}: too few matches between the photos. Take '
                          'more, sharper, overlapping photos of a textured scene (see the README, "Your own photos").')
    sparse = os.path.join(data_dir, 'sparse')
    out = os.path.join(sparse, '0')
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    best.write(out)
    registered = {best.images[i].name for i in best.reg_image_ids()}
    report = {'registered': best.num_reg_images(), 'total': len(names),
              'mean_reprojection_error_px': float(best.compute_mean_reprojection_error()),
              'settings': best_settings.name, 'camera_model': camera_model, 'model_dir': out,
              'unregistered_images': [n for n in names if n not in registered], 'attempts': attempts}
    with open(os.path.join(sparse, REPORT_NAME), 'w') as fp:
        json.dump(report, fp, indent=2)
    if verbose:
        print(f'Registered {report["registered"]} / {len(names)} images (mean reprojection error '
              f'{report["mean_reprojection_error_px"]:.2f} px, {best_settings.name} settings); model written to '
              f'{out}, report to {os.path.join(sparse, REPORT_NAME)}', flush=True)
        if report['unregistered_images']:
            print('Not registered: ' + ', '.join(report['unregistered_images']), flush=True)
    resize_images(data_dir, factors)
    return best


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m mipnerf360.colmap',
        description='Pose photos in DIR/images with pycolmap (CPU) and write DIR/sparse/0, DIR/images_{2,4,8} and '
                    f'the report DIR/sparse/{REPORT_NAME}.')
    parser.add_argument('data_dir', help='a folder with the photos in DIR/images')
    parser.add_argument('--camera_model', default='OPENCV', choices=SUPPORTED_CAMERA_MODELS,
                        help='OPENCV for perspective photos, OPENCV_FISHEYE for fisheye lenses')
    parser.add_argument('--per_image_camera', action='store_true',
                        help='one camera per image (default: a single shared camera, as the script does)')
    parser.add_argument('--factors', type=int, nargs='*', default=[2, 4, 8])
    parser.add_argument('--num_threads', type=int, default=1,
                        help='threads per step (default 1: reproducible; -1: all cores, faster, varies run to run)')
    parser.add_argument('--min_registered', type=float, default=0.9,
                        help='retry with settings for hard captures when fewer than this fraction registers')
    parser.add_argument('--no_retry', action='store_true', help='run the default settings only')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        run_sfm(args.data_dir, camera_model=args.camera_model, single_camera=not args.per_image_camera,
                factors=args.factors, num_threads=args.num_threads, seed=args.seed,
                min_registered=args.min_registered, retry=not args.no_retry)
    except ColmapError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2  # A user error, as for train / eval / render.
    return 0


if __name__ == '__main__':
    sys.exit(main())
