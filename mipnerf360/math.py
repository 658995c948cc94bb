"""Numerical helpers shared by the rest of the package (port of multinerf's `internal/math.py`).

Everything here is a pure function of torch tensors that takes its device and dtype from its inputs.
Conventions for the interpolation helpers:
  x   [..., n]   query points.
  xp  [..., m]   knots, non-decreasing along the last axis.
  fp  [..., m]   values at the knots.
Leading dimensions of the three are broadcast against each other.
"""

from __future__ import annotations

import math as pymath
from typing import Tuple, Union

import torch

Number = Union[float, int]


def _assume_constant_result(fn):
    """`torch.compiler.assume_constant_result`'s whole effect (tests/test_compile.py checks it is the same), without
    its import of torch._dynamo: that costs every command about 1.3 s at start-up, compiling or not."""
    fn._dynamo_marked_constant = True  # pylint: disable=protected-access
    return fn


@_assume_constant_result
def _reduced_fp32_matmul(device_type: str) -> bool:
    """Whether a float32 `torch.matmul` on a `device_type` device may currently run at reduced (TF32 / bf16)
    precision. (torch.compile reads the global settings once, when it traces.)"""
    if torch.get_float32_matmul_precision() != 'highest':
        return True
    return device_type == 'cuda' and bool(torch.backends.cuda.matmul.allow_tf32)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product at the full precision of the inputs, whatever the global TF32 / autocast settings.

    Args:
        a: [..., i, j] tensor.
        b: [..., j, k] tensor.

    Returns:
        [..., i, k] product (batch dims broadcast as in `torch.matmul`).
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        if a.dtype == torch.float32 and a.dim() >= 2 and b.dim() >= 2 and _reduced_fp32_matmul(a.device.type):
            # Elementwise products and sums never use TF32, so this is exact float32 arithmetic.
            return torch.sum(a[..., :, :, None] * b[..., None, :, :], dim=-2)
        return torch.matmul(a, b)


SAFE_TRIG_PERIOD = 100 * pymath.pi  # Sine / cosine arguments at least this large are reduced modulo it.


def reduce_trig_arg(x: torch.Tensor, t: float = SAFE_TRIG_PERIOD) -> torch.Tensor:
    """x where |x| < t, else x mod t (in [0, t)), with t rounded to x's dtype as the reference does.

    `torch.remainder` on floating-point tensors is computed from the exact `fmod`, so x mod t is exact (for
    that rounded t). Differentiable (the derivative is 1 almost everywhere).

    Args:
        x: [...] tensor.
        t: the reduction period.

    Returns:
        [...] reduced tensor.
    """
    return torch.where(torch.abs(x) < t, x, torch.remainder(x, t))


def safe_trig_helper(x: torch.Tensor, fn, t: float = SAFE_TRIG_PERIOD) -> torch.Tensor:
    """Apply `fn` (sin or cos) to x, first reducing x modulo t wherever |x| >= t (see `reduce_trig_arg`).

    Large arguments are reduced because sin / cos of huge values can be inaccurate or NaN on some
    accelerators.

    Args:
        x: [...] tensor.
        fn: elementwise function, e.g. `torch.sin`.
        t: the reduction period (100 pi by default).

    Returns:
        [...] fn(x), or fn(x mod t) where |x| >= t.
    """
    return fn(reduce_trig_arg(x, t))


def safe_cos(x: torch.Tensor) -> torch.Tensor:
    """cos(x), robust to huge arguments (see `safe_trig_helper`)."""
    return safe_trig_helper(x, torch.cos)


def safe_sin(x: torch.Tensor) -> torch.Tensor:
    """sin(x), robust to huge arguments (see `safe_trig_helper`)."""
    return safe_trig_helper(x, torch.sin)


def _exp_clip(dtype: torch.dtype) -> float:
    """Largest integer c with exp(c) finite in `dtype`: 88 for float32 (the reference's value), 709 for float64."""
    return float(pymath.floor(pymath.log(torch.finfo(dtype).max)))


class _SafeExp(torch.autograd.Function):
    """exp(min(x, c)) whose derivative is that same clipped exponential, so it stays finite and positive."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.exp(torch.clamp_max(x, _exp_clip(x.dtype)))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        # Calling the Function again keeps double-backward working.
        return grad_y * _SafeExp.apply(x)

    @staticmethod
    def jvp(ctx, x_dot: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return x_dot * _SafeExp.apply(x)

    generate_vmap_rule = True


def safe_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) with finite output and finite gradient for large x.

    The forward pass is exp(min(x, c)) with c = 88 for float32 (exp(89) overflows float32) and the
    matching bound for other dtypes; the gradient is the same clipped exponential rather than zero, so a
    huge input is still pushed down.

    Args:
        x: [...] tensor.

    Returns:
        [...] tensor.
    """
    return _SafeExp.apply(x)


def log_lerp(t: Union[torch.Tensor, Number], v0: Number, v1: Number) -> torch.Tensor:
    """Interpolate log-linearly from v0 (t = 0) to v1 (t = 1); t is clipped to [0, 1].

    Args:
        t: [...] tensor or number.
        v0, v1: positive numbers.

    Returns:
        [...] tensor exp(lerp(log v0, log v1, clip(t, 0, 1))); float64 when t is a Python number.
    """
    if v0 <= 0 or v1 <= 0:
        raise ValueError(f'Interpolants {v0} and {v1} must be positive.')
    t = torch.as_tensor(t, dtype=None if isinstance(t, torch.Tensor) else torch.float64)
    lv0 = pymath.log(v0)
    lv1 = pymath.log(v1)
    return torch.exp(torch.clamp(t, 0, 1) * (lv1 - lv0) + lv0)


def learning_rate_decay(step: Union[torch.Tensor, Number],
                        lr_init: Number,
                        lr_final: Number,
                        max_steps: Number,
                        lr_delay_steps: Number = 0,
                        lr_delay_mult: Number = 1) -> torch.Tensor:
    """Log-linear learning-rate schedule with an optional sine warm-up.

    lr(step) = delay(step) * exp(lerp(log lr_init, log lr_final, clip(step / max_steps, 0, 1))), where
    delay(step) = lr_delay_mult + (1 - lr_delay_mult) * sin(pi/2 * clip(step / lr_delay_steps, 0, 1))
    when lr_delay_steps > 0, and 1 otherwise. So lr(0) = lr_init * lr_delay_mult and lr(max_steps) = lr_final.

    Args:
        step: the current optimisation step (number or tensor).
        lr_init: the rate at step 0 (before the warm-up multiplier).
        lr_final: the rate at step max_steps and after.
        max_steps: the length of the schedule.
        lr_delay_steps: length of the warm-up; 0 disables it.
        lr_delay_mult: the warm-up multiplier at step 0.

    Returns:
        [] (or step's shape) tensor, the learning rate; float64 when `step` is a Python number.
    """
    step_t = torch.as_tensor(step, dtype=None if isinstance(step, torch.Tensor) else torch.float64)
    if lr_delay_steps > 0:
        delay_rate = lr_delay_mult + (1 - lr_delay_mult) * torch.sin(
            0.5 * pymath.pi * torch.clamp(step_t / lr_delay_steps, 0, 1))
    else:
        delay_rate = 1.0
    return delay_rate * log_lerp(step_t / max_steps, lr_init, lr_final)


def _broadcast_leading(*args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Broadcast all but the last dimension of each tensor against the others; make them contiguous."""
    lead = torch.broadcast_shapes(*[a.shape[:-1] for a in args])
    return tuple(a.expand(*lead, a.shape[-1]).contiguous() for a in args)


def _knot_indices(x: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """For each x, the number of knots xp <= x (xp sorted along the last axis). Shapes as `_broadcast_leading`."""
    return torch.searchsorted(xp, x, right=True)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Batched `numpy.interp` (constant extrapolation), matching `jnp.interp` applied to each row.

    Args:
        x: [..., n] query points.
        xp: [..., m] knots, non-decreasing.
        fp: [..., m] values at the knots.

    Returns:
        [..., n] interpolated values (leading dims broadcast).
    """
    x, xp, fp = _broadcast_leading(x, xp, fp)
    m = xp.shape[-1]
    i = torch.clamp(_knot_indices(x, xp), 1, m - 1)
    xp0, xp1 = torch.gather(xp, -1, i - 1), torch.gather(xp, -1, i)
    fp0, fp1 = torch.gather(fp, -1, i - 1), torch.gather(fp, -1, i)
    dx = xp1 - xp0
    # A (near) zero-width knot interval takes its left value, which also keeps gradients finite. The threshold
    # is the spacing of floats at eps in xp's dtype, i.e. eps^2, as in `jnp.interp`.
    dx0 = torch.abs(dx) <= torch.finfo(xp.dtype).eps ** 2
    f = torch.where(dx0, fp0, fp0 + ((x - xp0) / torch.where(dx0, torch.ones_like(dx), dx)) * (fp1 - fp0))
    f = torch.where(x < xp[..., :1], fp[..., :1], f)
    f = torch.where(x > xp[..., -1:], fp[..., -1:], f)
    return f


def _find_interval(x: torch.Tensor, xp: torch.Tensor, *vals: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Bracketing knots for each x: for each v in vals, (v at the last knot <= x, v at the first knot > x).

    Where no knot is <= x the first knot is used for the lower value; where no knot is > x the last knot
    is used for the upper one. xp must be non-decreasing; x, xp and vals have matching leading dims.

    Returns:
        A tuple (v0_lo, v0_hi, v1_lo, v1_hi, ...) of [..., n] tensors, one pair per entry of vals.
    """
    m = xp.shape[-1]
    k = _knot_indices(x, xp)
    idx_lo = torch.clamp_min(k - 1, 0)
    idx_hi = torch.clamp_max(k, m - 1)
    out = []
    for v in vals:
        out += [torch.gather(v, -1, idx_lo), torch.gather(v, -1, idx_hi)]
    return tuple(out)


def sorted_interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Linear interpolation into (xp, fp), where both xp and fp are non-decreasing along the last axis.

    Same values as the reference's `sorted_interp` (constant extrapolation; a query on a repeated knot takes
    the value at the last copy of that knot). The reference finds the bracketing knots by a brute-force
    [n, m] comparison; here they come from a binary search, which gives the same knots for sorted inputs.

    Args:
        x: [..., n] query points.
        xp: [..., m] knots, non-decreasing.
        fp: [..., m] values, non-decreasing.

    Returns:
        [..., n] interpolated values (leading dims broadcast).
    """
    x, xp, fp = _broadcast_leading(x, xp, fp)
    xp0, xp1, fp0, fp1 = _find_interval(x, xp, xp, fp)
    offset = torch.clamp(torch.nan_to_num((x - xp0) / (xp1 - xp0), 0.0), 0, 1)
    return fp0 + offset * (fp1 - fp0)
