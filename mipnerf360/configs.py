"""The `Config` dataclass (gin-configurable), flag parsing and config saving.

Field names and defaults are those of multinerf's `internal/configs.py`, so the reference's .gin files and
`--gin_bindings` work unchanged. The reference's JAX callables named in gin files (`@jnp.reciprocal`,
`@jax.nn.softplus`, ...) are registered here under the same names, bound to their torch equivalents.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tokenize
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import gin
import torch
import torch.nn.functional as F

# Gin files of the reference name JAX functions; register torch functions under the same selectors.
_EXTERNAL = {
        'jnp': {'reciprocal': torch.reciprocal, 'log': torch.log, 'log1p': torch.log1p, 'exp': torch.exp,
                        'sqrt': torch.sqrt, 'square': torch.square},
        'jax.nn': {'relu': F.relu, 'softplus': F.softplus, 'silu': F.silu},
}


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _register_external():
    for module, fns in _EXTERNAL.items():
        for name, fn in fns.items():
            try:
                gin.external_configurable(fn, name=name, module=module)
            except ValueError:  # Already registered (module re-import).
                pass


_register_external()


@gin.configurable()
@dataclasses.dataclass
class Config:
    """Configuration flags for everything (same names and defaults as the reference)."""
    dataset_loader: str = 'llff'  # The type of dataset loader to use.
    batching: str = 'all_images'  # Batch composition, [single_image, all_images].
    batch_size: int = 16384  # The number of rays/pixels in each batch.
    patch_size: int = 1  # Resolution of patches sampled for training batches.
    factor: int = 0  # The downsample factor of images, 0 for no downsampling.
    load_alphabetical: bool = True  # Load images in COLMAP vs alphabetical ordering (affects heldout test set).
    forward_facing: bool = False  # Set to True for forward-facing LLFF captures.
    render_path: bool = False  # If True, render a path.
    llffhold: int = 8  # Use every Nth image for the test set.
    llff_use_all_images_for_training: bool = False  # If true, use all input images for training.
    # COLMAP scenes: the fewest of the photos in images/ the model must have registered (0 accepts any). Below
    # half, the model sees too little of the scene to be useful and the capture or SfM failed: re-pose it.
    min_registered_fraction: float = 0.5
    use_tiffs: bool = False  # If True, use 32-bit TIFFs. Used only by Blender.
    compute_disp_metrics: bool = False  # If True, load and compute disparity MSE.
    compute_normal_metrics: bool = False  # If True, load and compute normal MAE.
    gc_every: int = 10000  # The number of steps between garbage collections.
    disable_multiscale_loss: bool = False  # If True, disable multiscale loss.
    randomized: bool = True  # Use randomized stratified sampling.
    near: float = 2.  # Near plane distance.
    far: float = 6.  # Far plane distance.
    checkpoint_dir: Optional[str] = None  # Where to log checkpoints.
    render_dir: Optional[str] = None  # Output rendering directory.
    data_dir: Optional[str] = None  # Input data directory.
    vocab_tree_path: Optional[str] = None  # Path to vocab tree for COLMAP.
    # Chunk size for whole-image renderings; None: sized from the free memory on CUDA (models.auto_render_chunk_size),
    # 16384 elsewhere.
    render_chunk_size: Optional[int] = None
    num_showcase_images: int = 5  # The number of test-set images to showcase.
    deterministic_showcase: bool = True  # If True, showcase the same images.
    vis_num_rays: int = 16  # The number of rays to visualize.
    vis_decimate: int = 0  # Decimate images for tensorboard (ie, x[::d, ::d]) to conserve memory usage.

    # Only used by train.py:
    max_steps: int = 250000  # The number of optimization steps.
    early_exit_steps: Optional[int] = None  # Early stopping, for debugging.
    checkpoint_every: int = 25000  # The number of steps to save a checkpoint.
    checkpoints_to_keep: int = 3  # How many of the newest checkpoints to keep on disk.
    print_every: int = 100  # The number of steps between reports to tensorboard.
    train_render_every: int = 5000  # Steps between test set renders when training.
    cast_rays_in_train_step: bool = False  # If True, compute rays in train step (on the model's device).
    data_loss_type: str = 'charb'  # What kind of loss to use ('mse', 'charb', 'rawnerf', 'robustnerf').
    charb_padding: float = 0.001  # The padding used for Charbonnier loss.
    data_loss_mult: float = 1.0  # Mult for the finest data term in the loss.
    data_coarse_loss_mult: float = 0.  # Multiplier for the coarser data terms.
    interlevel_loss_mult: float = 1.0  # Mult. for the loss on the proposal MLP.
    orientation_loss_mult: float = 0.0  # Multiplier on the orientation loss.
    orientation_coarse_loss_mult: float = 0.0  # Coarser orientation loss weights.
    # RobustNerf loss hyperparameters.
    robustnerf_inlier_quantile: float = 0.5
    enable_robustnerf_loss: bool = False
    robustnerf_inner_patch_size: int = 8
    robustnerf_smoothed_filter_size: int = 3
    robustnerf_smoothed_inlier_quantile: float = 0.5
    robustnerf_inner_patch_inlier_quantile: float = 0.5
    orientation_loss_target: str = 'normals_pred'  # What that loss is imposed on: 'normals' or 'normals_pred'.
    predicted_normal_loss_mult: float = 0.0  # Mult. on the predicted normal loss.
    predicted_normal_coarse_loss_mult: float = 0.0  # Mult. on the coarser predicted normal loss.
    # Weight decay multipliers by parameter-name prefix, e.g. {'NerfMLP_0': 1e-5, 'PropMLP_0/Dense_0': 1e-3}.
    weight_decay_mults: Dict[str, Any] = dataclasses.field(default_factory=dict)

    lr_init: float = 0.002  # The initial learning rate.
    lr_final: float = 0.00002  # The final learning rate.
    lr_delay_steps: int = 512  # The number of "warmup" learning steps.
    lr_delay_mult: float = 0.01  # How much severe the "warmup" should be.
    adam_beta1: float = 0.9  # Adam's beta1 hyperparameter.
    adam_beta2: float = 0.999  # Adam's beta2 hyperparameter.
    adam_eps: float = 1e-6  # Adam's epsilon hyperparameter.
    grad_max_norm: float = 0.001  # Gradient clipping magnitude, disabled if == 0.
    grad_max_val: float = 0.  # Gradient clipping value, disabled if == 0.
    distortion_loss_mult: float = 0.01  # Multiplier on the distortion loss.

    # Only used by eval.py:
    eval_only_once: bool = True  # If True evaluate the model only once, ow loop.
    eval_save_output: bool = True  # If True save predicted images to disk.
    eval_save_ray_data: bool = False  # If True save individual ray traces.
    eval_render_interval: int = 1  # The interval between images saved to disk.
    eval_dataset_limit: int = 2**31 - 1  # Num test images to eval.
    eval_quantize_metrics: bool = True  # If True, run metrics on 8-bit images.
    eval_crop_borders: int = 0  # Ignore c border pixels in eval (x[c:-c, c:-c]).

    # Only used by render.py:
    # Framerate in frames-per-second; unless bound, a camera_path.json render_path_file's fps (see load_config).
    render_video_fps: int = 60
    render_video_crf: int = 18  # Constant rate factor for ffmpeg video quality.
    render_path_frames: int = 120  # Number of frames in render path.
    z_variation: float = 0.  # How much height variation in render path.
    z_phase: float = 0.  # Phase offset for height variation in render path.
    render_dist_percentile: float = 0.5  # How much to trim from near/far planes.
    render_dist_curve_fn: Callable[..., Any] = torch.log  # How depth is curved.
    # Render path file: a .npy of [N, 3, 4] camera-to-worlds in the normalised (dataset) frame, or a nerfstudio
    # camera_path.json (poses in the input data's world frame unless it says "frame": "normalized"; its size,
    # fields of view, camera type and fps are used unless the render_* fields are set). mipnerf360.camera_path.
    render_path_file: Optional[str] = None
    render_job_id: int = 0  # Render job id.
    render_num_jobs: int = 1  # Total number of render jobs.
    render_resolution: Optional[Tuple[int, int]] = None  # Render resolution, as (width, height).
    render_focal: Optional[float] = None  # Render focal length.
    render_camtype: Optional[str] = None  # 'perspective', 'fisheye', or 'pano'.
    render_spherical: bool = False  # Render spherical 360 panoramas.
    render_save_async: bool = True  # Save frames from a separate thread.
    # Text file with the names of the images used as spline keyframes, or a directory holding those images.
    render_spline_keyframes: Optional[str] = None
    render_spline_n_interp: int = 30  # Num. frames to interpolate per keyframe.
    render_spline_degree: int = 5  # Polynomial degree of B-spline interpolation.
    render_spline_smoothness: float = .03  # B-spline smoothing factor, 0 for exact interpolation of keyframes.
    render_spline_interpolate_exposure: bool = False  # Interpolate per-frame exposure from spline keyframes.

    # Flags for raw datasets.
    rawnerf_mode: bool = False  # Load raw images and train in raw color space.
    exposure_percentile: float = 97.  # Image percentile to expose as white.
    num_border_pixels_to_mask: int = 0  # During training, discard N-pixel border around each input image.
    apply_bayer_mask: bool = False  # During training, apply Bayer mosaic mask.
    autoexpose_renders: bool = False  # During rendering, autoexpose each image.
    eval_raw_affine_cc: bool = False  # For raw test scenes, use affine raw-space color correction.

    # Beyond the reference:
    dtu_light_cond: int = 3  # DTU lighting condition (0-6) of the images to load (the reference reads this field
    # without defining it).
    dtuhold: int = 8  # DTU: every Nth image is a test image.
    seed: int = 0  # Seed of every random stream (model init, batches, sampling).
    device: Optional[str] = None  # 'cpu', 'cuda', 'cuda:1', ...; None picks CUDA when available.
    # torch.compile of the model (models.compile_model): 'none', 'mlp' (each MLP) or 'model' (the whole
    # generator-free rendering of a batch, one graph).
    compile: str = 'none'
    # Precision of the MLPs' matrix products (models.apply_precision / Model.set_precision): 'fp32', 'tf32', or
    # 'bf16' (autocast); None is TF32 on CUDA (as the reference's default XLA precision) and float32 on CPU.
    # Geometry, sampling, compositing and losses stay float32.
    precision: Optional[str] = None

    # Training reliability and memory (nan_policy, nan_max_skips_in_a_row, resume_fallback, grad_accum_steps):
    nan_policy: str = 'stop'  # On a non-finite loss term or gradient norm: 'stop' (exit non-zero, naming the step
    # and the terms; nothing non-finite is saved) or 'skip_step' (that update is not applied, and counted).
    nan_max_skips_in_a_row: int = 100  # 'skip_step' stops after this many skipped steps in a row.
    resume_fallback: bool = False  # Resume from the newest intact checkpoint when the newest fails its checksum.
    grad_accum_steps: Union[int, str] = 1  # Split each batch into this many micro-batches (less memory, same
    # gradient); 'auto': as many as the free CUDA memory needs (memory.auto_grad_accum_steps; 1 off CUDA).

    # Memory (bytes per ray: bench/bench_memory.py, bench/RESULTS.md):
    checkpoint_nerf_mlp: bool = False  # Recompute the NerfMLP's encoding and trunk in the backward pass
    # instead of keeping their activations (torch.utils.checkpoint): about half the memory per ray of 360.gin, one
    # more forward pass of the trunk. No saving with density-gradient normals (disable_density_normals = False).

    # The live browser viewer (mipnerf360/viewer.py; needs the `viewer` extra, viser):
    viewer_port: Optional[int] = None  # While training, serve the viewer on this port (None: off); `python -m
    # mipnerf360.view` serves on it, 8080 when None. A port in use gives the next free one (the log names it).
    viewer_host: str = '127.0.0.1'  # Address the viewer listens on ('0.0.0.0' for every interface).
    viewer_max_resolution: int = 512  # Long side, in pixels, of the finest image the viewer renders.
    viewer_refresh_seconds: float = 10.  # While training, the viewer copies the weights at most this often (and
    # only while a browser is connected); `python -m mipnerf360.view` checks for a newer checkpoint this often.


def define_common_flags():
    """Defines the absl flags used by train, eval and render."""
    from absl import flags
    flags.DEFINE_string('mode', None, 'Required by GINXM, not used.')
    flags.DEFINE_string('base_folder', None, 'Required by GINXM, not used.')
    flags.DEFINE_multi_string('gin_bindings', None, 'Gin parameter bindings.')
    flags.DEFINE_multi_string('gin_configs', None, 'Gin config files.')


class ConfigError(ValueError):
    """A user-facing configuration problem (bad gin file or binding, or a value out of its range)."""


# A range (for `check_number`): (kind, low, high, low_open, high_open); None bounds are unbounded. kind 'int'
# takes Python ints, 'float' ints or finite floats. These ranges serve Config's fields and the models' (models.py).
def int_at_least(lo: int) -> Tuple[str, int, None, bool, bool]:
    return ('int', lo, None, False, False)


NON_NEGATIVE = ('float', 0., None, False, False)
POSITIVE = ('float', 0., None, True, False)
FRACTION = ('float', 0., 1., False, False)
FINITE = ('float', None, None, False, False)
_AT_LEAST_1 = int_at_least(1)
_AT_LEAST_0 = int_at_least(0)
# Ranges of the numeric Config fields. `far > near` and `render_job_id < render_num_jobs` are checked across
# fields in `validate_config`.
_RANGES: Dict[str, Tuple[str, Optional[float], Optional[float], bool, bool]] = {
        'batch_size': _AT_LEAST_1, 'patch_size': _AT_LEAST_1, 'factor': _AT_LEAST_0, 'llffhold': _AT_LEAST_1,
        'gc_every': _AT_LEAST_1, 'near': NON_NEGATIVE, 'far': POSITIVE, 'render_chunk_size': _AT_LEAST_1,
        'num_showcase_images': _AT_LEAST_0, 'vis_num_rays': _AT_LEAST_1, 'vis_decimate': _AT_LEAST_0,
        'max_steps': _AT_LEAST_1, 'early_exit_steps': _AT_LEAST_1, 'checkpoint_every': _AT_LEAST_1,
        'checkpoints_to_keep': _AT_LEAST_1, 'print_every': _AT_LEAST_1, 'train_render_every': _AT_LEAST_0,
        'charb_padding': NON_NEGATIVE, 'data_loss_mult': NON_NEGATIVE, 'data_coarse_loss_mult': NON_NEGATIVE,
        'interlevel_loss_mult': NON_NEGATIVE, 'orientation_loss_mult': NON_NEGATIVE,
        'orientation_coarse_loss_mult': NON_NEGATIVE, 'robustnerf_inlier_quantile': FRACTION,
        'min_registered_fraction': FRACTION,
        'robustnerf_inner_patch_size': _AT_LEAST_1, 'robustnerf_smoothed_filter_size': _AT_LEAST_1,
        'robustnerf_smoothed_inlier_quantile': FRACTION, 'robustnerf_inner_patch_inlier_quantile': FRACTION,
        'predicted_normal_loss_mult': NON_NEGATIVE, 'predicted_normal_coarse_loss_mult': NON_NEGATIVE,
        'lr_init': POSITIVE, 'lr_final': POSITIVE, 'lr_delay_steps': _AT_LEAST_0, 'lr_delay_mult': FRACTION,
        'adam_beta1': ('float', 0., 1., False, True), 'adam_beta2': ('float', 0., 1., False, True),
        'adam_eps': NON_NEGATIVE, 'grad_max_norm': NON_NEGATIVE, 'grad_max_val': NON_NEGATIVE,
        'distortion_loss_mult': NON_NEGATIVE, 'eval_render_interval': _AT_LEAST_0,
        'eval_dataset_limit': _AT_LEAST_1, 'eval_crop_borders': _AT_LEAST_0, 'render_video_fps': _AT_LEAST_1,
        'render_video_crf': ('int', 0, 51, False, False), 'render_path_frames': _AT_LEAST_1,
        'z_variation': FINITE, 'z_phase': FINITE, 'render_dist_percentile': ('float', 0., 50., False, True),
        'render_job_id': _AT_LEAST_0, 'render_num_jobs': _AT_LEAST_1, 'render_focal': POSITIVE,
        'render_spline_n_interp': _AT_LEAST_1, 'render_spline_degree': _AT_LEAST_1,
        'render_spline_smoothness': NON_NEGATIVE, 'exposure_percentile': ('float', 0., 100., False, False),
        'num_border_pixels_to_mask': _AT_LEAST_0, 'dtu_light_cond': ('int', 0, 6, False, False),
        'dtuhold': _AT_LEAST_1, 'seed': ('int', 0, 2**63 - 1, False, False),
        'nan_max_skips_in_a_row': _AT_LEAST_1,
        'viewer_port': ('int', 1, 65535, False, False), 'viewer_max_resolution': _AT_LEAST_1,
        'viewer_refresh_seconds': NON_NEGATIVE,
}
# The values of the choice fields that other modules check too (models, train_utils).
DATA_LOSS_TYPES = ('mse', 'charb', 'rawnerf', 'robustnerf')
COMPILE_MODES = ('none', 'mlp', 'model')
PRECISIONS = ('fp32', 'tf32', 'bf16')
NAN_POLICIES = ('stop', 'skip_step')
# Fields whose value must be one of a fixed set of strings (None allowed where the default is None).
_CHOICES: Dict[str, Tuple[str, ...]] = {
        'batching': ('all_images', 'single_image'),
        'data_loss_type': DATA_LOSS_TYPES,
        'orientation_loss_target': ('normals', 'normals_pred'),
        'render_camtype': ('perspective', 'fisheye', 'pano'),
        'compile': COMPILE_MODES,
        'precision': PRECISIONS,
        'nan_policy': NAN_POLICIES,
}
_STRINGS = ('dataset_loader', 'checkpoint_dir', 'render_dir', 'data_dir', 'vocab_tree_path', 'render_path_file',
            'render_spline_keyframes', 'device', 'viewer_host')
# Fields of the reference that this port does not use: a non-default value is rejected rather than ignored.
_UNUSED = {'gc_every': 'PyTorch frees tensors itself (the reference disables Python\'s garbage collector and '
                       'collects every gc_every steps; this port leaves the collector on)'}


def _describe_range(kind, lo, hi, lo_open, hi_open) -> str:
    what = 'an integer' if kind == 'int' else 'a finite number'
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo}"
    return what


def check_number(name: str, value: Any, kind, lo, hi, lo_open, hi_open, owner: str = 'Config'):
    """Raises ConfigError unless `value` is of `kind` and in the range; `owner` is the gin name of the class
    whose field `name` is (Config, Model, NerfMLP, ...)."""
    ok_type = (isinstance(value, int) if kind == 'int' else isinstance(value, (int, float))) \
        and not isinstance(value, bool)
    ok = ok_type and (kind == 'int' or math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ConfigError(f'{owner}.{name} = {value!r} must be {_describe_range(kind, lo, hi, lo_open, hi_open)}; '
                          f'{_fix_hint(owner, name)}')


def check_choice(name: str, value: Any, choices: Sequence[str], owner: str = 'Config', none_ok: bool = False):
    """Raises ConfigError unless `value` is one of the strings `choices` (or None, when `none_ok`); `owner` as in
    `check_number`."""
    if (value is None and none_ok) or (isinstance(value, str) and value in choices):
        return
    allowed = ', '.join(map(repr, choices)) + (' or None' if none_ok else '')
    raise ConfigError(f'{owner}.{name} = {value!r} must be one of {allowed}; {_fix_hint(owner, name)}')


def check_bool(name: str, value: Any, owner: str = 'Config'):
    """Raises ConfigError unless `value` is True or False; `owner` as in `check_number`."""
    if not isinstance(value, bool):
        raise ConfigError(f'{owner}.{name} = {value!r} must be True or False; {_fix_hint(owner, name)}')


def _fix_hint(owner: str, name: str) -> str:
    return f'fix the gin file or --gin_bindings="{owner}.{name} = ...".'


# The fields a TrainState reads (train_utils.create_train_state checks them, for Configs built without
# validate_config: the bench scripts, tests).
TRAIN_STATE_FIELDS = ('nan_policy', 'nan_max_skips_in_a_row', 'grad_accum_steps', 'data_loss_type', 'lr_init',
                      'lr_final', 'lr_delay_steps', 'lr_delay_mult', 'adam_beta1', 'adam_beta2', 'adam_eps',
                      'max_steps', 'grad_max_norm', 'grad_max_val', 'seed')


def _check_field(config: 'Config', name: str, default: Any):
    value = getattr(config, name)
    if name in _RANGES and not (value is None and default is None):
        check_number(name, value, *_RANGES[name])
    if name in _CHOICES:
        check_choice(name, value, _CHOICES[name], none_ok=default is None)
    if name in _STRINGS and not (isinstance(value, str) or (value is None and default is None)):
        raise ConfigError(f'Config.{name} = {value!r} must be a string (a quoted name or path).')
    if default is True or default is False:
        check_bool(name, value)
    if name == 'grad_accum_steps' and value != 'auto' and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"Config.grad_accum_steps = {value!r} must be an integer >= 1 or 'auto'; fix the gin file "
                          "or --gin_bindings=\"Config.grad_accum_steps = 'auto'\".")


def validate_fields(config: Any, names: Sequence[str]):
    """Checks the fields `names` of `config` as `validate_config` does (type, range or choice), raising the same
    ConfigError; for callers that need a few fields right without requiring the whole Config to be."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for name in names:
        _check_field(config, name, defaults[name])


def validate_config(config: 'Config') -> 'Config':
    """Checks the type and range of every Config field that has one; raises ConfigError naming the field, its
    value and the allowed range. Returns `config`."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    validate_fields(config, [f.name for f in dataclasses.fields(Config)])
    if config.far <= config.near:
        raise ConfigError(f'Config.far = {config.far!r} must be greater than Config.near = {config.near!r}.')
    if config.render_job_id >= config.render_num_jobs:
        raise ConfigError(f'Config.render_job_id = {config.render_job_id} must be in [0, Config.render_num_jobs = '
                          f'{config.render_num_jobs}).')
    if config.enable_robustnerf_loss and config.robustnerf_inner_patch_size > config.patch_size:
        raise ConfigError(f'Config.robustnerf_inner_patch_size = {config.robustnerf_inner_patch_size} must not '
                          f'exceed Config.patch_size = {config.patch_size}.')
    res = config.render_resolution
    if res is not None and not (isinstance(res, (tuple, list)) and len(res) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in res)):
        raise ConfigError(f'Config.render_resolution = {res!r} must be None or (width, height), two integers >= 1.')
    if not isinstance(config.weight_decay_mults, dict):
        raise ConfigError(f'Config.weight_decay_mults = {config.weight_decay_mults!r} must be a dict of '
                          'parameter-name prefix -> multiplier.')
    for name, why in _UNUSED.items():
        if getattr(config, name) != defaults[name]:
            raise ConfigError(f'Config.{name} = {getattr(config, name)!r} has no effect in this port: {why}; '
                              f'remove the binding.')
    return config


def parse_gin(gin_configs: Optional[Sequence[str]], gin_bindings: Optional[Sequence[str]]):
    """Parses gin files and bindings, turning gin's errors into one-line messages that name the problem."""
    # Importing registers the configurables that gin files name (Model, PropMLP, NerfMLP, coord.contract).
    from mipnerf360 import models  # noqa: F401  pylint: disable=unused-import
    # `include 'configs/360.gin'` and `--gin_configs=configs/360.gin` also resolve from the repository root.
    if _REPO_ROOT not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
        gin.add_config_file_search_path(_REPO_ROOT)
    _guard_gin_resource_lookup()
    resolved = []
    for path in gin_configs or []:
        if not os.path.isfile(path) and os.path.isfile(os.path.join(_REPO_ROOT, path)):
            path = os.path.join(_REPO_ROOT, path)
        if not os.path.isfile(path):
            raise ConfigError(f'Gin config file not found: {path} (see configs/ for the available ones).')
        resolved.append(path)
    gin_configs = resolved
    try:
        gin.parse_config_files_and_bindings(gin_configs, list(gin_bindings or []), skip_unknown=False)
    except (ValueError, KeyError, NameError, SyntaxError, TypeError, tokenize.TokenError) as e:
        msg = ' '.join(str(e).split())
        unparseable = _unparseable_binding(gin_bindings or [])
        if unparseable is not None:
            raise ConfigError(
                f'Bad gin binding {unparseable!r}: its value is not a Python literal or @reference. Quote strings: '
                "--gin_bindings=\"Config.data_dir = '/path/to/scene'\" (single quotes inside, double quotes "
                'around the whole binding for the shell).') from None
        raise ConfigError(f'Bad gin config or binding: {msg}{_configurable_suggestion(msg)}') from None


def _guard_gin_resource_lookup() -> None:
    """gin looks for an include it cannot open in the working directory as a resource of a Python package next:
    `configs/360.gin` as package `configs`. With the repository root on sys.path (`python /path/to/train.py` run
    from elsewhere) the folder configs/ is such a package, without a file, and gin's check crashes (TypeError)
    before it tries the repository root. Make that check answer 'not there' instead."""
    readers = gin.config._FILE_READERS  # pylint: disable=protected-access
    for i, (reader, exists) in enumerate(readers):
        if getattr(exists, '_mipnerf360_guarded', False):
            continue

        def guarded(path, exists=exists):
            try:
                return exists(path)
            except TypeError:
                return False
        guarded._mipnerf360_guarded = True  # pylint: disable=protected-access
        readers[i] = (reader, guarded)


def _unparseable_binding(bindings: Sequence[str]) -> Optional[str]:
    """The first binding gin's parser cannot read on its own (a syntax error, e.g. an unquoted path), or None."""
    from gin import config_parser  # pylint: disable=import-outside-toplevel
    for binding in bindings:
        try:
            for _ in config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True)):
                pass
        except (SyntaxError, tokenize.TokenError):
            return binding
    return None


def _configurable_suggestion(msg: str) -> str:
    """'; did you mean NerfMLP?' for gin's "No configurable matching 'NerfMPL'", else ''."""
    match = re.search(r"No configurable matching '([^']+)'", msg)
    if match is None:
        return ''
    names = {n.rsplit('.', 1)[-1] for n, _ in gin.config._REGISTRY.items()}  # pylint: disable=protected-access
    close = difflib.get_close_matches(match.group(1), sorted(names), n=1)
    return f'; did you mean {close[0]}?' if close else ''


def load_config(save_config: bool = True, gin_configs=None, gin_bindings=None) -> Config:
    """Builds the Config from gin files and bindings (absl flags by default); saves config.gin next to the
    checkpoints when `save_config`."""
    if gin_configs is None and gin_bindings is None:
        from absl import flags
        gin_configs, gin_bindings = flags.FLAGS.gin_configs, flags.FLAGS.gin_bindings
    parse_gin(gin_configs, gin_bindings)
    config = _fps_from_camera_path(validate_config(Config()))
    if save_config and config.checkpoint_dir is not None:
        save_config_str(config.checkpoint_dir)
    return config


def _fps_from_camera_path(config: Config) -> Config:
    """`render_video_fps` from a camera_path.json `render_path_file` when the gin config does not bind it."""
    path = config.render_path_file
    if not (config.render_path and path and path.lower().endswith('.json') and os.path.isfile(path)):
        return config
    try:
        gin.query_parameter('Config.render_video_fps')
        return config  # Bound by a gin file or binding: it wins.
    except ValueError:
        pass
    from mipnerf360 import camera_path  # pylint: disable=import-outside-toplevel
    fps = camera_path.fps_of(path)
    if fps is None:
        return config
    return dataclasses.replace(config, render_video_fps=int(fps) if fps == int(fps) else fps)


def save_config_str(checkpoint_dir: str):
    """Writes the operative gin config to `checkpoint_dir/config.gin` (atomically)."""
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise ConfigError(f'Config.checkpoint_dir = {checkpoint_dir!r} is an existing file, not a directory; '
                                            'choose another path.')
    path = os.path.join(checkpoint_dir, 'config.gin')
    tmp = path + f'.tmp{os.getpid()}'
    try:
        os.makedirs(checkpoint_dir, exist_ok=True)
        with open(tmp, 'w') as f:
            f.write(gin.config_str())
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f'Cannot write {path} ({e.strerror}); set Config.checkpoint_dir to a writable '
                          'folder.') from None
