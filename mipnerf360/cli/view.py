"""`python -m mipnerf360.view --gin_configs=... --gin_bindings=...`: the live browser viewer of a trained model.

The same flags as eval / render. Loads the newest checkpoint of `Config.checkpoint_dir` and serves the viewer
(see `mipnerf360.viewer`) on `Config.viewer_port` (8080 when unset) until Ctrl-C; every
`Config.viewer_refresh_seconds` it loads a newer checkpoint when there is one, so it follows a training run in
another process. Browsers start at the first test camera (the first training camera without a test split).
"""

from __future__ import annotations

import time

from mipnerf360 import checkpoints, datasets, viewer
from mipnerf360.cli import common

DEFAULT_PORT = 8080


def _test_scene(config):
    """The test split (its first camera is where browsers start), or None when there is none."""
    try:
        return datasets.load_scene(config, 'test')
    except datasets.DatasetError:
        return None


def main(unused_argv):
    config = common.load_config(for_training=False)
    viewer.import_viser()  # A missing viser is reported before anything slow starts.
    path = common.require_checkpoint(config)
    device = common.get_device(config)
    scene = datasets.load_scene(config, 'train')
    initial = viewer.initial_camera_of(_test_scene(config))
    model = common.build_model(config, device)
    step = common.restore_model(model, config, device, path=path)
    view = viewer.Viewer(model, config, scene, port=config.viewer_port or DEFAULT_PORT, step=step, **initial)
    try:
        print(f'Viewer of {path} (step {step}) at {view.url}; Ctrl-C to stop.', flush=True)
        while True:
            time.sleep(max(config.viewer_refresh_seconds, .1))
            newest = checkpoints.latest_checkpoint(config.checkpoint_dir)
            if newest is None or newest == path:
                continue
            try:
                step = common.restore_model(model, config, device, path=newest)
            except checkpoints.CheckpointError as e:  # Rotated away or being replaced: try again later.
                print(f'Not loading {newest}: {common.one_line(e)}', flush=True)
                continue
            path = newest
            view.update(model, step, force=True)
            print(f'Loaded {path} (step {step}).', flush=True)
    finally:
        view.close()


def run(argv=None):
    common.run(main, 'view', argv)


if __name__ == '__main__':
    run()
