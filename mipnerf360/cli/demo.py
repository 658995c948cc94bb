"""`make demo` / `python -m mipnerf360.cli.demo`: the whole pipeline on a generated scene, on a laptop CPU.

Generates a small synthetic 360 scene in the mip-NeRF 360 dataset layout (COLMAP `sparse/0`, `images_N/`),
then runs the standard commands on it, exactly as a user would on a real scene:
    python -m train  --gin_configs=configs/demo.gin --gin_bindings="Config.data_dir = '...'" ...
    python -m eval   (same flags)
    python -m render (same flags) --gin_bindings="Config.render_path = True" ...
and prints the test PSNR / SSIM and where the video is.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd, env):
    print('$ ' + ' '.join(cmd if len(cmd) < 4 else cmd[:3] + [f'"{c}"' if ' ' in c else c for c in cmd[3:]]),
                flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='demo_out', help='output folder (scene, checkpoints, renders)')
    parser.add_argument('--steps', type=int, default=None, help='training steps (default: the demo config)')
    parser.add_argument('--frames', type=int, default=30, help='frames in the rendered fly-through')
    args = parser.parse_args(argv)

    from mipnerf360 import synthetic
    out = os.path.abspath(args.out)
    scene_dir = os.path.join(out, 'scene')
    ckpt_dir = os.path.join(out, 'demo', 'synthetic360')  # <exp>/<scene>, as video names expect
    t0 = time.time()
    if not os.path.exists(os.path.join(scene_dir, 'sparse', '0')):
        print(f'Generating a synthetic 360 scene in {scene_dir}', flush=True)
        synthetic.write_colmap_scene(scene_dir, n_views=40, width=256, height=192, factors=(2, 4), seed=0)
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    flags = ['--gin_configs=configs/demo.gin',
                      f"--gin_bindings=Config.data_dir = '{scene_dir}'",
                      f"--gin_bindings=Config.checkpoint_dir = '{ckpt_dir}'"]
    if args.steps is not None:
        flags.append(f'--gin_bindings=Config.max_steps = {args.steps}')
    py = sys.executable
    _run([py, '-m', 'train'] + flags + ['--logtostderr'], env)
    _run([py, '-m', 'eval'] + flags + ['--logtostderr'], env)
    _run([py, '-m', 'render'] + flags + ['--gin_bindings=Config.render_path = True',
                                                                              f'--gin_bindings=Config.render_path_frames = {args.frames}',
                                                                              '--gin_bindings=Config.render_video_fps = 15', '--logtostderr'], env)
    with open(os.path.join(ckpt_dir, 'test_preds', 'metrics.json')) as f:
        metrics = json.load(f)
    videos = sorted(glob.glob(os.path.join(ckpt_dir, 'render', '*.mp4')))
    print('\n=== mipnerf360 demo finished in %.1f min ===' % ((time.time() - t0) / 60))
    print(f"Test-set PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} "
                f"({metrics['num_images']} held-out views, step {metrics['step']})")
    print(f'Checkpoints and TensorBoard logs: {ckpt_dir}')
    print(f"Test renders and metrics:        {os.path.join(ckpt_dir, 'test_preds')}")
    for v in videos:
        print(f'Video: {v}')


def run():
    main()


if __name__ == '__main__':
    main()
