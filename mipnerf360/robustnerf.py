"""The RobustNeRF inlier mask (Sabour et al., "RobustNeRF: Ignoring Distractors with Robust Losses", 2023).

Training batches are square patches (`Config.patch_size`); a pixel's loss counts only if the pixel is an
inlier: its error is below the threshold (the `robustnerf_inlier_quantile` of last step's errors), or enough of
its 3x3 neighbourhood is, or it lies in the central `robustnerf_inner_patch_size` square of a patch that is
mostly inliers. Port of multinerf's `internal/robustnerf.py`.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch
import torch.nn.functional as F


def robustnerf_mask(errors: torch.Tensor, loss_threshold: Union[float, torch.Tensor],
                    config: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Binary inlier mask for a batch of patches.

    Args:
        errors: [n, h, w, c] per-channel errors (squared residuals) of n patches.
        loss_threshold: scalar; pixels whose mean error is below it are inliers (the previous step's
            'loss_threshold' statistic).
        config: supplies robustnerf_inlier_quantile, enable_robustnerf_loss, robustnerf_smoothed_filter_size,
            robustnerf_smoothed_inlier_quantile, robustnerf_inner_patch_size,
            robustnerf_inner_patch_inlier_quantile, patch_size.

    Returns:
        mask: [n, h, w, 1] in {0, 1} (all ones when the loss is disabled), broadcastable against errors.
        stats: 'loss_threshold' (the next threshold: the inlier quantile of the per-pixel errors), 'mask' (the
            inlier fraction) and, when enabled, 'is_inlier_loss', 'has_inlier_neighbors', 'is_inlier_patch'.
    """
    eps = 1e-3
    dtype = errors.dtype
    error_per_pixel = errors.mean(dim=-1, keepdim=True)  # [n, h, w, 1]
    flat = error_per_pixel.detach().reshape(-1)
    next_loss_threshold = torch.quantile(flat, config.robustnerf_inlier_quantile)
    mask = torch.ones_like(error_per_pixel)
    stats = {'loss_threshold': next_loss_threshold}
    if config.enable_robustnerf_loss:
        if config.robustnerf_inner_patch_size > config.patch_size:
            raise ValueError(f'Config.robustnerf_inner_patch_size ({config.robustnerf_inner_patch_size}) must not '
                             f'exceed Config.patch_size ({config.patch_size}).')
        is_inlier_pixel = (error_per_pixel < loss_threshold).to(dtype)
        stats['is_inlier_loss'] = is_inlier_pixel.mean()

        # Box-filter the inlier indicator over f x f neighbourhoods (zero padding outside the patch).
        f = config.robustnerf_smoothed_filter_size
        window = torch.full((1, 1, f, f), 1.0 / (f * f), dtype=dtype, device=errors.device)
        smoothed = F.conv2d(is_inlier_pixel.permute(0, 3, 1, 2), window, padding='same').permute(0, 2, 3, 1)
        has_inlier_neighbors = (smoothed > 1 - config.robustnerf_smoothed_inlier_quantile).to(dtype)
        stats['has_inlier_neighbors'] = has_inlier_neighbors.mean()
        is_inlier_pixel = (has_inlier_neighbors + is_inlier_pixel > eps).to(dtype)

        inner_patch_mask = _robustnerf_inner_patch_mask(config.robustnerf_inner_patch_size, config.patch_size,
                                                        dtype=dtype, device=errors.device)
        is_inlier_patch = is_inlier_pixel.mean(dim=(1, 2), keepdim=True)  # [n, 1, 1, 1]
        is_inlier_patch = (is_inlier_patch > 1 - config.robustnerf_inner_patch_inlier_quantile).to(dtype)
        is_inlier_patch = is_inlier_patch * inner_patch_mask
        stats['is_inlier_patch'] = is_inlier_patch.mean()

        mask = (is_inlier_patch + is_inlier_pixel > eps).to(dtype)

    stats['mask'] = mask.mean()
    return mask, stats


def _robustnerf_inner_patch_mask(inner_patch_size: int, outer_patch_size: int, *, dtype=torch.float32,
                                 device=None) -> torch.Tensor:
    """[1, outer, outer, 1] mask: 1 on the centred inner x inner square (offset floor((outer - inner) / 2)),
    0 elsewhere."""
    lo = (outer_patch_size - inner_patch_size) // 2
    mask = torch.zeros((1, outer_patch_size, outer_patch_size, 1), dtype=dtype, device=device)
    mask[:, lo:lo + inner_patch_size, lo:lo + inner_patch_size, :] = 1
    return mask
