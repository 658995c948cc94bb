"""`python -m render --gin_configs=... --gin_bindings="Config.render_path = True"`: renders a camera path
and writes mp4 videos.

Frames go to `render_dir` (default `checkpoint_dir/render`) / `path_renders_step_<step>` as
color_XXX.png, normals_XXX.png, distance_{mean,median}_XXX.tiff and acc_XXX.tiff (Ref-NeRF models add
normals_pred_XXX.png, roughness_XXX.tiff and, with a diffuse colour / specular tint, diffuse_XXX.png,
specular_XXX.png and tint_XXX.png, see `save_refnerf_outputs`), with `render_manifest.json`
recording what made them (checkpoint, frame count, resolution, path settings). Frames already on disk are
skipped, so a crashed render resumes; frames made with other settings are deleted and re-rendered, so a video
never mixes two camera paths. `render_job_id` / `render_num_jobs` split the frames across processes, and under
`torchrun --nproc_per_node=N -m render` the ranks split each job's frames further.
RawNeRF (`rawnerf_mode`): colour frames are postprocessed to sRGB (`raw_postprocess_fn`, `autoexpose_renders`).
When every frame exists, videos `<scene>_<exp>_<name>_<kind>.mp4` are written for every kind of frame there is
(color, normals, acc, distance_mean, distance_median; Ref-NeRF: normals_pred, roughness as
tanh(roughness), diffuse, specular, tint) with the ffmpeg bundled in imageio-ffmpeg.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from mipnerf360 import checkpoints, image, models, utils, vis
from mipnerf360.cli import common


def _even_pad(frame: np.ndarray) -> np.ndarray:
    """H.264 with yuv420p needs even sizes: pad the last row/column by repetition when odd."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode='edge')


def write_video(path: str, frames, fps: int, crf: int = 18):
    """Writes uint8 RGB frames [H, W, 3] to an H.264 mp4 (atomically) with imageio-ffmpeg's bundled ffmpeg."""
    import imageio_ffmpeg
    frames = iter(frames)
    first = _even_pad(next(frames))
    h, w = first.shape[:2]

    def save(tmp):
        # The temporary name has no .mp4 suffix, so the container is named explicitly.
        writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec='libx264', macro_block_size=1,
                                             pix_fmt_in='rgb24', pix_fmt_out='yuv420p',
                                             output_params=['-crf', str(crf), '-f', 'mp4'], ffmpeg_log_level='error')
        writer.send(None)
        try:
            writer.send(np.ascontiguousarray(first))
            for frame in frames:
                writer.send(np.ascontiguousarray(_even_pad(frame)))
        finally:
            writer.close()  # Waits for ffmpeg to finish the file (or to exit, when stopped by a signal).

    utils._atomic_save(path, save)  # pylint: disable=protected-access


def video_prefix(checkpoint_dir: str, out_name: str) -> str:
    names = [n for n in os.path.normpath(os.path.abspath(checkpoint_dir)).split(os.sep) if n]
    # As the reference: the last two parts of the checkpoint path are the experiment and scene names.
    exp_name, scene_name = (names[-2:] if len(names) >= 2 else ['exp'] + names)[-2:]
    return f'{scene_name}_{exp_name}_{out_name}'


def create_videos(config, base_dir: str, out_dir: str, out_name: str, num_frames: int, log=print):
    """Assembles the saved frames into mp4 videos; returns the paths written."""
    prefix = video_prefix(config.checkpoint_dir, out_name)
    zpad = max(3, len(str(num_frames - 1)))
    name_of = lambda k, i, ext: os.path.join(out_dir, f'{k}_{str(i).zfill(zpad)}.{ext}')
    depth0 = utils.load_img(name_of('distance_mean', 0, 'tiff'))
    p = config.render_dist_percentile
    limits = np.percentile(depth0.flatten(), [p, 100 - p])
    curve = lambda x: config.render_dist_curve_fn(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()
    lo, hi = [float(curve(x)) for x in limits]
    written = []
    for k, ext in _FRAME_KINDS:
        if not os.path.exists(name_of(k, 0, ext)):
            continue
        missing = [name_of(k, i, ext) for i in range(num_frames) if not os.path.exists(name_of(k, i, ext))]
        if missing:
            raise common.OutputError(f'Frame {missing[0]} is missing; re-run render to finish the frames.')

        def frames(k=k, ext=ext):
            for i in range(num_frames):
                img = utils.load_img(name_of(k, i, ext))
                if ext == 'png':
                    img = img / 255.
                elif k == 'roughness':
                    img = np.tanh(img)  # As vis.visualize_suite shows roughness in [0, 1).
                elif k.startswith('distance'):
                    img = np.clip((curve(img) - min(lo, hi)) / max(abs(hi - lo), 1e-12), 0, 1)
                    img = vis.colormap_turbo(img)
                if img.ndim == 2:
                    img = np.repeat(img[..., None], 3, axis=-1)
                yield utils.to_uint8(img[..., :3])

        video_file = os.path.join(base_dir, f'{prefix}_{k}.mp4')
        log(f'Making video {video_file}')
        write_video(video_file, frames(), config.render_video_fps, config.render_video_crf)
        written.append(video_file)
    return written


MANIFEST = 'render_manifest.json'
# The Config fields that decide what the frames of a folder show (the camera path, its resolution and the
# scene); a change of any of them makes the frames on disk stale.
_MANIFEST_FIELDS = ('render_path', 'render_path_frames', 'render_path_file', 'z_variation', 'z_phase',
                    'render_resolution', 'render_focal', 'render_camtype', 'render_spherical',
                    'render_spline_keyframes', 'render_spline_n_interp', 'render_spline_degree',
                    'render_spline_smoothness', 'render_spline_interpolate_exposure', 'dataset_loader', 'data_dir',
                    'factor', 'forward_facing', 'llffhold', 'llff_use_all_images_for_training', 'near', 'far',
                    'rawnerf_mode', 'exposure_percentile', 'autoexpose_renders')
_FRAME_KINDS = (('color', 'png'), ('normals', 'png'), ('acc', 'tiff'), ('distance_mean', 'tiff'),
                ('distance_median', 'tiff'), ('normals_pred', 'png'), ('roughness', 'tiff'), ('diffuse', 'png'),
                ('specular', 'png'), ('tint', 'png'))


def save_refnerf_outputs(rendering: Dict[str, Any], path_fn, idx_str: str):
    """Ref-NeRF's extra images, where the model renders them: the predicted normals as normals_pred_<i>.png
    (n / 2 + 0.5, as the density normals), the roughness as roughness_<i>.tiff (float32, unscaled), the linear
    diffuse and specular colours (composited like the normals, without background) tone-mapped as the model
    tone-maps their sum, clip(linear_to_srgb(x), 0, 1), as diffuse_<i>.png and specular_<i>.png, and the
    specular tint (in [0, 1]) as tint_<i>.png."""
    if rendering.get('normals_pred') is not None:
        utils.save_img_u8(rendering['normals_pred'] / 2. + 0.5, path_fn(f'normals_pred_{idx_str}.png'))
    if rendering.get('roughness') is not None:
        utils.save_img_f32(np.asarray(rendering['roughness'])[..., 0], path_fn(f'roughness_{idx_str}.tiff'))
    for key in ('diffuse', 'specular'):
        if rendering.get(key) is not None:
            srgb = image.linear_to_srgb(np.clip(np.asarray(rendering[key], np.float64), 0., 1.))
            utils.save_img_u8(srgb, path_fn(f'{key}_{idx_str}.png'))
    if rendering.get('tint') is not None:
        utils.save_img_u8(rendering['tint'], path_fn(f'tint_{idx_str}.png'))


def _file_digest(path: Optional[str]) -> Optional[str]:
    if not path or not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        return hashlib.sha1(f.read()).hexdigest()


def render_manifest(config, ckpt_path: str, step: int, dataset) -> Dict[str, Any]:
    """What made the frames of a render folder: checkpoint, frame count and resolution, the path settings."""
    manifest = {'checkpoint': os.path.abspath(ckpt_path), 'checkpoint_step': step, 'num_frames': dataset.size,
                'resolution': [int(dataset.scene.width), int(dataset.scene.height)]}
    for name in _MANIFEST_FIELDS:
        value = getattr(config, name)
        manifest[name] = list(value) if isinstance(value, tuple) else value
    manifest['render_path_file_sha1'] = _file_digest(config.render_path_file)
    return json.loads(json.dumps(manifest))  # Plain JSON types, as read back from disk.


def _fmt(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def stale_reason(out_dir: str, manifest: Dict[str, Any]) -> Optional[str]:
    """Why the frames in `out_dir` were not made by `manifest`'s settings (None: they were, or there are none)."""
    has_frames = any(glob.glob(os.path.join(out_dir, f'{k}_*.{ext}')) for k, ext in _FRAME_KINDS)
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return f'{out_dir} holds frames but no {MANIFEST} saying what made them' if has_frames else None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return f'{path} is unreadable'
    changed = [k for k in manifest if old.get(k) != manifest[k]]
    if not changed:
        return None
    return '; '.join(f'{k} changed {_fmt(old.get(k))} -> {_fmt(manifest[k])}' for k in changed[:3])


def _clear_frames(out_dir: str, base_dir: str, prefix: str):
    stale = [p for k, ext in _FRAME_KINDS for p in glob.glob(os.path.join(out_dir, f'{k}_*.{ext}'))]
    stale += glob.glob(os.path.join(base_dir, f'{glob.escape(prefix)}_*.mp4'))
    for p in stale:
        os.remove(p)


def _prepare_frame_folder(config, out_dir: str, base_dir: str, out_name: str, manifest: Dict[str, Any]):
    """Makes `out_dir` hold only frames of `manifest`'s settings: stale frames (and their videos) are deleted,
    with one line saying why, so a resumed render never mixes two camera paths."""
    reason = stale_reason(out_dir, manifest)
    if reason is not None:
        print(f'{reason}: re-rendering.', flush=True)
        _clear_frames(out_dir, base_dir, video_prefix(config.checkpoint_dir, out_name))
    if reason is not None or not os.path.exists(os.path.join(out_dir, MANIFEST)):
        utils.save_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))


def main(unused_argv):
    rank, world_size, local_rank = common.distributed_env()
    config = common.load_config(for_training=False)
    ckpt_path = common.require_checkpoint(config)
    step = checkpoints.step_of(ckpt_path)
    out_name = f"{'path_renders' if config.render_path else 'test_preds'}_step_{step}"
    base_dir = config.render_dir or os.path.join(config.checkpoint_dir, 'render')
    out_what = 'Config.render_dir' if config.render_dir else 'Config.checkpoint_dir'
    out_dir = common.ensure_output_dir(os.path.join(base_dir, out_name), out_what)
    device = common.get_device(config, local_rank)
    dataset = common.load_dataset('test', config, device)
    try:
        model = common.build_model(config, device)
        step = common.restore_model(model, config, device, path=ckpt_path)
        with common.distributed_group(world_size, device), common.output_errors(out_what):
            _render(config, dataset, model, ckpt_path, step, base_dir, out_dir, out_name, rank, world_size)
    finally:
        dataset.close()


def raw_postprocess_fn(config, scene) -> Callable[[np.ndarray], np.ndarray]:
    """How a rendered colour becomes the saved frame: unchanged, or for RawNeRF (`rawnerf_mode`) raw -> sRGB
    (`raw_utils.postprocess_raw` with the scene's first image's colour matrix) at one fixed exposure for the
    whole video: the `exposure_percentile` of the scene's first image mapped to white. With
    `autoexpose_renders` each frame is exposed on its own (its 97th percentile to white, as the reference's
    'color_auto' training visualisation), so a path through a dark or bright part stays visible.

    The raw render's own brightness follows the rays' `exposure_values`, which on a render path are the first
    test image's (its shutter relative to the longest), as in the reference."""
    if not config.rawnerf_mode:
        return lambda z: z
    to_srgb = scene.metadata['postprocess_fn']
    if config.autoexpose_renders:
        return lambda z: to_srgb(z, None)
    return to_srgb


def _render(config, dataset, model, ckpt_path, step, base_dir, out_dir, out_name, rank, world_size):
    """Renders this process's share of the frames; the last process to finish (rank 0 under torchrun, after
    every rank) assembles the videos."""
    manifest = render_manifest(config, ckpt_path, step, dataset)
    if rank == 0:
        _prepare_frame_folder(config, out_dir, base_dir, out_name, manifest)
    _barrier(world_size)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f'Rendering checkpoint {ckpt_path} (step {step}) to {out_dir}.', flush=True)
    postprocess_fn = raw_postprocess_fn(config, dataset.scene)
    path_fn = lambda x: os.path.join(out_dir, x)
    zpad = max(3, len(str(dataset.size - 1)))
    idx_to_str = lambda i: str(i).zfill(zpad)
    # torchrun ranks split each render job's frames further.
    num_jobs, job_id = config.render_num_jobs * world_size, config.render_job_id * world_size + rank

    def write_frame(rendering, idx_str):
        # acc is written last, so its presence marks a complete frame (a killed render redoes the frame).
        utils.save_img_u8(postprocess_fn(rendering['rgb']), path_fn(f'color_{idx_str}.png'))
        if 'normals' in rendering:
            utils.save_img_u8(rendering['normals'] / 2. + 0.5, path_fn(f'normals_{idx_str}.png'))
        save_refnerf_outputs(rendering, path_fn, idx_str)
        utils.save_img_f32(rendering['distance_mean'], path_fn(f'distance_mean_{idx_str}.tiff'))
        utils.save_img_f32(rendering['distance_median'], path_fn(f'distance_median_{idx_str}.tiff'))
        utils.save_img_f32(rendering['acc'], path_fn(f'acc_{idx_str}.tiff'))

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=4) if config.render_save_async else None
    futures = []
    try:
        for idx in range(dataset.size):
            if idx % num_jobs != job_id:
                continue
            idx_str = idx_to_str(idx)
            if os.path.exists(path_fn(f'acc_{idx_str}.tiff')) and os.path.exists(path_fn(f'color_{idx_str}.png')):
                print(f'Frame {idx + 1}/{dataset.size} already rendered, skipping.', flush=True)
                continue
            t0 = time.time()
            rays = dataset.generate_ray_batch(idx).rays
            with common.no_grad_eval(model):
                rendering = models.render_image(functools.partial(model, train_frac=1., compute_extras=True), rays,
                                                None, config)
            rendering = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in rendering.items()}
            print(f'Frame {idx + 1}/{dataset.size} rendered in {time.time() - t0:0.2f}s', flush=True)
            if executor is None:
                write_frame(rendering, idx_str)
            else:
                futures.append(executor.submit(write_frame, rendering, idx_str))
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    for fut in futures:
        fut.result()  # Re-raises a failed write.
    _barrier(world_size)
    if rank != 0:
        return

    num_files = len(glob.glob(path_fn('acc_*.tiff')))
    if num_files == dataset.size:
        print(f'All {num_files} frames found, creating videos.', flush=True)
        for v in create_videos(config, base_dir, out_dir, out_name, dataset.size):
            print(f'Wrote {v}', flush=True)
    else:
        print(f'{num_files}/{dataset.size} frames rendered; videos are made once every job has finished.',
              flush=True)


def _barrier(world_size: int):
    if world_size > 1:
        import torch.distributed as dist  # pylint: disable=import-outside-toplevel
        dist.barrier()


def run(argv=None):
    common.run(main, 'eval', argv)


if __name__ == '__main__':
    run()
