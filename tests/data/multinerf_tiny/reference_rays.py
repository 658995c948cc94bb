"""Saves 48 rays of the first test image and multinerf's outputs for them (every level's renderings, sampled s
and weights; deterministic, train_frac = step / max_steps) as reference_rays.npz. Run with the train flags (--gin_configs, --gin_bindings) from a
multinerf checkout ($MULTINERF, default /tmp/multinerf); see ../README_multinerf_checkpoint.md."""
import os
import sys

ROOT = os.environ.get('MULTINERF', '/tmp/multinerf')
sys.path[:0] = [ROOT, os.path.join(ROOT, 'internal', 'pycolmap')]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from flax.training import checkpoints  # noqa: E402
from internal import configs, datasets, models  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference_rays.npz')


def main(_):
    config = configs.load_config(save_config=False)
    dataset = datasets.load_dataset('test', config.data_dir, config)
    state = checkpoints.restore_checkpoint(config.checkpoint_dir, None)
    flat = jax.tree_util.tree_map(lambda x: np.reshape(x, (-1, x.shape[-1])), dataset.generate_ray_batch(0).rays)
    idx = np.linspace(0, flat.origins.shape[0] - 1, 48).astype(int)
    rays = jax.tree_util.tree_map(lambda x: x[idx], flat)
    train_frac = float(state['step']) / config.max_steps
    renderings, ray_history = models.Model(config=config).apply(
        {'params': state['params']['params']}, None, rays, train_frac=train_frac, compute_extras=True)
    out = {f'rays_{k}': np.asarray(v) for k, v in rays.__dict__.items() if v is not None}
    for level, rendering in enumerate(renderings):
        out.update({f'level{level}_{k}': np.asarray(v) for k, v in rendering.items()
                    if v is not None and not k.startswith('ray_')})
    for level, history in enumerate(ray_history):
        out.update({f'level{level}_{k}': np.asarray(history[k]) for k in ('sdist', 'weights')})
    out['train_frac'] = np.float32(train_frac)
    np.savez_compressed(OUT, **out)


if __name__ == '__main__':
    configs.define_common_flags()
    app.run(main)
