"""The mip-NeRF 360 model: its MLPs, the proposal sampling loop, and whole-image rendering.

Mirrors multinerf's `internal/models.py`:
  `MLP`            positional-encoding MLP (density trunk, optional view-dependent colour branch, Ref-NeRF
                   options); `PropMLP` / `NerfMLP` are its gin-configurable subclasses.
  `Model`          the sampling loop of mip-NeRF 360 (Sec. 3 of arXiv:2111.12077): proposal levels driven by one
                   shared `PropMLP`, a final level rendered with the `NerfMLP`.
  `construct_model`, `render_image` (`auto_render_chunk_size` when `Config.render_chunk_size` is None);
  `compile_model` (`Config.compile`) and `apply_precision` / `Model.set_precision` (`Config.precision`).

Randomness: `Model.forward(rng, ...)` draws every random number of a pass up front (`Model.draw_noise`, in a
fixed order) and hands them to `Model.render_rays`, which holds no generator and no host sync: that is what
`compile_model` compiles (one graph), and outputs stay a pure function of the generator's state.

Shapes: rays carry leading batch dimensions `...`; each level draws `n` intervals per ray, so per-sample values
are `[..., n]` and interval endpoints `sdist`/`tdist` are `[..., n + 1]`.

Parameter naming (used by weight decay, gradient clipping and logging in `train_utils`). The top-level
children of `Model` are `nerf_mlp` (a `NerfMLP`), `prop_mlp` (a `PropMLP`, absent with `single_mlp`),
`glo_vecs` (an `nn.Embedding`, present when `num_glo_features > 0`) and `exposure_scaling_offsets` (present
with `learned_exposure_scaling`). Every dense layer of an MLP also has the name the reference's flax module
gives it (`Dense_0`, `Dense_1`, ... in creation order); `reference_param_names(model)` maps each torch parameter
name to the reference's path, e.g. `nerf_mlp.trunk.0.weight` -> `NerfMLP_0/Dense_0/kernel`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math as pymath
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import gin
import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mipnerf360 import configs, coord, geopoly, image, math, ref_utils, render, stepfun, utils

Renderings = List[Dict[str, Any]]
RayHistory = List[Dict[str, Optional[torch.Tensor]]]
# Per level, the random numbers of one forward pass (see `Model.draw_noise`).
LevelNoise = List[Dict[str, torch.Tensor]]


def _register_gin_externals() -> None:
    """Lets gin files name `@math.safe_exp` and `@coord.contract`, as the reference's do."""
    for fn, module in ((getattr(math, 'safe_exp', None), 'math'), (coord.contract, 'coord')):
        if fn is None:
            continue
        try:
            gin.external_configurable(fn, module=module)
        except ValueError:  # Registered already.
            pass


_register_gin_externals()


# Per-sample MLP outputs composited with the weights (like the normals) into extra rendered maps.
_COMPOSITED_PARTS = ('roughness', 'diffuse', 'specular', 'tint')

# ---------------------------------------------------------------------------------------------------------------
# Weight initialisers named as in `jax.nn.initializers`.

_VARIANCE_SCALING = {
    # name: (scale, mode, distribution)
    'he_uniform': (2.0, 'fan_in', 'uniform'),
    'he_normal': (2.0, 'fan_in', 'truncated_normal'),
    'kaiming_uniform': (2.0, 'fan_in', 'uniform'),
    'kaiming_normal': (2.0, 'fan_in', 'truncated_normal'),
    'glorot_uniform': (1.0, 'fan_avg', 'uniform'),
    'glorot_normal': (1.0, 'fan_avg', 'truncated_normal'),
    'xavier_uniform': (1.0, 'fan_avg', 'uniform'),
    'xavier_normal': (1.0, 'fan_avg', 'truncated_normal'),
    'lecun_uniform': (1.0, 'fan_in', 'uniform'),
    'lecun_normal': (1.0, 'fan_in', 'truncated_normal'),
}


def variance_scaling_(weight: torch.Tensor, init_name: str) -> torch.Tensor:
    """Initialises a `[out, in]` weight in place like `jax.nn.initializers.<init_name>()` does its `[in, out]`
    kernel: variance = scale / fan, drawn uniform, or truncated normal at +-2 std (std corrected as jax does)."""
    if init_name not in _VARIANCE_SCALING:
        raise ValueError(f'Unknown weight_init {init_name!r}; expected one of {sorted(_VARIANCE_SCALING)}.')
    scale, mode, distribution = _VARIANCE_SCALING[init_name]
    fan_out, fan_in = weight.shape
    fan = {'fan_in': fan_in, 'fan_out': fan_out, 'fan_avg': 0.5 * (fan_in + fan_out)}[mode]
    variance = scale / max(1.0, fan)
    with torch.no_grad():
        if distribution == 'uniform':
            bound = pymath.sqrt(3.0 * variance)
            return weight.uniform_(-bound, bound)
        # The std of a unit normal truncated to [-2, 2] is 0.87962566103423978; jax divides it out.
        std = pymath.sqrt(variance) / 0.87962566103423978
        return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class Dense(nn.Linear):
    """`nn.Linear` initialised like flax's `nn.Dense(kernel_init=<weight_init>)`: zero bias."""

    def __init__(self, in_features: int, out_features: int, weight_init: str = 'he_uniform'):
        self.weight_init = weight_init
        super().__init__(in_features, out_features)

    def reset_parameters(self) -> None:
        variance_scaling_(self.weight, self.weight_init)
        nn.init.zeros_(self.bias)


def _pos_enc_dim(deg: int, dims: int = 3) -> int:
    """Width of `coord.pos_enc(x[..., dims], 0, deg, append_identity=True)`."""
    return dims + 2 * dims * deg


def _ide_dim(deg_view: int) -> int:
    """Width of Ref-NeRF's integrated directional encoding: real and imaginary parts of the (l, m) pairs with
    l = 1, 2, 4, ..., 2^(deg_view - 1) and m = 0..l."""
    return 2 * sum(2**i + 1 for i in range(deg_view))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def _activate(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x), in place for the default ReLU. x must be a fresh 2D layer output that nothing else holds and that
    is not a view (autograd allows this: a linear layer does not keep its output, and ReLU's backward needs only
    its result; in-place ops on views would make autograd copy)."""
    return F.relu_(x) if fn is _relu else fn(x)


def _split_linear(layer: nn.Linear, parts: List[torch.Tensor]) -> torch.Tensor:
    """layer(torch.cat(parts, -1)) without forming the concatenation.

    Each part [..., c_i] meets its own column block of the weight; the parts' leading dimensions broadcast
    against each other, so a per-ray part [..., 1, c] is multiplied once per ray rather than once per sample.
    The result equals the concatenated product up to float rounding (the sum is split into partial sums), and
    no gradient is computed for parts that do not require one (e.g. the positional encoding).

    Args:
        layer: a linear layer with in_features == sum(c_i).
        parts: tensors [..., c_i].

    Returns:
        [..., out_features], the broadcast of the parts' leading dimensions.
    """
    widths = [p.shape[-1] for p in parts]
    if sum(widths) != layer.in_features:
        raise ValueError(f'Parts of widths {widths} do not add up to the layer input width {layer.in_features}.')
    # Contiguous copies of the (small) column blocks: the backward of a product with a strided weight block would
    # form its gradient in a slower orientation.
    weights = [w.contiguous() for w in torch.split(layer.weight, widths, dim=1)]
    # The part with the most rows (the widest among those) first, with the bias; the others accumulate into that
    # fresh buffer. (linear's backward forms the weight gradient in the faster orientation, so the wide part
    # goes there.)
    order = sorted(range(len(parts)), key=lambda i: (-parts[i][..., 0].numel(), -widths[i]))
    out = F.linear(parts[order[0]], weights[order[0]], layer.bias)
    for i in order[1:]:
        x, weight = parts[i], weights[i]
        if x.shape[:-1] == out.shape[:-1]:
            # One matrix product that adds onto `out` (addmm's C), rather than a product and a sum.
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
            out = flat.reshape(out.shape)
        else:
            out = out + F.linear(x, weight)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Construction-time checks of the gin-bindable fields, so that a bad binding is one ConfigError naming it before
# any work, not a ValueError deep in the first forward pass.

_at_least = configs.int_at_least
_FINITE, _NON_NEGATIVE = configs.FINITE, configs.NON_NEGATIVE
_MLP_RANGES = {
        'net_depth': _at_least(0), 'net_width': _at_least(1), 'bottleneck_width': _at_least(0),
        'net_depth_viewdirs': _at_least(0), 'net_width_viewdirs': _at_least(1), 'min_deg_point': _at_least(0),
        'max_deg_point': _at_least(0), 'skip_layer': _at_least(1), 'skip_layer_dir': _at_least(1),
        'deg_view': _at_least(0), 'roughness_bias': _FINITE,
        'bottleneck_noise': _NON_NEGATIVE, 'density_bias': _FINITE, 'density_noise': _NON_NEGATIVE,
        'rgb_premultiplier': _FINITE, 'rgb_bias': _FINITE, 'rgb_padding': _NON_NEGATIVE,
        'basis_subdivisions': _at_least(1), 'num_glo_features': _at_least(0),
}
_MLP_CHOICES = {'weight_init': tuple(_VARIANCE_SCALING), 'basis_shape': ('icosahedron', 'octahedron')}
_MLP_FUNCTIONS = ('net_activation', 'roughness_activation', 'density_activation', 'rgb_activation')
_MODEL_RANGES = {
        'num_prop_samples': _at_least(2), 'num_nerf_samples': _at_least(2), 'num_levels': _at_least(1),
        'anneal_slope': _FINITE, 'dilation_multiplier': _NON_NEGATIVE, 'dilation_bias': _NON_NEGATIVE,
        'num_glo_features': _at_least(0), 'num_glo_embeddings': _at_least(1),
        'near_anneal_init': configs.FRACTION, 'resample_padding': _NON_NEGATIVE,
}
_MODEL_CHOICES = {'ray_shape': ('cone', 'cylinder')}


def _maps_tensors(fn: Any) -> bool:
    """Whether `fn` maps a [2, 3] tensor to a tensor of that shape (activations and warps are elementwise or
    act on the last, xyz, dimension)."""
    if not callable(fn):
        return False
    probe = torch.full((2, 3), 0.5, dtype=torch.float64)
    try:
        out = fn(probe)
    except Exception:  # pylint: disable=broad-except  # Any failure of the user's function means it is unfit.
        return False
    return isinstance(out, torch.Tensor) and out.shape == probe.shape


def _check_fields(obj: Any, owner: str, ranges: Mapping[str, tuple], choices: Mapping[str, Tuple[str, ...]]):
    """Checks the dataclass fields of `obj`: numbers against `ranges`, strings against `choices`, and every
    field declared `bool` for being True or False; raises ConfigError naming `owner.field`."""
    for name, rng in ranges.items():
        configs.check_number(name, getattr(obj, name), *rng, owner=owner)
    for name, allowed in choices.items():
        configs.check_choice(name, getattr(obj, name), allowed, owner=owner)
    for f in dataclasses.fields(obj):
        if f.type in (bool, 'bool'):
            configs.check_bool(f.name, getattr(obj, f.name), owner=owner)


@dataclasses.dataclass(eq=False, repr=False)
class MLP(nn.Module):
    """A (integrated) positional-encoding MLP, as the reference's `MLP`.

    The density trunk maps the IPE of Gaussians (after `warp_fn` and the projection onto the geodesic basis)
    through `net_depth` ReLU layers of `net_width` (re-concatenating the encoding after every `skip_layer`-th
    layer) to one raw density. Unless `disable_rgb`, a view-dependent branch maps [bottleneck, encoded view (or
    reflection) direction, n.v, GLO vector] through `net_depth_viewdirs` layers to RGB.

    The hyperparameters are dataclass fields (as the reference's flax module's), so `MLP(net_depth=4)`, gin's
    `NerfMLP.net_depth = 4` and `dataclasses.replace` all work; the layers are built in `__post_init__`. Torch
    needs layer widths up front, so two things flax infers at call time are fields here: `use_viewdirs` (whether
    view directions will be passed) and `num_glo_features` (the GLO vector width passed to the NeRF MLP).
    `Model` sets both.
    """
    net_depth: int = 8  # The depth of the density trunk.
    net_width: int = 256  # The width of the density trunk.
    bottleneck_width: int = 256  # The width of the bottleneck vector (0: none).
    net_depth_viewdirs: int = 1  # The depth of the view-dependent branch.
    net_width_viewdirs: int = 128  # The width of the view-dependent branch.
    net_activation: Callable[[torch.Tensor], torch.Tensor] = _relu  # The activation of both parts.
    min_deg_point: int = 0  # Min degree of the positional encoding of 3D points.
    max_deg_point: int = 12  # Max degree of the positional encoding of 3D points.
    weight_init: str = 'he_uniform'  # Initializer of the dense kernels (a `jax.nn.initializers` name).
    skip_layer: int = 4  # The encoding is re-concatenated after every skip_layer-th trunk layer.
    skip_layer_dir: int = 4  # Likewise for the view-dependent branch.
    num_rgb_channels: int = 3  # The number of colour channels.
    deg_view: int = 4  # Degree of the encoding of view directions (or of the IDE).
    use_reflections: bool = False  # Encode reflected view directions instead of view directions (Ref-NeRF).
    use_directional_enc: bool = False  # Use Ref-NeRF's integrated directional encoding (IDE).
    enable_pred_roughness: bool = False  # Predict a roughness (needed by the IDE).
    roughness_activation: Callable[[torch.Tensor], torch.Tensor] = _softplus  # Roughness activation.
    roughness_bias: float = -1.  # Shift added to the raw roughness before its activation.
    use_diffuse_color: bool = False  # Predict a diffuse colour added to the view-dependent one.
    use_specular_tint: bool = False  # Predict a tint that multiplies the view-dependent colour.
    use_n_dot_v: bool = False  # Feed the dot product of normal and view direction to the view branch.
    bottleneck_noise: float = 0.0  # Std of the noise added to the bottleneck when training.
    density_activation: Callable[[torch.Tensor], torch.Tensor] = _softplus  # Density activation.
    density_bias: float = -1.  # Shift added to the raw density before its activation.
    density_noise: float = 0.  # Std of the noise added to the raw density when training.
    rgb_premultiplier: float = 1.  # Premultiplier of the raw colour before its activation.
    rgb_activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid  # Colour activation.
    rgb_bias: float = 0.  # Shift added to the raw colour before its activation.
    rgb_padding: float = 0.001  # The colour is mapped to [-rgb_padding, 1 + rgb_padding].
    enable_pred_normals: bool = False  # Predict normals with a dense layer.
    disable_density_normals: bool = False  # Do not compute normals from the density gradient.
    disable_rgb: bool = False  # Predict no colour (proposal MLPs).
    warp_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # Warp of the Gaussians (e.g. contract).
    basis_shape: str = 'icosahedron'  # `octahedron` or `icosahedron`: the encoding basis polyhedron.
    basis_subdivisions: int = 2  # Tesselation frequency of the basis polyhedron.
    use_viewdirs: bool = True  # Whether view directions will be passed (builds the view branch).
    num_glo_features: int = 0  # Width of the GLO vectors that will be passed.

    def __post_init__(self):
        super().__init__()
        self._check_bindings()
        self.precision: Optional[str] = None  # Set by `Model.set_precision`; 'bf16' autocasts the products.
        # Set by `Model` from `Config.checkpoint_nerf_mlp`: recompute the encoding and trunk in the backward pass
        # instead of keeping their activations.
        self.checkpoint_trunk = False

        # The basis (transposed to [3, n]) is a buffer so that it follows .to(device); it is kept in float64 (cast
        # to the inputs' dtype when used) so that a float64 model sees the exact basis.
        basis = geopoly.generate_basis(self.basis_shape, self.basis_subdivisions)
        basis = torch.as_tensor(np.ascontiguousarray(basis), dtype=torch.float64)
        self.register_buffer('pos_basis_t', basis.T.contiguous(), persistent=False)
        num_dirs = self.pos_basis_t.shape[-1]
        self.input_dim = 2 * num_dirs * (self.max_deg_point - self.min_deg_point)

        if self.use_directional_enc:
            self.dir_enc_fn = ref_utils.generate_ide_fn(self.deg_view)
            dir_enc_dim = _ide_dim(self.deg_view)
        else:
            self.dir_enc_fn = self._pos_enc_dirs
            dir_enc_dim = _pos_enc_dim(self.deg_view)

        # Layers are created in the order in which the reference's flax module creates its `Dense_k`s.
        self._reference_order: List[str] = []
        self._build_trunk()
        self._build_color_layers(dir_enc_dim)

    def _check_bindings(self) -> None:
        owner = type(self).__name__
        _check_fields(self, owner, _MLP_RANGES, _MLP_CHOICES)
        for name in _MLP_FUNCTIONS + ('warp_fn',):
            fn = getattr(self, name)
            if name == 'warp_fn' and fn is None:
                continue
            if not _maps_tensors(fn):
                alternative = ' or None' if name == 'warp_fn' else ''
                raise configs.ConfigError(f'{owner}.{name} = {fn!r} must be a function from tensors to tensors of '
                                          f'the same shape (e.g. @math.safe_exp){alternative}.')
        if self.min_deg_point >= self.max_deg_point:
            raise configs.ConfigError(f'{owner}.min_deg_point = {self.min_deg_point} must be less than '
                                      f'{owner}.max_deg_point = {self.max_deg_point} (the encoding would be empty).')
        if self.num_rgb_channels != 3:
            raise configs.ConfigError(f'{owner}.num_rgb_channels = {self.num_rgb_channels} must be 3: the images, '
                                      'backgrounds and losses are RGB.')
        has_normals = self.enable_pred_normals or not self.disable_density_normals
        for name in ('use_reflections', 'use_n_dot_v'):
            if getattr(self, name) and not has_normals:
                raise configs.ConfigError(f'{owner}.{name} needs normals: set {owner}.enable_pred_normals=True '
                                          f'or {owner}.disable_density_normals=False.')
        if self.use_directional_enc and not self.enable_pred_roughness:
            raise configs.ConfigError(f'{owner}.use_directional_enc (the IDE) needs a roughness: set '
                                      f'{owner}.enable_pred_roughness=True.')
        if self.use_directional_enc and self.deg_view > ref_utils.MAX_IDE_DEG_VIEW:
            raise configs.ConfigError(f'{owner}.deg_view = {self.deg_view} must be at most '
                                      f'{ref_utils.MAX_IDE_DEG_VIEW} with use_directional_enc (the IDE loses '
                                      'precision beyond that).')

    def _dense_layer(self, name: str, in_features: int, out_features: int) -> Dense:
        self._reference_order.append(name)
        return Dense(in_features, out_features, self.weight_init)

    def _build_trunk(self) -> None:
        """The density trunk, its density head and (with `enable_pred_normals`) its normals head."""
        self.trunk = nn.ModuleList()
        width = self.input_dim
        for i in range(self.net_depth):
            self.trunk.append(self._dense_layer(f'trunk.{i}', width, self.net_width))
            width = self.net_width + (self.input_dim if (i % self.skip_layer == 0 and i > 0) else 0)
        self.feature_dim = width
        self.density_layer = self._dense_layer('density_layer', width, 1)
        self.normals_layer = self._dense_layer('normals_layer', width, 3) if self.enable_pred_normals else None

    def _build_color_layers(self, dir_enc_dim: int) -> None:
        """The colour heads on the trunk features and the view-dependent branch (unless `disable_rgb`)."""
        width = self.feature_dim
        self.diffuse_layer = self.tint_layer = self.roughness_layer = self.bottleneck_layer = None
        self.viewdir_layers = nn.ModuleList()
        self.rgb_layer = None
        if self.disable_rgb:
            return
        if self.use_viewdirs:
            if self.use_diffuse_color:
                self.diffuse_layer = self._dense_layer('diffuse_layer', width, self.num_rgb_channels)
            if self.use_specular_tint:
                self.tint_layer = self._dense_layer('tint_layer', width, 3)
            if self.enable_pred_roughness:
                self.roughness_layer = self._dense_layer('roughness_layer', width, 1)
            if self.bottleneck_width > 0:
                self.bottleneck_layer = self._dense_layer('bottleneck_layer', width, self.bottleneck_width)
            view_in = (max(self.bottleneck_width, 0) + dir_enc_dim + (1 if self.use_n_dot_v else 0) +
                       self.num_glo_features)
            width = view_in
            for i in range(self.net_depth_viewdirs):
                self.viewdir_layers.append(self._dense_layer(f'viewdir_layers.{i}', width, self.net_width_viewdirs))
                width = self.net_width_viewdirs + (view_in if (i % self.skip_layer_dir == 0 and i > 0) else 0)
        self.rgb_layer = self._dense_layer('rgb_layer', width, self.num_rgb_channels)

    def _pos_enc_dirs(self, direction: torch.Tensor, _: Optional[torch.Tensor]) -> torch.Tensor:
        return coord.pos_enc(direction, min_deg=0, max_deg=self.deg_view, append_identity=True)

    def reference_layer_names(self) -> Dict[str, str]:
        """Maps this MLP's layer names (e.g. 'trunk.0') to the reference's flax names ('Dense_0')."""
        return {name: f'Dense_{k}' for k, name in enumerate(self._reference_order)}

    def draw_noise(self, rng: torch.Generator, sample_shape: Sequence[int], dtype: torch.dtype,
                   device: torch.device, has_viewdirs: bool) -> Dict[str, torch.Tensor]:
        """The standard normals this MLP adds to its raw density / bottleneck (where `density_noise` /
        `bottleneck_noise` > 0), drawn from `rng` in that order: {'density': [*sample_shape],
        'bottleneck': [*sample_shape, bottleneck_width]}. Passed to `forward(noise=...)` they make it a pure
        function of its tensor inputs (no generator, so nothing to break a compiled graph)."""
        noise = {}
        if self.density_noise > 0:
            noise['density'] = torch.randn(tuple(sample_shape), generator=rng, device=device, dtype=dtype)
        if has_viewdirs and self.bottleneck_layer is not None and self.bottleneck_noise > 0:
            noise['bottleneck'] = torch.randn(tuple(sample_shape) + (self.bottleneck_width,), generator=rng,
                                              device=device, dtype=dtype)
        return noise

    def _matmul_precision(self, x: torch.Tensor) -> ContextManager[Any]:
        """The context of the MLP's matrix products: bf16 autocast when `precision == 'bf16'`; autocast off for
        'fp32' / 'tf32' (float32; TF32 on CUDA is the process-level setting `apply_precision` makes); and for
        None whatever autocast the caller has set. Encodings, normals and activations stay outside it."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == 'bf16')

    def _dense(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A head: layer(x) at the MLP's matmul precision, returned in `dtype`."""
        with self._matmul_precision(x):
            y = layer(x)
        return y.to(dtype)

    def _encode_points(self, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
        """Warp, project onto the basis and integrated-positional-encode the Gaussians: [..., input_dim]."""
        mean_bound = None
        if self.warp_fn is not None:
            means, covs = coord.track_linearize(self.warp_fn, means, covs)
            if coord._is_contract(self.warp_fn):  # pylint: disable=protected-access
                # Contracted points lie in the ball of radius 2 and the basis directions are unit vectors.
                mean_bound = 2.0
        basis = self.pos_basis_t.to(means.dtype)
        lifted_means, lifted_vars = coord.lift_and_diagonalize(means, covs, basis)
        return coord.integrated_pos_enc(lifted_means, lifted_vars, self.min_deg_point, self.max_deg_point,
                                        mean_bound=mean_bound)

    def _trunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The density trunk on rows [num_samples, input_dim]: (raw density [num_samples], features)."""
        # 2D layer outputs are fresh tensors (not views), so the default ReLU can run in place on them.
        inputs = x
        skip_pending = False  # Whether the next layer reads [x, inputs] (the skip connection).
        with self._matmul_precision(x):
            for i, layer in enumerate(self.trunk):
                y = _split_linear(layer, [x, inputs]) if skip_pending else layer(x)
                x = _activate(self.net_activation, y)
                skip_pending = i % self.skip_layer == 0 and i > 0
                if skip_pending and i == len(self.trunk) - 1:
                    x = torch.cat([x, inputs], dim=-1)  # The features themselves include the encoding.
            raw_density = self.density_layer(x)[..., 0]
        return raw_density, x

    def _encoded_trunk(self, means: torch.Tensor, covs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoding and trunk: (raw density [...] in the means' dtype, features [..., feature_dim])."""
        x = self._encode_points(means, covs)
        sample_shape = x.shape[:-1]
        raw_density, x = self._trunk(x.reshape(-1, x.shape[-1]))
        return raw_density.to(means.dtype).reshape(sample_shape), x.reshape(sample_shape + x.shape[-1:])

    def predict_density(self, means: torch.Tensor, covs: torch.Tensor,
                        noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Raw density and trunk features.

        Args:
            means: [..., 3] Gaussian means; covs: [..., 3, 3] full covariances.
            noise: [...] standard normals scaled by `density_noise` and added to the raw density, or None.

        Returns:
            raw_density: [...] (in the means' dtype); features: [..., feature_dim] (bf16 under bf16 precision).
        """
        if self.checkpoint_trunk and torch.is_grad_enabled():
            # The region holds no random numbers (the noise is added below), so the recompute is exact.
            raw_density, x = torch.utils.checkpoint.checkpoint(self._encoded_trunk, means, covs,
                                                               use_reentrant=False)
        else:
            raw_density, x = self._encoded_trunk(means, covs)
        if noise is not None and self.density_noise > 0:
            raw_density = raw_density + self.density_noise * noise
        return raw_density, x

    def _density_with_gradient(self, means: torch.Tensor, covs: torch.Tensor, noise: Optional[torch.Tensor]
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`predict_density` and the gradient of the raw density with respect to the means [..., 3]."""
        # Each sample's raw density depends on its own mean only, so the gradient of the sum gives every
        # per-sample gradient at once. Under no_grad (rendering) the graph is built locally and dropped.
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            means_in = means if means.requires_grad else means.detach().requires_grad_(True)
            raw_density, x = self.predict_density(means_in, covs, noise)
            raw_grad_density = torch.autograd.grad(raw_density.sum(), means_in, create_graph=outer_grad)[0]
        if not outer_grad:
            raw_density, x = raw_density.detach(), x.detach()
        return raw_density, x, raw_grad_density

    def forward(
        self,
        rng: Optional[torch.Generator],
        gaussians: Tuple[torch.Tensor, torch.Tensor],
        viewdirs: Optional[torch.Tensor] = None,
        imageplane: Optional[torch.Tensor] = None,
        glo_vec: Optional[torch.Tensor] = None,
        exposure: Optional[torch.Tensor] = None,
        noise: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Dict[str, Optional[torch.Tensor]]:
        """Evaluates the MLP on Gaussians.

        Args:
            rng: generator for the density / bottleneck noise, None for deterministic output (or `noise`).
            gaussians: (means [..., n, 3], covs [..., n, 3, 3]).
            viewdirs: [..., 3] unit view directions, or None (then the colour comes from the trunk features).
            imageplane: [..., 2] image-plane coordinates (unused, as in the reference).
            glo_vec: [..., num_glo_features] appearance codes, or None.
            exposure: [..., 1] exposure values (unused, as in the reference).
            noise: the noise `draw_noise` draws, passed instead of `rng`.

        Returns:
            A dict with density [..., n], rgb [..., n, num_rgb_channels] (zeros [..., n, 3] if `disable_rgb`),
            raw_grad_density / normals [..., n, 3], grad_pred / normals_pred [..., n, 3], roughness [..., n, 1],
            and with `use_diffuse_color` the linear colour's parts diffuse and specular [..., n, 3] (rgb is
            clip(linear_to_srgb(specular + diffuse), 0, 1), padded) and with `use_specular_tint` tint [..., n, 3]
            (specular = tint * view-dependent colour; 0.5 * it without a tint); each None when not computed,
            all in the means' dtype whatever the precision.
        """
        del imageplane, exposure
        if rng is not None:
            if noise is not None:
                raise ValueError('MLP.forward: pass either rng or pre-drawn noise, not both.')
            means = gaussians[0]
            noise = self.draw_noise(rng, means.shape[:-1], means.dtype, means.device, viewdirs is not None)
        return self.evaluate(gaussians, viewdirs, glo_vec, noise or {})

    def evaluate(self, gaussians: Tuple[torch.Tensor, torch.Tensor], viewdirs: Optional[torch.Tensor],
                 glo_vec: Optional[torch.Tensor], noise: Mapping[str, torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
        """`forward` with its noise given (from `draw_noise`; {} for none): no generator, so it compiles whole."""
        means, covs = gaussians
        raw_grad_density = normals = grad_pred = normals_pred = None
        if self.disable_density_normals:
            raw_density, x = self.predict_density(means, covs, noise.get('density'))
        else:
            raw_density, x, raw_grad_density = self._density_with_gradient(means, covs, noise.get('density'))
            normals = -ref_utils.l2_normalize(raw_grad_density)
        if self.normals_layer is not None:
            grad_pred = self._dense(self.normals_layer, x, means.dtype)
            normals_pred = -ref_utils.l2_normalize(grad_pred)
        density = self.density_activation(raw_density + self.density_bias)

        roughness, parts = None, {}
        if self.disable_rgb:
            rgb = torch.zeros_like(means)
        else:
            normals_to_use = normals_pred if self.normals_layer is not None else normals
            rgb, roughness, parts = self._predict_rgb(x, viewdirs, glo_vec, normals_to_use,
                                                      noise.get('bottleneck'), means.dtype)
        return dict(
            density=density,
            rgb=rgb,
            raw_grad_density=raw_grad_density,
            grad_pred=grad_pred,
            normals=normals,
            normals_pred=normals_pred,
            roughness=roughness,
            diffuse=parts.get('diffuse'),
            specular=parts.get('specular'),
            tint=parts.get('tint'),
        )

    def _predict_rgb(self, x: torch.Tensor, viewdirs: Optional[torch.Tensor], glo_vec: Optional[torch.Tensor],
                     normals: Optional[torch.Tensor], bottleneck_noise: Optional[torch.Tensor],
                     dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """The colour [..., n, num_rgb_channels], roughness [..., n, 1] (or None) and the Ref-NeRF colour parts
        ({'diffuse', 'specular', 'tint'}, those the model has) from the trunk features."""
        raw_rgb_diffuse = tint = roughness = None
        if viewdirs is not None:
            if not self.use_viewdirs:
                raise ValueError('This MLP was built with use_viewdirs=False but was given viewdirs.')
            if self.diffuse_layer is not None:
                raw_rgb_diffuse = self._dense(self.diffuse_layer, x, dtype)
            if self.tint_layer is not None:
                tint = torch.sigmoid(self._dense(self.tint_layer, x, dtype))
            if self.roughness_layer is not None:
                roughness = self.roughness_activation(self._dense(self.roughness_layer, x, dtype) +
                                                      self.roughness_bias)
            x = self._view_branch(x, viewdirs, glo_vec, normals, roughness, bottleneck_noise)

        rgb = self.rgb_activation(self.rgb_premultiplier * self._dense(self.rgb_layer, x, dtype) + self.rgb_bias)
        parts = {}
        if raw_rgb_diffuse is not None:
            # The diffuse colour starts near 0.25 so that diffuse + specular starts near 0.5.
            parts['diffuse'] = torch.sigmoid(raw_rgb_diffuse - pymath.log(3.0))
            parts['specular'] = tint * rgb if tint is not None else 0.5 * rgb
            rgb = torch.clamp(image.linear_to_srgb(parts['specular'] + parts['diffuse']), 0.0, 1.0)
        if tint is not None:
            parts['tint'] = tint
        # Map [0, 1] to [-rgb_padding, 1 + rgb_padding].
        return rgb * (1 + 2 * self.rgb_padding) - self.rgb_padding, roughness, parts

    def _view_inputs(self, x: torch.Tensor, viewdirs: torch.Tensor, glo_vec: Optional[torch.Tensor],
                     normals: Optional[torch.Tensor], roughness: Optional[torch.Tensor],
                     bottleneck_noise: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """The parts of the view branch's input: [bottleneck, encoded view (or reflection) direction, n.v, GLO
        vector], per sample [..., n, c] or (encodings that do not vary along a ray) per ray [..., 1, c]."""
        parts = []
        if self.bottleneck_layer is not None:
            with self._matmul_precision(x):
                bottleneck = self.bottleneck_layer(x)
            if bottleneck_noise is not None:
                bottleneck = bottleneck + self.bottleneck_noise * bottleneck_noise
            parts.append(bottleneck)
        sample_shape = x.shape[:-1]
        if self.use_reflections:
            # Viewdirs point from the camera to the point; reflect() wants them pointing at the camera.
            refdirs = ref_utils.reflect(-viewdirs[..., None, :], normals)
            parts.append(self.dir_enc_fn(refdirs, roughness))
        elif self.use_directional_enc:
            parts.append(self.dir_enc_fn(viewdirs[..., None, :].expand(sample_shape + (3,)), roughness))
        else:
            # One encoding per ray ([..., 1, c]), broadcast over the samples.
            parts.append(self.dir_enc_fn(viewdirs, roughness)[..., None, :])
        if self.use_n_dot_v:
            parts.append(torch.sum(normals * viewdirs[..., None, :], dim=-1, keepdim=True))
        if glo_vec is not None:
            parts.append(glo_vec[..., None, :])
        return parts

    def _view_branch(self, x: torch.Tensor, viewdirs: torch.Tensor, glo_vec: Optional[torch.Tensor],
                     normals: Optional[torch.Tensor], roughness: Optional[torch.Tensor],
                     bottleneck_noise: Optional[torch.Tensor]) -> torch.Tensor:
        """The view-dependent layers on [bottleneck, direction encoding, n.v, GLO]: features [..., n, c]."""
        parts = self._view_inputs(x, viewdirs, glo_vec, normals, roughness, bottleneck_noise)
        sample_shape = x.shape[:-1]
        with self._matmul_precision(x):
            if len(self.viewdir_layers) == 0 or len(self.viewdir_layers) > self.skip_layer_dir:
                x = torch.cat([p.expand(sample_shape + p.shape[-1:]) for p in parts], dim=-1)
                inputs = x
                for i, layer in enumerate(self.viewdir_layers):
                    x = self.net_activation(layer(x))
                    if i % self.skip_layer_dir == 0 and i > 0:
                        x = torch.cat([x, inputs], dim=-1)
            else:
                # No skip connection: the first layer takes the parts one by one (per-ray parts once per ray)
                # instead of their per-sample concatenation.
                x = self.net_activation(_split_linear(self.viewdir_layers[0], parts))
                for layer in self.viewdir_layers[1:]:
                    x = self.net_activation(layer(x))
        return x


@gin.configurable
class NerfMLP(MLP):
    """The MLP of the final (NeRF) level; gin binds `NerfMLP.<arg>`."""


@gin.configurable
class PropMLP(MLP):
    """The MLP shared by all proposal levels; gin binds `PropMLP.<arg>`."""


def _schlick_bias(x: Union[float, torch.Tensor], s: float) -> Union[float, torch.Tensor]:
    """Schlick's bias function (arXiv:2010.09714), used to anneal the resampling weights."""
    return (s * x) / ((s - 1) * x + 1)


@gin.configurable
@dataclasses.dataclass(eq=False, repr=False)
class Model(nn.Module):
    """mip-NeRF 360: proposal levels sharing one `PropMLP`, then a `NerfMLP` level (Sec. 3 of 2111.12077).

    Every field but `config`, `nerf_mlp_params` and `prop_mlp_params` is a field of the reference's `Model`,
    with the same default. The MLPs are built as `NerfMLP(**nerf_mlp_params)` / `PropMLP(**prop_mlp_params)`, so
    gin bindings of `NerfMLP.*` / `PropMLP.*` apply and explicit dicts override them.
    """
    config: Any = None  # A Config (supplies vis_num_rays, precision and checkpoint_nerf_mlp), or None.
    num_prop_samples: int = 64  # The number of samples for each proposal level.
    num_nerf_samples: int = 32  # The number of samples the final NeRF level.
    num_levels: int = 3  # The number of sampling levels (the last one is the NeRF level).
    bg_intensity_range: Tuple[float, float] = (1., 1.)  # The range of background colours.
    anneal_slope: float = 10  # Higher = more rapid annealing of the resampling weights.
    stop_level_grad: bool = True  # If True, don't backprop across levels.
    use_viewdirs: bool = True  # If True, use view directions as input.
    raydist_fn: Any = None  # The curve used for ray distances (None: linear in t; 1/x: linear in disparity).
    ray_shape: str = 'cone'  # The shape of cast rays ('cone' or 'cylinder').
    disable_integration: bool = False  # If True, use PE instead of IPE.
    single_jitter: bool = True  # If True, jitter whole rays instead of samples.
    dilation_multiplier: float = 0.5  # How much to dilate intervals relatively.
    dilation_bias: float = 0.0025  # How much to dilate intervals absolutely.
    num_glo_features: int = 0  # GLO vector length, disabled if 0.
    num_glo_embeddings: int = 1000  # Upper bound on max number of train images.
    learned_exposure_scaling: bool = False  # Learned exposure scaling (RawNeRF).
    near_anneal_rate: Optional[float] = None  # How fast to anneal in near bound.
    near_anneal_init: float = 0.95  # Where to initialize near bound (in [0, 1]).
    single_mlp: bool = False  # Use the NerfMLP for all rounds of sampling.
    resample_padding: float = 0.0  # Dirichlet/alpha "padding" on the histogram.
    use_gpu_resampling: bool = False  # Resample with `math.interp` rather than `math.sorted_interp`.
    opaque_background: bool = False  # If true, make the background opaque.
    nerf_mlp_params: Optional[Mapping[str, Any]] = None  # Overrides of the NerfMLP's fields.
    prop_mlp_params: Optional[Mapping[str, Any]] = None  # Overrides of the PropMLP's fields.

    def __post_init__(self):
        super().__init__()
        self._check_bindings()
        self.bg_intensity_range = tuple(self.bg_intensity_range)

        # Construction order as in the reference: the NeRF MLP first, then the proposal MLP.
        mlp_kwargs = dict(use_viewdirs=self.use_viewdirs)
        self.nerf_mlp = NerfMLP(**{**mlp_kwargs, 'num_glo_features': self.num_glo_features,
                                   **(self.nerf_mlp_params or {})})
        self.prop_mlp = None if self.single_mlp else PropMLP(**{**mlp_kwargs, **(self.prop_mlp_params or {})})

        self.glo_vecs = None
        if self.num_glo_features > 0:
            self.glo_vecs = nn.Embedding(self.num_glo_embeddings, self.num_glo_features)
            # flax's default embedding init: variance_scaling(1, 'fan_in', 'normal', out_axis=0).
            nn.init.normal_(self.glo_vecs.weight, 0.0, 1.0 / pymath.sqrt(self.num_glo_features))

        self.exposure_scaling_offsets = None
        if self.learned_exposure_scaling:
            self.exposure_scaling_offsets = nn.Embedding(self.num_glo_embeddings, 3)
            nn.init.zeros_(self.exposure_scaling_offsets.weight)
        self.set_precision(getattr(self.config, 'precision', None))
        self.nerf_mlp.checkpoint_trunk = bool(getattr(self.config, 'checkpoint_nerf_mlp', False))

    def _check_bindings(self) -> None:
        _check_fields(self, 'Model', _MODEL_RANGES, _MODEL_CHOICES)
        if self.near_anneal_rate is not None:
            configs.check_number('near_anneal_rate', self.near_anneal_rate, *configs.POSITIVE, owner='Model')
        if not coord.raydist_fn_supported(self.raydist_fn):
            raise configs.ConfigError(f'Model.raydist_fn = {self.raydist_fn!r} must be None, '
                                      f'{coord.RAYDIST_FN_NAMES}.')
        bg = self.bg_intensity_range
        if not (isinstance(bg, (tuple, list)) and len(bg) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and pymath.isfinite(v) for v in bg)):
            raise configs.ConfigError(f'Model.bg_intensity_range = {bg!r} must be two finite numbers (lo, hi).')
        mlp_fields = {f.name for f in dataclasses.fields(MLP)}
        for name in ('nerf_mlp_params', 'prop_mlp_params'):
            params = getattr(self, name)
            if params is None:
                continue
            if not isinstance(params, Mapping):
                raise configs.ConfigError(f'Model.{name} = {params!r} must be None or a dict of MLP fields.')
            unknown = sorted(map(str, set(params) - mlp_fields))
            if unknown:
                raise configs.ConfigError(f'Model.{name} has unknown MLP field(s) {", ".join(unknown)}; the fields '
                                          f'are {", ".join(sorted(mlp_fields))}.')
        if self.single_mlp and self.num_glo_features > 0:
            raise configs.ConfigError('Model.single_mlp = True cannot be combined with Model.num_glo_features > 0: '
                                      'the proposal levels feed the shared MLP no GLO vector (the reference fails '
                                      'here too).')

    def set_precision(self, precision: Optional[str]) -> 'Model':
        """Sets the precision of the MLPs' matrix products for every later forward pass (train, eval, render,
        export): 'bf16' runs them under bf16 autocast (outputs cast back to float32); 'fp32' and 'tf32' run them
        in float32 even inside a caller's autocast (whether float32 products use TF32 is the process-level
        setting that `apply_precision` makes); None leaves them to the caller's context. Geometry, sampling,
        compositing and losses are float32 in every case."""
        check_precision(precision)
        self.precision = precision
        for mlp in (self.nerf_mlp, self.prop_mlp):
            if mlp is not None:
                mlp.precision = precision
        return self

    def mlp_for_level(self, i_level: int) -> MLP:
        """The MLP that level `i_level` queries (the shared PropMLP for every proposal level)."""
        is_prop = i_level < self.num_levels - 1
        return self.prop_mlp if (is_prop and self.prop_mlp is not None) else self.nerf_mlp

    def _num_samples(self, i_level: int) -> int:
        return self.num_prop_samples if i_level < self.num_levels - 1 else self.num_nerf_samples

    def draw_noise(self, rng: torch.Generator, batch_shape: Sequence[int], dtype: torch.dtype,
                   device: torch.device) -> LevelNoise:
        """Every random number one forward pass over rays of shape `batch_shape` uses, drawn from `rng` in a fixed
        order (level by level: sampling jitter, the MLP's density and bottleneck noise, background colours), the
        order in which the reference's forward pass draws them.

        Returns:
            one dict per level: 'jitter' U[0, 1) [*batch_shape, 1 or n] (see `stepfun.draw_jitter`), the MLP's
            `draw_noise` entries ('density', 'bottleneck'), and 'bg' U[0, 1) [*batch_shape, 3] when the
            background colour is random.
        """
        batch_shape = tuple(batch_shape)
        noise = []
        for i_level in range(self.num_levels):
            n = self._num_samples(i_level)
            level = {'jitter': stepfun.draw_jitter(rng, batch_shape, n, self.single_jitter, dtype, device)}
            level.update(self.mlp_for_level(i_level).draw_noise(rng, batch_shape + (n,), dtype, device,
                                                                self.use_viewdirs))
            lo, hi = self.bg_intensity_range
            if lo != hi:
                level['bg'] = torch.rand(batch_shape + (3,), generator=rng, device=device, dtype=dtype)
            noise.append(level)
        return noise

    def forward(
        self,
        rng: Optional[torch.Generator],
        rays: utils.Rays,
        train_frac: Union[float, torch.Tensor],
        compute_extras: bool,
        zero_glo: bool = True,
    ) -> Tuple[Renderings, RayHistory]:
        """Renders rays through every sampling level.

        The random numbers are drawn here (`draw_noise`), and the rendering itself (`render_rays`, what
        `compile_model` compiles) is a pure function of its tensor inputs.

        Args:
            rng: generator for jitter, noise and background colours (on the rays' device); None renders
                deterministically (interval centres, mid-range background).
            rays: a `Rays` bundle with leading dimensions `...`.
            train_frac: fraction of training done, in [0, 1] (drives the resampling anneal and near annealing);
                a number or a 0-d tensor.
            compute_extras: if True also render acc, distances, normals, and sample bundles (`ray_*`).
            zero_glo: if True use zero GLO vectors (rendering novel views).

        Returns:
            renderings: one dict per level ('rgb' [..., 3], and with extras 'acc', 'distance_mean',
                'distance_median', 'distance_percentile_5/95', normals, 'ray_sdist', 'ray_weights', 'ray_rgbs').
            ray_history: one dict per level with the MLP outputs plus 'sdist' [..., n + 1] and 'weights' [..., n].
        """
        origins = rays.origins
        noise = None
        if rng is not None:
            noise = self.draw_noise(rng, origins.shape[:-1], origins.dtype, origins.device)
        if isinstance(train_frac, torch.Tensor):
            train_frac = train_frac.to(device=origins.device, dtype=torch.float64)
        else:
            # A fill, not a host-to-device copy; and a tensor, so that a compiled render_rays is not recompiled
            # for every new value.
            train_frac = torch.full((), float(train_frac), dtype=torch.float64, device=origins.device)
        return self.render_rays(noise, rays, train_frac, compute_extras, zero_glo)

    def _glo_vectors(self, rays: utils.Rays, zero_glo: bool) -> Optional[torch.Tensor]:
        if self.num_glo_features == 0:
            return None
        if not zero_glo:
            return self.glo_vecs(rays.cam_idx[..., 0].long())
        return rays.origins.new_zeros(rays.origins.shape[:-1] + (self.num_glo_features,))

    def _initial_s_near(self, train_frac: torch.Tensor) -> Union[float, torch.Tensor]:
        """Where sampling starts in s: 0, or with near annealing min(max(1 - train_frac / rate, 0), init)."""
        if self.near_anneal_rate is None:
            return 0.
        s_near = torch.clamp_min(1 - train_frac / self.near_anneal_rate, 0.)
        return torch.clamp_max(s_near, self.near_anneal_init)

    def render_rays(
        self,
        noise: Optional[LevelNoise],
        rays: utils.Rays,
        train_frac: torch.Tensor,
        compute_extras: bool,
        zero_glo: bool = True,
    ) -> Tuple[Renderings, RayHistory]:
        """`forward` with its random numbers given (`draw_noise`, or None for deterministic rendering) and
        train_frac a 0-d tensor: no generator and no host sync, so torch.compile captures it as one graph."""
        glo_vec = self._glo_vectors(rays, zero_glo)
        _, s_to_t = coord.construct_ray_warps(self.raydist_fn, rays.near, rays.far)
        # Scalars that depend on train_frac are float64 0-d tensors (as exact as the reference's Python floats),
        # cast to the rays' dtype where they meet per-ray values.
        cast = lambda v: v.to(rays.near.dtype) if isinstance(v, torch.Tensor) else v  # noqa: E731
        init_s_near = self._initial_s_near(train_frac)
        init_s_far = 1.
        domain = (cast(init_s_near), init_s_far)
        sdist = torch.cat([torch.zeros_like(rays.near) + domain[0], torch.full_like(rays.far, init_s_far)], -1)
        weights = torch.ones_like(rays.near)
        anneal = cast(_schlick_bias(train_frac, self.anneal_slope)) if self.anneal_slope > 0 else 1.

        ray_history, renderings = [], []
        prod_num_samples = 1
        for i_level in range(self.num_levels):
            # Dilate by a multiple of the expected width of the current intervals, plus a bias.
            dilation = cast(self.dilation_bias +
                            self.dilation_multiplier * (init_s_far - init_s_near) / prod_num_samples)
            prod_num_samples *= self._num_samples(i_level)
            resampling = self._resampling_logits(i_level, sdist, weights, dilation, domain, anneal)
            level_noise = noise[i_level] if noise is not None else {}
            rendering, ray_results = self._render_level(i_level, rays, resampling, s_to_t, domain, glo_vec,
                                                        level_noise, compute_extras)
            sdist, weights = ray_results['sdist'], ray_results['weights']
            renderings.append(rendering)
            ray_history.append(ray_results)

        if compute_extras:
            # Proposal levels have no meaningful colours: show the final colour along their rays instead.
            final_rgb = torch.sum(renderings[-1]['ray_rgbs'] * renderings[-1]['ray_weights'][..., None], dim=-2)
            for r in renderings[:-1]:
                r['ray_rgbs'] = final_rgb[:, None, :].expand(r['ray_rgbs'].shape)
        return renderings, ray_history

    def _resampling_logits(self, i_level: int, sdist: torch.Tensor, weights: torch.Tensor,
                           dilation: Union[float, torch.Tensor], domain: stepfun.Domain,
                           anneal: Union[float, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sdist, logits) of the step function the next level resamples: the previous level's weights, dilated
        (after the first level) and annealed to weights**anneal, as logits; empty intervals are never drawn."""
        if i_level > 0 and (self.dilation_bias > 0 or self.dilation_multiplier > 0):
            sdist, weights = stepfun.max_dilate_weights(sdist, weights, dilation, domain=domain, renormalize=True)
            sdist = sdist[..., 1:-1]
            weights = weights[..., 1:-1]
        logits = torch.where(sdist[..., 1:] > sdist[..., :-1], anneal * torch.log(weights + self.resample_padding),
                             torch.full_like(weights, -torch.inf))
        return sdist, logits

    def _render_level(self, i_level: int, rays: utils.Rays, resampling: Tuple[torch.Tensor, torch.Tensor],
                      s_to_t: Callable[[torch.Tensor], torch.Tensor], domain: stepfun.Domain,
                      glo_vec: Optional[torch.Tensor], noise: Mapping[str, torch.Tensor],
                      compute_extras: bool) -> Tuple[Dict[str, Any], Dict[str, Optional[torch.Tensor]]]:
        """One sampling level: draw intervals from `resampling` = (sdist, logits), query the level's MLP on
        their Gaussians, composite. Returns the level's rendering and ray history entry."""
        is_prop = i_level < self.num_levels - 1
        sdist = stepfun.sample_intervals(
            None, *resampling, self._num_samples(i_level), single_jitter=self.single_jitter, domain=domain,
            use_gpu_resampling=self.use_gpu_resampling, jitter=noise.get('jitter'))
        if self.stop_level_grad:
            sdist = sdist.detach()
        tdist = s_to_t(sdist)

        gaussians = render.cast_rays(tdist, rays.origins, rays.directions, rays.radii, self.ray_shape, diag=False)
        if self.disable_integration:
            gaussians = (gaussians[0], torch.zeros_like(gaussians[1]))
        ray_results = self.mlp_for_level(i_level)(
            None, gaussians, viewdirs=rays.viewdirs if self.use_viewdirs else None, imageplane=rays.imageplane,
            glo_vec=None if is_prop else glo_vec, exposure=rays.exposure_values,
            noise={k: v for k, v in noise.items() if k in ('density', 'bottleneck')})

        weights = render.compute_alpha_weights(
            ray_results['density'], tdist, rays.directions, opaque_background=self.opaque_background)[0]
        if rays.exposure_idx is not None:
            ray_results['rgb'] = self._scale_by_exposure(ray_results['rgb'], rays)
        rendering = render.volumetric_rendering(
            ray_results['rgb'], weights, tdist, self._background(noise.get('bg')), rays.far, compute_extras,
            extras={k: v for k, v in ray_results.items() if k.startswith('normals') or k in _COMPOSITED_PARTS})
        if compute_extras:
            # A few rays kept whole (not as image chunks), for visualisation.
            n = self.config.vis_num_rays if self.config is not None else 16
            rendering['ray_sdist'] = sdist.reshape(-1, sdist.shape[-1])[:n, :]
            rendering['ray_weights'] = weights.reshape(-1, weights.shape[-1])[:n, :]
            rgb = ray_results['rgb']
            rendering['ray_rgbs'] = rgb.reshape((-1,) + rgb.shape[-2:])[:n, :, :]
        ray_results['sdist'] = sdist
        ray_results['weights'] = weights
        return rendering, ray_results

    def _background(self, uniform: Optional[torch.Tensor]) -> Union[float, torch.Tensor]:
        """The background colour: fixed, uniform in `bg_intensity_range` from the U[0, 1) draws [..., 3], or
        (deterministic rendering) mid-range."""
        lo, hi = self.bg_intensity_range
        if lo == hi:
            return lo
        if uniform is None:
            return (lo + hi) / 2
        return lo + (hi - lo) * uniform

    def _scale_by_exposure(self, rgb: torch.Tensor, rays: utils.Rays) -> torch.Tensor:
        """RawNeRF: colours [..., n, 3] scaled by the exposure, and optionally by a learned per-exposure factor."""
        rgb = rgb * rays.exposure_values[..., None, :]
        if self.exposure_scaling_offsets is not None:
            exposure_idx = rays.exposure_idx[..., 0].long()
            # Exposure 0 is the fixed reference: its scaling stays exactly 1.
            mask = (exposure_idx > 0).to(rgb.dtype)
            scaling = 1 + mask[..., None] * self.exposure_scaling_offsets(exposure_idx)
            rgb = rgb * scaling[..., None, :]
        return rgb


def reference_param_names(model: Model) -> Dict[str, str]:
    """Maps `model.named_parameters()` names to the reference's flax paths, e.g.
    'nerf_mlp.trunk.0.weight' -> 'NerfMLP_0/Dense_0/kernel', 'glo_vecs.weight' -> 'Embed_0/embedding',
    'exposure_scaling_offsets.weight' -> 'exposure_scaling_offsets/embedding'."""
    names = {}
    tops = {'nerf_mlp': 'NerfMLP_0', 'prop_mlp': 'PropMLP_0'}
    for attr, top in tops.items():
        mlp = getattr(model, attr, None)
        if mlp is None:
            continue
        for layer, dense in mlp.reference_layer_names().items():
            names[f'{attr}.{layer}.weight'] = f'{top}/{dense}/kernel'
            names[f'{attr}.{layer}.bias'] = f'{top}/{dense}/bias'
    if model.glo_vecs is not None:
        names['glo_vecs.weight'] = 'Embed_0/embedding'
    if model.exposure_scaling_offsets is not None:
        names['exposure_scaling_offsets.weight'] = 'exposure_scaling_offsets/embedding'
    return names


def construct_model(rays: Optional[utils.Rays] = None, config: Any = None,
                    device: Optional[torch.device] = None, seed: Optional[int] = None) -> Model:
    """Builds a `Model` (gin-configured) on `device`.

    Torch modules know their shapes at construction, so unlike the reference no example rays are needed; when
    `rays` is given, the model is run once on up to 10 of them as a check. `seed` (default `config.seed` or 0)
    makes the initial weights reproducible without touching the global RNG more than `torch.manual_seed` would.
    """
    if seed is None:
        seed = getattr(config, 'seed', 0) if config is not None else 0
    devices = [torch.device(device)] if device is not None and torch.device(device).type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Model(config=config)
    if device is not None:
        model = model.to(device)
    if rays is not None:
        probe = utils.tree_map(lambda x: x.reshape(-1, x.shape[-1])[:10], rays)
        probe = probe.to(next(model.parameters()).device)
        with torch.no_grad():
            model(None, probe, train_frac=1., compute_extras=False, zero_glo=model.num_glo_features == 0)
    return model


DEFAULT_RENDER_CHUNK_SIZE = 16384  # Rays per chunk off CUDA, where free memory is not measured.
RENDER_PROBE_RAYS = 1024  # Rays of the first chunk, whose peak memory sizes the others on CUDA.
RENDER_MEMORY_FRACTION = 0.5  # Share of the free device memory a render chunk may take.


def _render_chunk(render_fn, rng, chunk_rays) -> Dict[str, Any]:
    """The final level's outputs of one chunk, plus every level's 'ray_*' entries as lists over levels."""
    chunk_renderings, _ = render_fn(rng, chunk_rays)
    chunk = {k: v for k, v in chunk_renderings[-1].items() if not k.startswith('ray_')}
    for k in chunk_renderings[0]:
        if k.startswith('ray_'):
            chunk[k] = [r[k] for r in chunk_renderings]
    return chunk


def _chunk_to_cpu(chunk: Dict[str, Any]) -> Dict[str, Any]:
    return utils.tree_map(lambda v: v.detach().to('cpu', non_blocking=True), chunk)


def free_device_memory(device: torch.device) -> Optional[int]:
    """Bytes this process can still allocate on a CUDA device (free device memory plus what torch's caching
    allocator holds unused); None on other devices."""
    if device.type != 'cuda':
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def auto_render_chunk_size(render_fn, flat_rays: utils.Rays, rng: Optional[torch.Generator],
                           first_chunk: List[Dict[str, Any]]) -> int:
    """The render chunk size when `Config.render_chunk_size` is None: on CUDA, as many rays as take
    `RENDER_MEMORY_FRACTION` of the free memory, from the peak memory of rendering the first
    `RENDER_PROBE_RAYS` rays (that chunk's outputs, on the CPU, are appended to `first_chunk`); elsewhere
    `DEFAULT_RENDER_CHUNK_SIZE`. A multiple of 1024, at least 1024."""
    device = flat_rays.origins.device
    free = free_device_memory(device)
    if free is None:
        return DEFAULT_RENDER_CHUNK_SIZE
    n = min(RENDER_PROBE_RAYS, flat_rays.origins.shape[0])
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        first_chunk.append(_chunk_to_cpu(_render_chunk(render_fn, rng, utils.tree_map(lambda r: r[:n], flat_rays))))
    bytes_per_ray = max(torch.cuda.max_memory_allocated(device) - base, 1) / n
    return max(1024, int(RENDER_MEMORY_FRACTION * free / bytes_per_ray) // 1024 * 1024)


def render_image(render_fn: Callable[[Optional[torch.Generator], utils.Rays], Tuple[Renderings, Any]],
                 rays: utils.Rays,
                 rng: Optional[torch.Generator],
                 config: Any,
                 verbose: bool = False) -> Dict[str, Any]:
    """Renders a whole image in chunks of `config.render_chunk_size` rays (None: `auto_render_chunk_size`).

    Args:
        render_fn: (rng, rays) -> (renderings, ray_history), e.g. `functools.partial(model, train_frac=f,
            compute_extras=True)`; runs on whatever device `rays` live on.
        rays: `Rays` with leading dimensions [H, W].
        rng: generator passed to render_fn (None for deterministic rendering).
        config: supplies render_chunk_size and vis_num_rays.
        verbose: print progress.

    Returns:
        Final-level images on the CPU, each [H, W, ...] ('rgb', 'acc', 'distance_*', ...), plus, for keys
        starting with 'ray_', a list over levels of [vis_num_rays, ...] bundles drawn (deterministically) from
        all the image's rays.
    """
    height, width = rays.origins.shape[:2]
    num_rays = height * width
    flat = utils.tree_map(lambda r: r.reshape((num_rays, -1)), rays)
    chunks = []
    chunk_size = config.render_chunk_size
    if chunk_size is None:
        chunk_size = auto_render_chunk_size(render_fn, flat, rng, chunks)
    first = chunks[0]['rgb'].shape[0] if chunks else 0  # Rays the probe rendered already.
    starts = range(first, num_rays, chunk_size)
    with torch.no_grad():
        for i_chunk, i0 in enumerate(starts):
            if verbose and i_chunk % max(1, len(starts) // 10) == 0:
                print(f'Rendering chunk {i_chunk}/{len(starts) - 1}')
            chunk_rays = utils.tree_map(lambda r: r[i0:i0 + chunk_size], flat)
            chunks.append(_chunk_to_cpu(_render_chunk(render_fn, rng, chunk_rays)))
    if rays.origins.device.type == 'cuda':
        torch.cuda.synchronize(rays.origins.device)  # The non-blocking copies above must have landed.

    rendering = {}
    for k in chunks[0]:
        if k.startswith('ray_'):
            rendering[k] = [torch.cat([c[k][i] for c in chunks]) for i in range(len(chunks[0][k]))]
        else:
            z = torch.cat([c[k] for c in chunks])
            rendering[k] = z.reshape((height, width) + z.shape[1:])

    ray_keys = [k for k in rendering if k.startswith('ray_')]
    if ray_keys:
        n = rendering[ray_keys[0]][0].shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:config.vis_num_rays]
        for k in ray_keys:
            rendering[k] = [r[perm] for r in rendering[k]]
    return rendering


COMPILE_MODES = configs.COMPILE_MODES
PRECISIONS = configs.PRECISIONS


def check_precision(precision: Optional[str]) -> None:
    configs.check_choice('precision', precision, PRECISIONS, none_ok=True)  # None: TF32 on CUDA, else float32.


def resolve_precision(precision: Optional[str], device: Union[str, torch.device]) -> str:
    """`Config.precision` for a device: None is 'tf32' on CUDA (the default precision of the reference's XLA
    matrix products there) and 'fp32' elsewhere."""
    check_precision(precision)
    if precision is None:
        return 'tf32' if torch.device(device).type == 'cuda' else 'fp32'
    return precision


def apply_precision(precision: Optional[str], device: Union[str, torch.device]) -> str:
    """Makes the process-level float32 matmul setting that `precision` asks for on `device` (TF32 allowed for
    'tf32', and for 'bf16' and None on CUDA; full float32 otherwise) and returns the resolved precision. The
    per-model part (bf16 autocast of the MLPs) is `Model.set_precision`, which `Model(config=...)` applies."""
    resolved = resolve_precision(precision, device)
    tf32 = resolved == 'tf32' or (resolved == 'bf16' and torch.device(device).type == 'cuda')
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    return resolved


def compile_model(model: Model, mode: Optional[str], **compile_kwargs: Any) -> Model:
    """Compiles the generator-free part of `model` in place (`Config.compile`) and returns it.

    'model' compiles `Model.render_rays` (every level: sampling, MLPs, compositing; one graph, no breaks for
    models without density-gradient normals), 'mlp' only each MLP's `evaluate`, 'none' (or None) nothing.
    Random numbers are drawn outside the compiled code (`Model.draw_noise`), so outputs stay a pure function of
    the generator, and train_frac enters as a 0-d tensor, so a new value does not recompile. Parameter names are
    unchanged (state_dicts and checkpoints are those of the plain model). `compile_kwargs` go to
    `torch.compile` (e.g. backend='aot_eager', mode='max-autotune').
    """
    configs.check_choice('compile', mode, COMPILE_MODES, none_ok=True)
    if mode == 'model':
        model.render_rays = torch.compile(model.render_rays, **compile_kwargs)
    elif mode == 'mlp':
        for mlp in (model.nerf_mlp, model.prop_mlp):
            if mlp is not None:
                mlp.evaluate = torch.compile(mlp.evaluate, **compile_kwargs)
    return model
