"""`python -m mipnerf360.photos DIR`: from a folder of photos to poses, a trained model, metrics and a video.

    DIR/images/*.jpg  ->  DIR/sparse/0 (COLMAP)  ->  python -m train  ->  python -m eval  ->  python -m render

Poses come from the `colmap` binary (scripts/local_colmap_and_resize.sh) when it is on PATH, else from pycolmap
(`python -m mipnerf360.colmap`, which retries hard captures with more permissive settings); an existing
`DIR/sparse/0` is kept. Training, evaluation and rendering are the standard commands run as subprocesses with
the same gin flags, so a run can be resumed or re-rendered by hand with the commands this prints:
`--preset gpu` uses configs/360.gin (the paper's model, 250k steps), `--preset cpu` a small model based on
configs/demo.gin that trains in minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from PIL import Image

from mipnerf360 import colmap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'local_colmap_and_resize.sh')
FACTORS = (2, 4, 8)
# Per preset: gin file, bindings, and the longest image side (pixels) the automatic factor aims under.
PRESETS: Dict[str, Dict[str, object]] = {
        'gpu': {'gin': 'configs/360.gin', 'bindings': [], 'max_side': None},
        'cpu': {'gin': 'configs/demo.gin', 'max_side': 400,
                'bindings': ['Config.render_path_frames = 30', 'Config.render_video_fps = 15']},
}


class PhotosError(ValueError):
    """A problem with the user's photos or a failed step, with what to do about it."""


def _has_model(data_dir: str) -> bool:
    try:
        colmap.find_model_dir(os.path.join(data_dir, 'sparse', '0'))
    except colmap.ColmapError:
        return False
    return True


def pose(data_dir: str, camera_model: str = 'OPENCV', sfm: str = 'auto', min_registered: float = 0.9):
    """Writes DIR/sparse/0 and DIR/images_{2,4,8} unless a model exists; returns the route taken."""
    image_dir = os.path.join(data_dir, 'images')
    if not os.path.isdir(image_dir) or not colmap.list_images(image_dir):
        raise PhotosError(f'No photos in {image_dir}: put your .jpg/.png photos in DIR/images and run again.')
    if _has_model(data_dir):
        print(f'Poses: keeping the existing model {os.path.join(data_dir, "sparse", "0")} (delete it to re-run '
              'COLMAP)', flush=True)
        colmap.resize_images(data_dir, FACTORS, overwrite=False)
        return 'existing'
    binary = shutil.which('colmap')
    if sfm == 'colmap' and binary is None:
        raise PhotosError('--sfm colmap: no colmap binary on PATH; install COLMAP (apt-get install colmap) or '
                          'use --sfm pycolmap.')
    if sfm == 'colmap' or (sfm == 'auto' and binary is not None):
        print(f'Poses: COLMAP binary {binary} (scripts/local_colmap_and_resize.sh)', flush=True)
        env = dict(os.environ, PYTHON=sys.executable,
                   PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
        proc = subprocess.run(['bash', SCRIPT, data_dir, camera_model], env=env)
        if proc.returncode != 0 or not _has_model(data_dir):
            raise PhotosError(f'COLMAP could not pose the photos in {image_dir}; see its output above. Try '
                              f'`python -m mipnerf360.photos {data_dir} --sfm pycolmap` (retries with settings '
                              'for hard captures) or take more overlapping, sharp photos.')
        return 'colmap'
    print('Poses: pycolmap (python -m mipnerf360.colmap)', flush=True)
    try:
        colmap.run_sfm(data_dir, camera_model=camera_model, factors=FACTORS, min_registered=min_registered)
    except colmap.ColmapError as e:
        raise PhotosError(str(e)) from None
    return 'pycolmap'


def choose_factor(data_dir: str, max_side: Optional[int]) -> int:
    """The smallest of FACTORS whose images have their longest side <= max_side (gpu preset: 4, as 360.gin)."""
    if max_side is None:
        return 4
    image_dir = os.path.join(data_dir, 'images')
    with Image.open(os.path.join(image_dir, colmap.list_images(image_dir)[0])) as im:
        side = max(im.size)
    for f in FACTORS:
        if side / f <= max_side:
            return f
    return FACTORS[-1]


def gin_flags(preset: str, data_dir: str, ckpt_dir: str, factor: int, steps: Optional[int],
              bindings: Sequence[str] = ()) -> List[str]:
    """The `--gin_configs` / `--gin_bindings` flags shared by train, eval and render."""
    p = PRESETS[preset]
    all_bindings = ([f"Config.data_dir = '{data_dir}'", f"Config.checkpoint_dir = '{ckpt_dir}'",
                     f'Config.factor = {factor}'] + list(p['bindings'])
                    + ([f'Config.max_steps = {steps}'] if steps is not None else []) + list(bindings))
    return [f'--gin_configs={p["gin"]}'] + [f'--gin_bindings={b}' for b in all_bindings]


def _shell_word(arg: str) -> str:
    """`arg` quoted for a shell as the README writes gin flags: --gin_bindings="Config.x = 'y'"."""
    if arg == shlex.quote(arg) or any(c in arg for c in '"$`\\!'):
        return shlex.quote(arg)
    return f'"{arg}"'


class StepStopped(Exception):
    """photos got SIGINT or SIGTERM while a step ran; the step has exited (train after saving a checkpoint)."""

    def __init__(self, signum: int, module: str, returncode: int):
        name = signal.Signals(signum).name
        super().__init__(f'Stopped ({name}) during `python -m {module}`, which exited with status {returncode}; '
                         'run the same command again to continue (training resumes from its last checkpoint).')
        self.exit_code = 128 + signum


def _step_command(module: str, flags: Sequence[str]) -> List[str]:
    return [sys.executable, '-m', module] + list(flags) + ['--logtostderr']


def _wait_for_step(cmd: Sequence[str], module: str) -> int:
    """Starts the step and returns its exit status, waiting for it also when photos is interrupted. The step runs
    in its own session (`_start_step`), so a terminal's Ctrl-C reaches photos only and photos passes every SIGINT /
    SIGTERM on (also one that comes while the step starts): the step gets each signal exactly once, whether it was
    sent to photos or to its process group (train finishes its step, saves a checkpoint and exits; a second Ctrl-C
    stops it at once). A hang-up (the terminal closed), which the step's own session would not see, is passed on
    as SIGTERM. Raises StepStopped once the step has exited."""
    received: List[int] = []
    started: List[subprocess.Popen] = []
    pending: List[int] = []  # Signals that came while the step was starting.

    def pass_on(signum):
        started[0].send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    def on_signal(signum, frame):  # pylint: disable=unused-argument
        received.append(signum)
        if started:
            pass_on(signum)
        else:
            pending.append(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # Not the main thread: signals stay with the caller.
        pass
    try:
        started.append(_start_step(cmd))  # With the handlers in place: no signal is lost while it starts.
        while pending:
            pass_on(pending.pop(0))
        returncode = started[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise StepStopped(received[0], module, returncode)
    return returncode


def _start_step(cmd: Sequence[str]) -> subprocess.Popen:
    # Off the main thread `_wait_for_step` cannot pass signals on, so the step stays in photos' process group
    # and gets a terminal's Ctrl-C directly.
    own_session = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=own_session)


def _run_step(title: str, module: str, flags: Sequence[str]):
    cmd = _step_command(module, flags)
    print(f'\n== {title}\n$ ' + ' '.join(_shell_word(c) for c in ['python'] + cmd[1:]), flush=True)
    t0 = time.time()
    returncode = _wait_for_step(cmd, module)
    if returncode != 0:
        raise PhotosError(f'`python -m {module}` failed (exit {returncode}); see its output above. Fix what '
                          'it says and run this command again (training resumes from the last checkpoint).')
    print(f'== {title}: done in {time.time() - t0:.0f} s', flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m mipnerf360.photos', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data_dir', help='a folder with your photos in DIR/images')
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu',
                        help='cpu: small model, minutes on a laptop; gpu: configs/360.gin (default: cpu)')
    parser.add_argument('--steps', type=int, default=None, help='training steps (default: the preset config)')
    parser.add_argument('--factor', type=int, choices=FACTORS, default=None,
                        help='train on DIR/images_FACTOR (default: 4 for gpu; cpu: longest side <= 400 px)')
    parser.add_argument('--camera_model', default='OPENCV', choices=colmap.SUPPORTED_CAMERA_MODELS)
    parser.add_argument('--sfm', choices=('auto', 'colmap', 'pycolmap'), default='auto',
                        help='pose with the colmap binary, pycolmap, or the binary when on PATH (default)')
    parser.add_argument('--min_registered', type=float, default=0.9,
                        help='pycolmap retries with hard-capture settings below this registered fraction')
    parser.add_argument('--out', default=None, help='checkpoint folder (default: DIR/nerf_PRESET)')
    parser.add_argument('--gin_bindings', action='append', default=[],
                        help='extra gin bindings for train, eval and render (repeatable)')
    args = parser.parse_args(argv)
    data_dir = os.path.abspath(args.data_dir)
    ckpt_dir = os.path.abspath(args.out or os.path.join(data_dir, f'nerf_{args.preset}'))
    t0 = time.time()
    try:
        if args.steps is not None and args.steps < 1:
            raise PhotosError(f'--steps {args.steps}: use a positive number of training steps.')
        print('== Poses', flush=True)
        pose(data_dir, args.camera_model, args.sfm, args.min_registered)
        factor = args.factor or choose_factor(data_dir, PRESETS[args.preset]['max_side'])
        flags = gin_flags(args.preset, data_dir, ckpt_dir, factor, args.steps, args.gin_bindings)
        _run_step(f'Training ({args.preset} preset, images_{factor})', 'train', flags)
        _run_step('Evaluation on the held-out photos (every 8th)', 'eval', flags)
        _run_step('Rendering a video', 'render', flags + ['--gin_bindings=Config.render_path = True'])
    except PhotosError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2  # A user error, as for train / eval / render.
    except StepStopped as e:
        print(e, file=sys.stderr, flush=True)
        return e.exit_code
    metrics_file = os.path.join(ckpt_dir, 'test_preds', 'metrics.json')
    with open(metrics_file) as f:
        metrics = json.load(f)
    from mipnerf360 import checkpoints
    print(f'\n=== Done in {(time.time() - t0) / 60:.1f} min ===')
    print(f'Checkpoint: {checkpoints.latest_checkpoint(ckpt_dir)}')
    print(f"Metrics:    {metrics_file} (PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} on "
          f"{metrics['num_images']} held-out photos)")
    for video in sorted(glob.glob(os.path.join(ckpt_dir, 'render', '*_color.mp4'))):
        print(f'Video:      {video}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
