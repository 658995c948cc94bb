"""Losses, gradient clipping, the optimiser and learning-rate schedule, the TrainState and one training step.

`train_step(state, batch, ...) -> (state, stats)` updates a `TrainState` (model, Adam, schedule, step, RobustNeRF
threshold, seed) with no host sync; its `FiniteGuard` keeps non-finite updates out of the state (on the device),
and `Config.grad_accum_steps` splits a batch into micro-batches with the same summed gradient.

Port of multinerf's `internal/train_utils.py`. The loss terms (mip-NeRF 360, arXiv:2111.12077):
  data          Charbonnier (or MSE / RawNeRF / RobustNeRF) on the rendered colour, `lossmult`-weighted mean;
                the final level weighted by `data_loss_mult`, earlier levels by `data_coarse_loss_mult`.
  interlevel    Eq. 13: each proposal histogram must bound the (stop-gradient) NeRF histogram from above.
  distortion    Eq. 15, on the final level's normalised distances and weights.
  orientation / predicted_normals   Ref-NeRF's normal regularisers (arXiv:2112.03907, Eqs. 10 and 11).
  weight        weight decay, `sum_k mult_k * ||params under prefix k||^2` over `config.weight_decay_mults`.

Parameter groups (gradient clipping and statistics) are the top-level children of `Model`: 'nerf_mlp',
'prop_mlp', 'glo_vecs', 'exposure_scaling_offsets' (the reference's 'NerfMLP_0', 'PropMLP_0', 'Embed_0',
'exposure_scaling_offsets'). Keys of `config.weight_decay_mults` may use either spelling, as a prefix of a
torch parameter name ('nerf_mlp', 'prop_mlp.trunk.0') or of a reference path ('NerfMLP_0',
'PropMLP_0/Dense_0'); see `models.reference_param_names`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mipnerf360 import camera_utils, configs, image, math, models, ref_utils, robustnerf, stepfun, utils
from mipnerf360.configs import ConfigError

Stats = Dict[str, Any]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAN_POLICIES = configs.NAN_POLICIES


class NonFiniteError(RuntimeError):
    """Training stopped because a loss term or gradient norm went non-finite (the message names the step, the
    terms and what to do)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The `Model` inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, 'module') else model


def compute_data_loss(batch: utils.Batch, renderings: List[Dict[str, torch.Tensor]], rays: utils.Rays,
                      loss_threshold: Union[float, torch.Tensor], config: Any) -> Tuple[torch.Tensor, Stats]:
    """Data loss over all levels.

    Args:
        batch: batch.rgb [..., 3 or 4] targets (plus disps / normals / alphas for the optional metrics).
        renderings: per level, 'rgb' [..., 3] (and 'distance_mean', 'normals', 'acc' for the metrics).
        rays: supplies lossmult [..., 1], the per-ray loss weight.
        loss_threshold: RobustNeRF's inlier threshold (used only with data_loss_type 'robustnerf').
        config: data_loss_type ('mse', 'charb', 'rawnerf', 'robustnerf'), charb_padding, data_loss_mult,
            data_coarse_loss_mult, disable_multiscale_loss, compute_disp_metrics, compute_normal_metrics.

    Returns:
        loss: scalar, data_coarse_loss_mult * sum(levels[:-1]) + data_loss_mult * levels[-1], each level being
            sum(lossmult * loss) / sum(lossmult).
        stats: 'mses' [num_levels] (and 'disparity_mses', 'normal_maes', RobustNeRF statistics).
    """
    configs.check_choice('data_loss_type', config.data_loss_type, configs.DATA_LOSS_TYPES)
    rgb_gt = batch.rgb[..., :3]
    for rendering in renderings:
        if rendering['rgb'].shape != rgb_gt.shape:
            raise ValueError(f"Rendered colours have shape {tuple(rendering['rgb'].shape)} but the batch targets "
                             f'have {tuple(rgb_gt.shape)}; rays and targets must share their batch dimensions.')
    lossmult = torch.broadcast_to(rays.lossmult, rgb_gt.shape).to(rgb_gt.dtype)
    if config.disable_multiscale_loss:
        lossmult = torch.ones_like(lossmult)
    denom = lossmult.sum()

    data_losses = []
    lists: Dict[str, list] = {}
    extra_stats: Stats = {}
    for rendering in renderings:
        rgb = rendering['rgb']
        resid_sq = (rgb - rgb_gt)**2
        lists.setdefault('mses', []).append((lossmult * resid_sq).sum() / denom)

        if config.data_loss_type == 'mse':
            data_loss = resid_sq
        elif config.data_loss_type == 'charb':
            data_loss = torch.sqrt(resid_sq + config.charb_padding**2)
        elif config.data_loss_type == 'rawnerf':
            # Clip at 1 like an over-exposed sensor, and weight by the gradient of a log tone curve (RawNeRF
            # Eq. 6 ff.), held constant.
            rgb_clip = torch.clamp(rgb, max=1.)
            scaling_grad = 1. / (1e-3 + rgb_clip.detach())
            data_loss = (rgb_clip - rgb_gt)**2 * scaling_grad**2
        else:  # 'robustnerf'
            mask, robust_stats = robustnerf.robustnerf_mask(resid_sq, loss_threshold, config)
            data_loss = resid_sq * mask
            extra_stats.update(robust_stats)
        data_losses.append((lossmult * data_loss).sum() / denom)

        if config.compute_disp_metrics:
            disp = 1 / (1 + rendering['distance_mean'])
            disps_gt = batch.disps.reshape(disp.shape)
            lists.setdefault('disparity_mses', []).append(((disp - disps_gt)**2).mean())

        if config.compute_normal_metrics:
            if rendering.get('normals') is not None:
                weights = rendering['acc'] * batch.alphas.reshape(rendering['acc'].shape)
                normals_gt = ref_utils.l2_normalize(batch.normals)
                normals = ref_utils.l2_normalize(rendering['normals'])
                normal_mae = ref_utils.compute_weighted_mae(weights, normals, normals_gt)
            else:
                normal_mae = torch.full((), torch.nan, dtype=rgb.dtype, device=rgb.device)
            lists.setdefault('normal_maes', []).append(normal_mae)

    loss = config.data_loss_mult * data_losses[-1]
    if len(data_losses) > 1 and config.data_coarse_loss_mult != 0:
        loss = loss + config.data_coarse_loss_mult * torch.stack(data_losses[:-1]).sum()
    stats = {k: torch.stack(v) for k, v in lists.items()}
    stats.update(extra_stats)
    return loss, stats


def interlevel_loss(ray_history: Sequence[Mapping[str, torch.Tensor]], config: Any) -> torch.Tensor:
    """mip-NeRF 360's proposal loss (Eq. 13), summed over proposal levels, times `interlevel_loss_mult`.

    The NeRF level's distances and weights are held constant, so this trains only the proposal MLP.
    """
    last = ray_history[-1]
    c = last['sdist'].detach()
    w = last['weights'].detach()
    loss = 0.
    for ray_results in ray_history[:-1]:
        loss = loss + torch.mean(stepfun.lossfun_outer(c, w, ray_results['sdist'], ray_results['weights']))
    return config.interlevel_loss_mult * loss


def distortion_loss(ray_history: Sequence[Mapping[str, torch.Tensor]], config: Any) -> torch.Tensor:
    """mip-NeRF 360's distortion regulariser (Eq. 15) on the final level, times `distortion_loss_mult`."""
    last = ray_history[-1]
    return config.distortion_loss_mult * torch.mean(stepfun.lossfun_distortion(last['sdist'], last['weights']))


def orientation_loss(rays: utils.Rays, model: nn.Module, ray_history: Sequence[Mapping[str, torch.Tensor]],
                     config: Any) -> torch.Tensor:
    """Ref-NeRF's orientation loss (Eq. 10): penalise normals facing away from the camera, weighted by w."""
    model = _unwrap(model)
    total = 0.
    v = -rays.viewdirs  # Unit vectors from the points towards the camera.
    for i, ray_results in enumerate(ray_history):
        w = ray_results['weights']
        n = ray_results[config.orientation_loss_target]
        if n is None:
            raise ConfigError(
                    f'Config.orientation_loss_mult = {config.orientation_loss_mult:g} (orientation_coarse_loss_mult '
                    f'= {config.orientation_coarse_loss_mult:g}) needs the {config.orientation_loss_target!r} of '
                    'Config.orientation_loss_target, which this model does not compute: set the loss mults to 0, '
                    "or compute them (NerfMLP.enable_pred_normals = True for 'normals_pred', "
                    "NerfMLP.disable_density_normals = False for 'normals'), as configs/blender_refnerf.gin does.")
        n_dot_v = (n * v[..., None, :]).sum(dim=-1)
        loss = torch.mean((w * torch.clamp(n_dot_v, max=0.0)**2).sum(dim=-1))
        mult = config.orientation_coarse_loss_mult if i < model.num_levels - 1 else config.orientation_loss_mult
        total = total + mult * loss
    return total


def predicted_normal_loss(model: nn.Module, ray_history: Sequence[Mapping[str, torch.Tensor]],
                          config: Any) -> torch.Tensor:
    """Ref-NeRF's predicted-normal loss (Eq. 11): predicted normals should match density-gradient normals."""
    model = _unwrap(model)
    total = 0.
    for i, ray_results in enumerate(ray_history):
        w = ray_results['weights']
        n = ray_results['normals']
        n_pred = ray_results['normals_pred']
        if n is None or n_pred is None:
            raise ConfigError(
                    f'Config.predicted_normal_loss_mult = {config.predicted_normal_loss_mult:g} '
                    f'(predicted_normal_coarse_loss_mult = {config.predicted_normal_coarse_loss_mult:g}) needs '
                    'density normals and predicted normals, which this model does not compute: set both mults to '
                    '0, or set NerfMLP.disable_density_normals = False and NerfMLP.enable_pred_normals = True.')
        loss = torch.mean((w * (1.0 - torch.sum(n * n_pred, dim=-1))).sum(dim=-1))
        mult = (config.predicted_normal_coarse_loss_mult if i < model.num_levels - 1
                else config.predicted_normal_loss_mult)
        total = total + mult * loss
    return total


def param_groups(model: nn.Module) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """Trainable parameters grouped by top-level child ('nerf_mlp', 'prop_mlp', 'glo_vecs', ...), in order."""
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {}
    for name, p in _unwrap(model).named_parameters():
        if p.requires_grad:
            groups.setdefault(name.split('.')[0], []).append((name, p))
    return groups


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _abs_max(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.abs().max() for t in tensors]).max()


def clip_gradients(model: nn.Module, config: Any) -> Dict[str, torch.Tensor]:
    """Clips the gradients of each parameter group (see `param_groups`) on its own, in place.

    Per group: clamp each entry to [-grad_max_val, grad_max_val] if grad_max_val > 0; then, if grad_max_norm > 0,
    scale by min(1, grad_max_norm / (eps + ||g||)) with ||g|| the group's global L2 norm. Finally NaN -> 0 and
    +-Inf -> +-largest finite value. No host synchronisation.

    Returns:
        The group norms after clipping (before nan_to_num), by group name.
    """
    clipped_norms = {}
    for group, named in param_groups(model).items():
        grads = [p.grad for _, p in named if p.grad is not None]
        if not grads:
            continue
        if config.grad_max_val > 0:
            for g in grads:
                g.clamp_(-config.grad_max_val, config.grad_max_val)
        if config.grad_max_norm > 0:
            norm = _norm(grads)
            eps = torch.finfo(norm.dtype).eps
            mult = torch.clamp(config.grad_max_norm / (eps + norm), max=1.)
            torch._foreach_mul_(grads, mult)
        clipped_norms[group] = _norm(grads)
        for g in grads:
            torch.nan_to_num_(g)
    return clipped_norms


def _prefix_match(prefix: str, name: str, sep: str) -> bool:
    return name == prefix or name.startswith(prefix + sep)


def weight_l2(model: nn.Module, prefix: str) -> torch.Tensor:
    """Sum of squares of the parameters whose torch name ('.'-separated) or reference path ('/'-separated)
    starts with `prefix` (differentiable)."""
    base = _unwrap(model)
    ref_names = models.reference_param_names(base)
    terms = [torch.sum(p**2) for name, p in base.named_parameters()
             if _prefix_match(prefix, name, '.') or _prefix_match(prefix, ref_names.get(name, ''), '/')]
    if not terms:
        raise ConfigError(f'Config.weight_decay_mults names {prefix!r}, which matches no parameter; use a prefix '
                          "such as 'nerf_mlp', 'prop_mlp.trunk.0' or the reference's 'NerfMLP_0/Dense_0'.")
    return torch.stack(terms).sum()


def create_optimizer(config: Any, model: nn.Module) -> Tuple[torch.optim.Adam, Callable[[int], float]]:
    """Adam (betas and eps from config) over the model's trainable parameters, and the learning-rate schedule
    lr_fn(step) = math.learning_rate_decay(step, lr_init, lr_final, max_steps, lr_delay_steps, lr_delay_mult),
    with step counted from 0 (the reference's optax step)."""
    lr_fn_raw = functools.partial(
        math.learning_rate_decay,
        lr_init=config.lr_init,
        lr_final=config.lr_final,
        max_steps=config.max_steps,
        lr_delay_steps=config.lr_delay_steps,
        lr_delay_mult=config.lr_delay_mult)

    def lr_fn(step: int) -> float:
        # Through numpy: a CPU value, but .item() would look like a device sync to `syncguard`.
        return float(lr_fn_raw(step).numpy())

    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel keeps Adam's step count on the parameters' device: no host sync per step (the default
    # implementation reads the count with .item()), and a skipped update can be undone on the device.
    fused = all(p.device.type in ('cpu', 'cuda') and p.dtype in _FUSED_DTYPES for p in params)
    optimizer = torch.optim.Adam(params, lr=lr_fn(0), betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_eps, fused=fused)
    return optimizer, lr_fn


def step_generator(device: Union[str, torch.device], seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The model's sampling randomness for one step: a pure function of (seed, step, rank), so a resumed run
    draws what the uninterrupted run drew."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + 0x5EED) % (2**63 - 1))
    return g


@dataclasses.dataclass
class TrainState:
    """Everything a training run carries from one step to the next (the reference's flax TrainState).

    step: the number of updates done (the next `train_step` runs step `step + 1`).
    loss_threshold: RobustNeRF's inlier threshold, computed by the previous step (1.0 at first, as the
        reference's train.py).
    seed: with `step` and the process rank, it fixes each step's sampling randomness (`step_generator`).
    """
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_fn: Callable[[int], float]
    step: int = 0
    loss_threshold: Union[float, torch.Tensor] = 1.0
    seed: int = 0
    guard: Optional['FiniteGuard'] = None

    def step_generator(self, device: Union[str, torch.device], rank: int = 0) -> torch.Generator:
        """The sampling generator of the next step (`step + 1`)."""
        return step_generator(device, self.seed, self.step + 1, rank)

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint dict: 'model', 'optimizer', 'step', 'seed' and, once RobustNeRF has computed one,
        'robustnerf_loss_threshold' (the layout checkpoints have always had)."""
        state = {'model': _unwrap(self.model).state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'step': self.step, 'seed': self.seed}
        if isinstance(self.loss_threshold, torch.Tensor):
            state['robustnerf_loss_threshold'] = self.loss_threshold.detach().cpu()
        return state

    def load_state_dict(self, state: Mapping[str, Any]):
        """Restores a dict written by `state_dict` (torch's errors propagate for a mismatched model)."""
        _unwrap(self.model).load_state_dict(state['model'])
        self.load_training_state(state)

    def load_training_state(self, state: Mapping[str, Any]):
        """Restores all but the model's weights from a dict written by `state_dict`: the Adam state, step, seed
        and RobustNeRF's threshold (torch's errors propagate for an optimizer of another model)."""
        self.optimizer.load_state_dict(state['optimizer'])
        self.step = int(state['step'])
        self.seed = int(state.get('seed', self.seed))
        if state.get('robustnerf_loss_threshold') is not None:
            device = next(_unwrap(self.model).parameters()).device
            self.loss_threshold = torch.as_tensor(state['robustnerf_loss_threshold'], device=device)


@dataclasses.dataclass
class GuardReport:
    """The guard's device state, read on the host (`FiniteGuard.read`)."""
    halted: bool
    skips_in_a_row: int
    num_skipped: int
    streak_start: int  # The first step of the newest run of non-finite steps (-1: none yet).
    streak_terms: List[str]  # The terms non-finite at `streak_start`.


class FiniteGuard:
    """Watches each step's loss terms and gradient norms, entirely on the device.

    A step whose terms are all finite is applied. A non-finite one is not (parameters, Adam moments and step
    count, and RobustNeRF's threshold stay as they were); under `Config.nan_policy = 'stop'` the guard then
    halts, and under 'skip_step' it halts after `Config.nan_max_skips_in_a_row` skipped steps in a row. Once
    halted, no further update is applied, so the state is that of the last finite step. The host learns of it
    only when it calls `read` (at logging steps, before saving, at the end).
    """

    def __init__(self, device: torch.device, policy: str, max_skips_in_a_row: int):
        def zero(dtype):
            return torch.zeros((), dtype=dtype, device=device)
        self.stop_at_first = policy == 'stop'
        self.max_skips_in_a_row = max_skips_in_a_row
        self.halted = zero(torch.bool)
        self.skips_in_a_row = zero(torch.long)
        self.num_skipped = zero(torch.long)
        self.streak_start = zero(torch.long) - 1
        self.streak_terms: Optional[torch.Tensor] = None
        self.term_names: List[str] = []

    def update(self, step: int, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Records step `step` with its scalar `terms`; returns whether to apply its update (a 0-d bool)."""
        finite = torch.stack([torch.isfinite(v.detach()) for v in terms.values()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One rank's non-finite loss stops all ranks at the same step.
            finite_int = finite.to(torch.int32)
            torch.distributed.all_reduce(finite_int, op=torch.distributed.ReduceOp.MIN)
            finite = finite_int.bool()
        if self.streak_terms is None or list(terms) != self.term_names:
            self.term_names = list(terms)
            self.streak_terms = torch.zeros_like(finite)
        active = ~self.halted
        ok = finite.all()
        bad = ~ok & active
        new_streak = bad & (self.skips_in_a_row == 0)
        self.streak_start = torch.where(new_streak, step, self.streak_start)
        self.streak_terms = torch.where(new_streak, ~finite, self.streak_terms)
        self.skips_in_a_row = torch.where(bad, self.skips_in_a_row + 1,
                                          torch.where(active, 0, self.skips_in_a_row))
        self.num_skipped = self.num_skipped + bad
        halt = self.skips_in_a_row >= self.max_skips_in_a_row
        if self.stop_at_first:
            halt = halt | bad
        self.halted = self.halted | halt
        return ok & active

    def read(self) -> GuardReport:
        """One device-to-host copy of the guard's state."""
        flags = self.streak_terms if self.streak_terms is not None else torch.zeros(0, dtype=torch.bool,
                                                                                      device=self.halted.device)
        values = torch.cat([torch.stack([self.halted.long(), self.skips_in_a_row, self.num_skipped,
                                         self.streak_start]), flags.long()]).cpu().tolist()
        terms = [name for name, bad in zip(self.term_names, values[4:]) if bad]
        return GuardReport(halted=bool(values[0]), skips_in_a_row=values[1], num_skipped=values[2],
                           streak_start=values[3], streak_terms=terms)


def create_train_state(config: Any, model: nn.Module) -> TrainState:
    """A TrainState at step 0: Adam and the schedule of `create_optimizer`, seeded by `config.seed`, with a
    `FiniteGuard` following `config.nan_policy`."""
    configs.validate_fields(config, configs.TRAIN_STATE_FIELDS)
    if config.grad_accum_steps == 'auto':
        raise ConfigError("Config.grad_accum_steps = 'auto' must be resolved before create_train_state "
                          '(memory.resolve_grad_accum_steps, as cli/train.py does).')
    optimizer, lr_fn = create_optimizer(config, model)
    device = next(_unwrap(model).parameters()).device
    guard = FiniteGuard(device, config.nan_policy, config.nan_max_skips_in_a_row)
    return TrainState(model=model, optimizer=optimizer, lr_fn=lr_fn, seed=config.seed, guard=guard)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Dict[Tuple[int, str], torch.Tensor]:
    """Every parameter and every tensor of its optimizer state (Adam: step, exp_avg, exp_avg_sq)."""
    out = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            out[(id(p), '')] = p
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[(id(p), k)] = v
    return out


def _guarded_optimizer_step(optimizer: torch.optim.Optimizer, apply: torch.Tensor):
    """optimizer.step(), undone on the device where `apply` (a 0-d bool) is False: the parameters and the
    optimizer state (fresh state counts as zeros, as Adam's initial state) keep their values."""
    if optimizer.defaults.get('fused'):
        # The fused kernel skips the whole update (moments and step count included) on the device where
        # `found_inf` is 1, as under torch.amp.GradScaler: no copy of the parameters and state.
        optimizer.found_inf = (~apply).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    with torch.no_grad():
        before = {k: v.detach().clone() for k, v in _optimizer_tensors(optimizer).items()}
        optimizer.step()
        for k, t in _optimizer_tensors(optimizer).items():
            old = before.get(k)
            t.copy_(torch.where(apply, t, old if old is not None else torch.zeros_like(t)))


def train_frac_of(step: int, config: Any) -> float:
    """The training fraction that drives annealing at 1-based step `step`: (step - 1) / (max_steps - 1)."""
    return float(np.clip((step - 1) / max(config.max_steps - 1, 1), 0, 1))


def eval_train_frac(step: int, config: Any) -> float:
    """The training fraction a checkpoint of `step` is evaluated (and exported) at: step / max_steps, as the
    reference's eval.py."""
    return float(np.clip(step / config.max_steps, 0, 1))


def _compute_losses(state: TrainState, batch: utils.Batch, rays: utils.Rays, config: Any, rng: Optional[
        torch.Generator], train_frac: float, weight_decay: bool = True) -> Tuple[Dict[str, torch.Tensor], Stats,
                                                                                torch.Tensor]:
    """Forward pass and every loss term {name: scalar tensor} (weight decay only if `weight_decay`), with the
    data-loss statistics and the final level's colours."""
    base = _unwrap(state.model)
    compute_extras = config.compute_disp_metrics or config.compute_normal_metrics
    renderings, ray_history = state.model(rng, rays, train_frac=train_frac, compute_extras=compute_extras,
                                          zero_glo=False)
    losses = {}
    losses['data'], stats = compute_data_loss(batch, renderings, rays, state.loss_threshold, config)
    if config.interlevel_loss_mult > 0:
        losses['interlevel'] = interlevel_loss(ray_history, config)
    if config.distortion_loss_mult > 0:
        losses['distortion'] = distortion_loss(ray_history, config)
    if config.orientation_coarse_loss_mult > 0 or config.orientation_loss_mult > 0:
        losses['orientation'] = orientation_loss(rays, base, ray_history, config)
    if config.predicted_normal_coarse_loss_mult > 0 or config.predicted_normal_loss_mult > 0:
        losses['predicted_normals'] = predicted_normal_loss(base, ray_history, config)
    if config.weight_decay_mults and weight_decay:
        losses['weight'] = sum(m * weight_l2(base, k) for k, m in config.weight_decay_mults.items())
    # Python numbers become device tensors by a fill, not a host-to-device copy (which would synchronise a GPU).
    ref = losses['data']
    losses = {k: v.to(ref.dtype) if isinstance(v, torch.Tensor) else torch.full((), v, dtype=ref.dtype,
                                                                                 device=ref.device)
              for k, v in losses.items()}
    return losses, stats, renderings[-1]['rgb']


def _data_weight_total(batch: utils.Batch, rays: utils.Rays, config: Any) -> torch.Tensor:
    """The denominator of the data loss: the sum of `lossmult` over the batch's colour entries."""
    if config.disable_multiscale_loss:
        return torch.full((), float(batch.rgb[..., :3].numel()), dtype=batch.rgb.dtype, device=batch.rgb.device)
    return torch.broadcast_to(rays.lossmult, batch.rgb[..., :3].shape).to(batch.rgb.dtype).sum()


def compute_gradients(state: TrainState, batch: utils.Batch, rays: utils.Rays, config: Any,
                      rng: Optional[torch.Generator], train_frac: float) -> Tuple[Dict[str, torch.Tensor], Stats]:
    """Forward and backward: the loss terms of the whole batch and their gradient in the parameters' .grad.

    With `config.grad_accum_steps` = k > 1 the batch is split along its first dimension (rays, or patches)
    into k micro-batches, run one after the other; each term is weighted by its micro-batch's share (the
    `lossmult` share for the data term, the ray share for the per-ray means; weight decay once), so the summed
    gradient is the full batch's up to float rounding. RobustNeRF's next threshold is the inlier quantile of
    the whole batch's errors, and its masks use the previous threshold, patch by patch, as without splitting.
    The sampling randomness differs from the unsplit batch's (`rng` is drawn from micro-batch by micro-batch).
    """
    state.optimizer.zero_grad(set_to_none=True)
    k = config.grad_accum_steps
    if k == 1:
        losses, stats, _ = _compute_losses(state, batch, rays, config, rng, train_frac)
        torch.stack(list(losses.values())).sum().backward()
        return losses, stats
    n = utils.tree_leaves(rays)[0].shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f'Config.grad_accum_steps = {k} must be between 1 and the batch\'s first dimension '
                          f'({n}); lower it or raise Config.batch_size.')
    data_total = _data_weight_total(batch, rays, config)
    rays_total = float(np.prod(rays.lossmult.shape[:-1]))
    losses, stats, errors = {}, {}, []
    bounds = [i * n // k for i in range(k + 1)]
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        micro, micro_rays = batch[lo:hi], rays[lo:hi]
        micro_losses, micro_stats, rgb = _compute_losses(state, micro, micro_rays, config, rng, train_frac,
                                                         weight_decay=i == 0)
        w_data = _data_weight_total(micro, micro_rays, config) / data_total
        w_rays = float(np.prod(micro_rays.lossmult.shape[:-1])) / rays_total
        scaled = {name: v * (w_data if name == 'data' else 1. if name == 'weight' else w_rays)
                  for name, v in micro_losses.items()}
        sync = contextlib.nullcontext() if i == k - 1 or not hasattr(state.model, 'no_sync') else \
            state.model.no_sync()  # DDP: all-reduce the gradients once, after the last micro-batch.
        with sync:
            torch.stack(list(scaled.values())).sum().backward()
        for name, v in scaled.items():
            losses[name] = losses[name] + v.detach() if name in losses else v.detach()
        for name, v in micro_stats.items():
            if name != 'loss_threshold':
                v = v.detach() * (w_data if name == 'mses' else w_rays)
                stats[name] = stats[name] + v if name in stats else v
        if config.data_loss_type == 'robustnerf':
            errors.append(((rgb.detach() - micro.rgb[..., :3])**2).mean(dim=-1).reshape(-1))
    if errors:
        stats['loss_threshold'] = torch.quantile(torch.cat(errors), config.robustnerf_inlier_quantile)
    return losses, stats


def _grad_stats(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], ...]:
    """Per parameter group: gradient L2 norm, gradient max |g|, and sum of squared weights."""
    grad_norms, grad_maxes, weight_l2s = {}, {}, {}
    with torch.no_grad():
        for group, named in param_groups(model).items():
            grads = [p.grad for _, p in named if p.grad is not None]
            if grads:
                grad_norms[group] = _norm(grads)
                grad_maxes[group] = _abs_max(grads)
            weight_l2s[group] = torch.stack([torch.sum(p.detach()**2) for _, p in named]).sum()
    return grad_norms, grad_maxes, weight_l2s


def train_step(state: TrainState,
               batch: utils.Batch,
               cameras: Optional[Tuple[Any, ...]],
               config: Any,
               rng: Optional[torch.Generator] = None,
               camtype: Any = None,
               train_frac: Optional[float] = None) -> Tuple[TrainState, Stats]:
    """One optimisation step (number `state.step + 1`): rays, forward, losses, backward, per-group clipping,
    Adam update. The state is updated in place and returned, as the reference's `train_step` returns its new
    state.

    Args:
        state: from `create_train_state` (its model may be a DDP wrapper).
        batch: a `Batch` on the model's device; `batch.rays` is `Rays`, or `Pixels` to be cast here with
            `cameras` (as is done too for any batch when `config.cast_rays_in_train_step`).
        cameras: (pixtocams, camtoworlds, distortion_params, pixtocam_ndc) on the model's device, or None.
        config: a `Config`.
        rng: sampling generator on the model's device (e.g. `state.step_generator(device, rank)`), None for
            deterministic sampling.
        camtype: camera_utils.ProjectionType for casting Pixels (perspective when None).
        train_frac: fraction of training done, in [0, 1]; `train_frac_of(state.step + 1, config)` when None.

    Returns:
        (state, stats): stats are all tensors (or floats) left on the device: 'loss', 'losses' {term: value},
        'mses' and 'psnrs' [num_levels], 'psnr', 'grad_norms' / 'grad_maxes' / 'grad_norms_clipped' /
        'weight_l2s' {group: value}, 'lr', and the data-loss statistics. Convert with `stats_to_float` at
        logging time. The learning rate is lr_fn(state.step) (the reference's optax schedule counts from 0).
    """
    base = _unwrap(state.model)
    rays = batch.rays
    if isinstance(rays, utils.Pixels) or config.cast_rays_in_train_step:
        if camtype is None:
            camtype = camera_utils.ProjectionType.PERSPECTIVE
        rays = camera_utils.cast_ray_batch(cameras, rays, camtype, xnp=torch)
    if train_frac is None:
        train_frac = train_frac_of(state.step + 1, config)

    losses, stats = compute_gradients(state, batch, rays, config, rng, train_frac)
    loss = torch.stack(list(losses.values())).sum()

    grad_norms, grad_maxes, weight_l2s = _grad_stats(base)
    watched = {f'{k} loss': v for k, v in losses.items()}
    watched.update({f'gradient norm of {k}': v for k, v in grad_norms.items()})
    grad_norms_clipped = clip_gradients(base, config)

    lr = state.lr_fn(state.step)
    for param_group in state.optimizer.param_groups:
        param_group['lr'] = lr
    if state.guard is None:
        state.optimizer.step()
        apply = None
    else:
        apply = state.guard.update(state.step + 1, watched)
        _guarded_optimizer_step(state.optimizer, apply)
    state.step += 1
    if 'loss_threshold' in stats:
        new = stats['loss_threshold'].detach()
        state.loss_threshold = new if apply is None else torch.where(apply, new, state.loss_threshold)

    stats = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
    stats['loss'] = loss.detach()
    stats['losses'] = {k: v.detach() for k, v in losses.items()}
    stats['psnrs'] = image.mse_to_psnr(stats['mses'])
    stats['psnr'] = stats['psnrs'][-1]
    stats['grad_norms'] = grad_norms
    stats['grad_maxes'] = grad_maxes
    stats['grad_norms_clipped'] = grad_norms_clipped
    stats['weight_l2s'] = weight_l2s
    stats['lr'] = lr
    return state, stats


def _flatten_stats(stats: Mapping[str, Any], prefix: str = '') -> List[Tuple[str, Any]]:
    items = []
    for k, v in stats.items():
        name = f'{prefix}{k}'
        if isinstance(v, Mapping):
            items.extend(_flatten_stats(v, prefix=name + '/'))
        else:
            items.append((name, v))
    return items


def stats_to_float(stats: Mapping[str, Any]) -> Dict[str, float]:
    """Flattens nested statistics to {'a/b': float} with one device-to-host copy per device; a tensor with
    several entries (e.g. 'psnrs' per level) becomes 'psnrs/0', 'psnrs/1', ..."""
    names: List[str] = []
    by_device: Dict[torch.device, List[Tuple[List[str], torch.Tensor]]] = {}
    out: Dict[str, float] = {}
    for name, v in _flatten_stats(stats):
        if isinstance(v, torch.Tensor):
            v = v.detach().reshape(-1)
            keys = [name] if v.numel() == 1 else [f'{name}/{i}' for i in range(v.numel())]
            by_device.setdefault(v.device, []).append((keys, v.to(torch.float64)))
            names.extend(keys)
        elif v is not None:
            out[name] = float(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else float(v)
            names.append(name)
    for entries in by_device.values():
        values = torch.cat([v for _, v in entries]).cpu().numpy()
        i = 0
        for keys, _ in entries:
            for key in keys:
                out[key] = float(values[i])
                i += 1
    return {k: out[k] for k in names}
