"""Import of checkpoints trained with google-research/multinerf (JAX), without JAX.

`python -m mipnerf360.convert_multinerf --gin_configs=... --gin_bindings=... --multinerf_checkpoint=PATH`
reads the multinerf checkpoint PATH (a `checkpoint_N` file, or the run's folder, where the newest `checkpoint_N`
is taken), maps it onto the model that the gin config builds and writes it into `Config.checkpoint_dir` as our
checkpoint of the same step, so that `python -m eval`, `render` and `train` (which resumes) then run with the
same flags.

What multinerf writes (`flax.training.checkpoints.save_checkpoint` of its `TrainState`): a msgpack map
{'step', 'params': {'params': {'NerfMLP_0': {'Dense_0': {'kernel', 'bias'}, ...}, 'PropMLP_0': ..., 'Embed_0':
...}}, 'opt_state': {'0': optax ScaleByAdamState {'count', 'mu', 'nu'}, '1': the schedule's {'count'}}}, where
every array is msgpack ext type 1 holding msgpack (shape, dtype name, C-order bytes), ext type 3 a numpy
scalar in the same form, and arrays over 1 GiB are split into a {'__msgpack_chunked_array__', 'shape',
'chunks'} map. flax >= 0.7 writes through orbax instead: a `checkpoint_N/` folder. Such a folder is read when
it holds one aggregated msgpack file `checkpoint` (orbax up to 0.2); one with per-array tensorstore files is
not, and the error says how to rewrite it as a msgpack file with flax.

Mapping: flax Dense kernels are [in, out], torch Linear weights [out, in] (transposed); biases and embeddings
are copied. One PropMLP is shared by all proposal levels in both implementations. optax's Adam state maps to
torch.optim.Adam's: mu -> exp_avg, nu -> exp_avg_sq (transposed like their parameters), count -> step; the
update rules are the same (bias-corrected moments, eps added outside the square root).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from mipnerf360 import checkpoints, configs, models, train_utils

_CHECKPOINT_NAME = re.compile(r'^checkpoint_(\d+)$')
_ORBAX_AGGREGATE = 'checkpoint'  # The msgpack file inside an orbax (<= 0.2) checkpoint folder.
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3


class MultinerfCheckpointError(checkpoints.CheckpointError):
    """A multinerf checkpoint that is missing, unreadable, or does not fit the configured model."""


def _orbax_advice(path: str) -> str:
    return (f'{path} is an orbax checkpoint folder, which cannot be read without JAX yet. Rewrite it as a '
            'msgpack checkpoint_N file with flax (in the environment multinerf ran in): FLAX_USE_ORBAX_'
            'CHECKPOINTING=false python -c "from flax.training import checkpoints as c; '
            f"s = c.restore_checkpoint('{path}', None); c.save_checkpoint('<new folder>', s, int(s['step']))\"; "
            'then pass --multinerf_checkpoint=<new folder>.')


def find_checkpoint(path: str) -> str:
    """The checkpoint `path` names: itself if it is a checkpoint file or orbax folder, else the newest
    `checkpoint_N` (file or folder) inside the folder `path`."""
    if not os.path.exists(path):
        raise MultinerfCheckpointError(f'--multinerf_checkpoint {path!r} does not exist; pass a checkpoint_N file '
                                       "written by multinerf or the run's folder (its Config.checkpoint_dir).")
    if os.path.isfile(path) or _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path))):
        return path
    found = [(int(m.group(1)), name) for name in os.listdir(path) if (m := _CHECKPOINT_NAME.match(name))]
    if not found:
        raise MultinerfCheckpointError(f'No multinerf checkpoint (checkpoint_<step>) in the folder {path!r}; pass '
                                       "the run's Config.checkpoint_dir or a checkpoint_N file.")
    return os.path.join(path, max(found)[1])


def _ndarray_from_payload(data: bytes) -> np.ndarray:
    import msgpack
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    dtype_name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    if dtype_name == 'bfloat16':  # bfloat16 is the upper half of a float32.
        bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(dtype_name)).reshape(shape).copy()


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack
    if code == _EXT_NDARRAY:
        return _ndarray_from_payload(data)
    if code == _EXT_NPSCALAR:
        return _ndarray_from_payload(data)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _unchunk(tree: Any) -> Any:
    if not isinstance(tree, dict):
        return tree
    if tree.get('__msgpack_chunked_array__'):
        shape = tuple(tree['shape'][k] for k in sorted(tree['shape'], key=int))
        chunks = [tree['chunks'][k] for k in sorted(tree['chunks'], key=int)]
        return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def read_flax_checkpoint(path: str) -> Dict[str, Any]:
    """Reads a flax msgpack checkpoint (file, or orbax <= 0.2 folder with an aggregated msgpack file) into
    nested dicts of numpy arrays; tuples and lists appear as dicts keyed '0', '1', ... as flax stores them."""
    try:
        import msgpack
    except ImportError:
        raise MultinerfCheckpointError("Reading multinerf checkpoints needs msgpack; pip install "
                                       "'mipnerf360[multinerf]' (or pip install msgpack).") from None
    file = path
    if os.path.isdir(path):
        file = os.path.join(path, _ORBAX_AGGREGATE)
        if not os.path.isfile(file):
            raise MultinerfCheckpointError(_orbax_advice(path))
    with open(file, 'rb') as f:
        raw = f.read()
    try:
        tree = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for foreign or truncated data.
        raise MultinerfCheckpointError(
            f'{file} is not a multinerf (flax msgpack) checkpoint: it does not decode as msgpack '
            f'({type(e).__name__}); pass a checkpoint_N file written by multinerf\'s train.py.') from None
    if not isinstance(tree, dict) or 'params' not in tree:
        raise MultinerfCheckpointError(f'{file} is msgpack but not a multinerf checkpoint (no params); pass a '
                                       "checkpoint_N file written by multinerf's train.py.")
    if os.path.isdir(path) and _has_placeholders(tree):
        raise MultinerfCheckpointError(_orbax_advice(path))
    return _unchunk(tree)


def _has_placeholders(tree: Any) -> bool:
    """Whether an orbax aggregate keeps arrays elsewhere (leaves are then strings naming tensorstore files)."""
    if isinstance(tree, dict):
        return any(_has_placeholders(v) for v in tree.values())
    return isinstance(tree, str)


def _lookup(tree: Dict[str, Any], flax_path: str) -> Optional[np.ndarray]:
    node: Any = tree
    for key in flax_path.split('/'):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, np.ndarray) else None


def _leaf_paths(tree: Dict[str, Any], prefix: str = '') -> List[str]:
    paths = []
    for k, v in tree.items():
        p = f'{prefix}{k}'
        paths += _leaf_paths(v, p + '/') if isinstance(v, dict) else [p]
    return paths


def _params_root(tree: Dict[str, Any]) -> Dict[str, Any]:
    """multinerf's TrainState holds the flax variables {'params': {...}} as its params."""
    params = tree['params']
    return params['params'] if isinstance(params, dict) and 'params' in params else params


def _adam_state(tree: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """optax's ScaleByAdamState {'count', 'mu', 'nu'} anywhere in the optimizer state, or None."""
    stack = [tree.get('opt_state')]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if {'count', 'mu', 'nu'} <= set(node):
                return node
            stack += list(node.values())
    return None


def _config_hint(flax_path: str) -> str:
    top = flax_path.split('/')[0]
    if top.endswith('MLP_0'):
        mlp = top[:-len('_0')]
        return (f'{mlp}.net_depth / net_width / skip_layer / bottleneck_width / net_width_viewdirs, its encoding '
                f'({mlp}.basis_shape, basis_subdivisions, min_deg_point, max_deg_point, deg_view) or its branches '
                f'({mlp}.disable_rgb, use_reflections, use_directional_enc, enable_pred_normals), or '
                'Model.num_glo_features (a GLO vector widens the view branch)')
    if top == 'Embed_0':
        return 'Model.num_glo_features / num_glo_embeddings'
    if top == 'exposure_scaling_offsets':
        return 'Model.learned_exposure_scaling'
    return 'the Model bindings'


def _mismatch(source: str, what: str, flax_path: str) -> MultinerfCheckpointError:
    return MultinerfCheckpointError(
        f'{source} does not fit the model this gin config builds: {what}. The config differs from the one the run '
        f'was trained with (check {_config_hint(flax_path)}); pass the gin files and bindings of the run '
        '(multinerf saved them as config.gin next to its checkpoints).')


def _to_torch(value: np.ndarray, flax_path: str, like: torch.Tensor) -> torch.Tensor:
    value = value.T if flax_path.endswith('/kernel') else value
    return torch.from_numpy(np.ascontiguousarray(value)).to(dtype=like.dtype)


def convert_state(tree: Dict[str, Any], model: models.Model, config: Any, source: str = 'checkpoint'
                  ) -> Dict[str, Any]:
    """Our checkpoint state {'model', 'optimizer' (when the tree has Adam state), 'step', 'seed'} for `model`
    from the multinerf checkpoint `tree` (see `read_flax_checkpoint`); `source` names it in errors."""
    names = models.reference_param_names(model)
    params = _params_root(tree)
    named = dict(model.named_parameters())
    weights = {}
    for name, p in named.items():
        flax_path = names[name]
        value = _lookup(params, flax_path)
        if value is None:
            raise _mismatch(source, f'it has no parameter {flax_path} (for our {name}, shape {tuple(p.shape)})',
                            flax_path)
        ref_shape = tuple(value.shape[::-1]) if flax_path.endswith('/kernel') else tuple(value.shape)
        if ref_shape != tuple(p.shape):
            shown = f'{tuple(value.shape)} ([in, out])' if flax_path.endswith('/kernel') else str(tuple(value.shape))
            raise _mismatch(source, f'parameter {flax_path} has shape {shown} but our {name} has '
                            f'{tuple(p.shape)}' + (' ([out, in])' if flax_path.endswith('/kernel') else ''),
                            flax_path)
        weights[name] = _to_torch(value, flax_path, p)
    unused = sorted(set(_leaf_paths(params)) - set(names.values()))
    if unused:
        raise _mismatch(source, f'it has parameter {unused[0]}, which this model lacks', unused[0])

    model_state = model.state_dict()
    model_state.update(weights)
    step = int(np.asarray(tree.get('step', 0)))
    state: Dict[str, Any] = {'model': model_state, 'step': step, 'seed': getattr(config, 'seed', 0)}

    adam = _adam_state(tree)
    if adam is not None:
        mu, nu = _params_root({'params': adam['mu']}), _params_root({'params': adam['nu']})
        count = float(np.asarray(adam['count']))
        optimizer, _ = train_utils.create_optimizer(config, model)
        for name, p in named.items():
            if not p.requires_grad:
                continue
            flax_path = names[name]
            moments = [_lookup(mu, flax_path), _lookup(nu, flax_path)]
            if any(m is None or m.size != p.numel() for m in moments):
                raise MultinerfCheckpointError(f'{source}: its Adam state (opt_state mu / nu) lacks {flax_path} or '
                                               'does not match its parameters; the checkpoint is damaged.')
            optimizer.state[p] = {'step': torch.tensor(count, dtype=torch.float32),
                                  'exp_avg': _to_torch(moments[0], flax_path, p),
                                  'exp_avg_sq': _to_torch(moments[1], flax_path, p)}
        state['optimizer'] = optimizer.state_dict()
    return state


def convert(multinerf_checkpoint: str, config: Any, device: Any = 'cpu') -> Tuple[Dict[str, Any], str]:
    """(our checkpoint state, the multinerf file read) for the model `config` and gin build."""
    path = find_checkpoint(multinerf_checkpoint)
    tree = read_flax_checkpoint(path)
    model = models.construct_model(config=config, device=device)
    return convert_state(tree, model, config, source=path), path


def write_converted(multinerf_checkpoint: str, config: Any) -> str:
    """Converts and writes our checkpoint (and config.gin) into `config.checkpoint_dir`; returns its path.
    Refuses a checkpoint_dir that already holds checkpoints, so nothing trained there is shadowed or lost."""
    existing = checkpoints.list_checkpoints(config.checkpoint_dir)
    if existing:
        raise MultinerfCheckpointError(
            f'Config.checkpoint_dir = {config.checkpoint_dir!r} already holds checkpoints '
            f'({os.path.basename(existing[-1])}); convert into an empty folder.')
    state, source = convert(multinerf_checkpoint, config)
    checkpoints.ensure_dir(config.checkpoint_dir)
    configs.save_config_str(config.checkpoint_dir)
    out = checkpoints.save_checkpoint(config.checkpoint_dir, state, state['step'], keep=0)
    print(f'Converted {source} (step {state["step"]}) to {out}' +
          ('' if 'optimizer' in state else ' (no Adam state in it: eval and render only, training cannot resume)'))
    return out


def main(unused_argv):
    from absl import flags
    from mipnerf360.cli import common
    if not flags.FLAGS.multinerf_checkpoint:
        raise MultinerfCheckpointError('--multinerf_checkpoint is required: a checkpoint_N file written by '
                                       "multinerf, or the run's folder.")
    config = common.load_config(for_training=True)
    write_converted(flags.FLAGS.multinerf_checkpoint, config)


def run(argv=None):
    from absl import flags
    from mipnerf360.cli import common
    if 'multinerf_checkpoint' not in flags.FLAGS:
        flags.DEFINE_string('multinerf_checkpoint', None,
                            "A checkpoint_N file written by multinerf's train.py, or the run's folder (newest).")
    common.run(main, 'eval', argv)


if __name__ == '__main__':
    run(sys.argv)
