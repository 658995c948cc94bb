"""`python -m eval --gin_configs=... --gin_bindings=...`: renders the test split and writes metrics.

Outputs (in `checkpoint_dir/test_preds`, as the reference): color_XXX.png, color_cc_XXX.png,
distance_{mean,median}_XXX.tiff, acc_XXX.tiff, normals_XXX.png when predicted (Ref-NeRF: also
normals_pred_XXX.png and roughness_XXX.tiff), the reference's
`metric_<name>_<step>.txt` / `metric_cc_<name>_<step>.txt` (one value per image), render_times_<step>.txt, and
`metrics.json` with the step, mean psnr / ssim (and lpips when available) and the per-image lists.
PSNR and SSIM are computed on 8-bit quantised images (`eval_quantize_metrics`), as the reference does.
All files are written atomically. A non-finite metric (a diverged model) is written as null in metrics.json
(which stays valid JSON) and the command exits with status 2 and one line. When evaluating in a loop, the
`num_showcase_images` showcase images (the same ones each time with `deterministic_showcase`, decimated by
`vis_decimate`) go to tensorboard; `eval_save_ray_data` writes their ray samples to ray_data_<step>_<i>.txt.
`torchrun --nproc_per_node=N -m eval` splits the test images across the ranks; rank 0 writes the metrics.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import numpy as np
import torch

from mipnerf360 import checkpoints, image, models, raw_utils, ref_utils, train_utils, utils, vis
from mipnerf360.cli import common
from mipnerf360.cli import render as render_cli

# Seconds between looks for a new checkpoint when evaluating in a loop (Config.eval_only_once = False).
_POLL_SECONDS = 10.


def _to_numpy(tree):
    return utils.tree_map(lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, tree)


def showcase_indices(config, num_eval: int, step: int) -> np.ndarray:
    """The test images shown in tensorboard (and whose ray data is saved): `num_showcase_images` of them drawn
    by a permutation seeded with 0 when `deterministic_showcase` (the same images every step), else the step."""
    perm = np.random.default_rng(0 if config.deterministic_showcase else step).permutation(num_eval)
    return np.sort(perm[:config.num_showcase_images])


def _decimate(tree, d: int):
    """x[::d, ::d] on every image leaf (`vis_decimate`: smaller tensorboard images); d <= 1 keeps them."""
    if d <= 1:
        return tree
    return utils.tree_map(lambda x: x[::d, ::d] if getattr(x, 'ndim', 0) >= 2 else x, tree)


def _finite_or_none(values):
    return [float(v) if np.isfinite(v) else None for v in values]


def _gather(obj, world_size: int):
    """Every rank's `obj`, in rank order (gloo all_gather_object); [obj] when not distributed."""
    if world_size <= 1:
        return [obj]
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _quantize_8bit(img: np.ndarray) -> np.ndarray:
    """`img` as the 8-bit PNG eval writes of it (`utils.to_uint8`), back in [0, 1] at its precision; NaN stays
    NaN, so a diverged render still gives non-finite metrics."""
    out = utils.to_uint8(img).astype(img.dtype) / 255
    out[np.isnan(img)] = np.nan
    return out


def _image_metrics(config, rendering, batch, metric_harness, cc_fun, postprocess_fn):
    """PSNR / SSIM (and disparity / normal errors where the data has them) of one rendered test image, plain and
    colour-corrected; adds 'rgb_cc' to `rendering`."""
    gt_rgb = np.asarray(batch.rgb, dtype=np.float64)
    rendering['rgb'] = np.asarray(rendering['rgb'], dtype=np.float64)
    rendering['rgb_cc'] = np.asarray(cc_fun(rendering['rgb'], gt_rgb))
    rgb, rgb_cc, rgb_gt = (postprocess_fn(rendering['rgb']), postprocess_fn(rendering['rgb_cc']),
                           postprocess_fn(gt_rgb))
    if config.eval_quantize_metrics:
        rgb, rgb_cc = _quantize_8bit(rgb), _quantize_8bit(rgb_cc)
    if config.eval_crop_borders > 0:
        c = config.eval_crop_borders
        rgb, rgb_cc, rgb_gt = rgb[c:-c, c:-c], rgb_cc[c:-c, c:-c], rgb_gt[c:-c, c:-c]
    metric = metric_harness(rgb, rgb_gt)
    metric_cc = metric_harness(rgb_cc, rgb_gt)
    if config.compute_disp_metrics and batch.disps is not None:
        for tag in ['mean', 'median']:
            key = f'distance_{tag}'
            if key in rendering:
                disparity = 1 / (1 + rendering[key])
                metric[f'disparity_{tag}_mse'] = float(((disparity - batch.disps)**2).mean())
    if config.compute_normal_metrics and batch.normals is not None:
        weights = torch.as_tensor(rendering['acc'] * batch.alphas)
        normals_gt = ref_utils.l2_normalize(torch.as_tensor(batch.normals))
        for key, val in rendering.items():
            if key.startswith('normals') and val is not None:
                metric[key + '_mae'] = float(ref_utils.compute_weighted_mae(
                        weights, ref_utils.l2_normalize(torch.as_tensor(val)), normals_gt))
    metric = {k: float(v) for k, v in metric.items() if v is not None}
    metric_cc = {k: float(v) for k, v in metric_cc.items() if v is not None}
    return metric, metric_cc


def _save_image_outputs(rendering, idx: int, path_fn, postprocess_fn):
    """The reference's per-image eval outputs: colour, colour-corrected, distances, normals, acc."""
    utils.save_img_u8(postprocess_fn(rendering['rgb']), path_fn(f'color_{idx:03d}.png'))
    utils.save_img_u8(postprocess_fn(rendering['rgb_cc']), path_fn(f'color_cc_{idx:03d}.png'))
    for key in ['distance_mean', 'distance_median']:
        if key in rendering:
            utils.save_img_f32(rendering[key], path_fn(f'{key}_{idx:03d}.tiff'))
    if 'normals' in rendering:
        utils.save_img_u8(rendering['normals'] / 2. + 0.5, path_fn(f'normals_{idx:03d}.png'))
    render_cli.save_refnerf_outputs(rendering, path_fn, f'{idx:03d}')
    utils.save_img_f32(rendering['acc'], path_fn(f'acc_{idx:03d}.tiff'))


def _write_showcases(config, showcases, step: int, writer, path_fn, postprocess_fn):
    """Showcase images to tensorboard (decimated by `vis_decimate`) and, with `eval_save_ray_data`, their rays."""
    if writer is not None:
        for i, r, b in showcases:
            # The ray_* bundles are [rays, samples], not images: they stay whole.
            r = {k: v if k.startswith('ray_') else _decimate(v, config.vis_decimate) for k, v in r.items()}
            b = _decimate(b, config.vis_decimate)
            for k, v in vis.visualize_suite(r, b.rays).items():
                v = np.clip(np.asarray(postprocess_fn(v) if k == 'color' else v), 0, 1)
                writer.add_image(f'output_{k}_{i}', v, step, dataformats='HWC' if v.ndim == 3 else 'HW')
    if config.eval_save_output and config.eval_save_ray_data:
        with np.printoptions(threshold=sys.maxsize):
            for i, r, _ in showcases:
                utils.save_text(path_fn(f'ray_data_{step}_{i}.txt'), repr({k: v for k, v in r.items() if 'ray_' in k}))


def _summarise(results, step: int):
    """Mean metrics over the images {idx: (metric, metric_cc, render_time)}, with the per-image lists."""
    ordered = [results[i] for i in sorted(results)]
    metrics = [m for m, _, _ in ordered]
    metrics_cc = [m for _, m, _ in ordered]
    names = list(metrics[0]) if metrics else []
    names_cc = list(metrics_cc[0]) if metrics_cc else []
    summary = {'step': step, 'num_images': len(metrics)}
    for name in names:
        summary[name] = float(np.mean([m[name] for m in metrics]))
    for name in names_cc:
        summary[f'cc_{name}'] = float(np.mean([m[name] for m in metrics_cc]))
    return summary, metrics, metrics_cc, [t for _, _, t in ordered]


def _write_metric_files(summary, metrics, metrics_cc, render_times, non_finite, step: int, out_dir: str):
    """The reference's metric_<name>_<step>.txt and render_times_<step>.txt, and metrics.json (valid JSON:
    non-finite values written as null and listed under 'non_finite')."""
    path_fn = lambda x: os.path.join(out_dir, x)
    names = list(metrics[0]) if metrics else []
    os.makedirs(out_dir, exist_ok=True)
    utils.save_text(path_fn(f'render_times_{step}.txt'), ' '.join(str(r) for r in render_times))
    for name in names:
        utils.save_text(path_fn(f'metric_{name}_{step}.txt'), ' '.join(str(m[name]) for m in metrics))
    for name in (list(metrics_cc[0]) if metrics_cc else []):
        utils.save_text(path_fn(f'metric_cc_{name}_{step}.txt'), ' '.join(str(m[name]) for m in metrics_cc))
    doc = {k: (None if k in non_finite else v) for k, v in summary.items()}
    doc['per_image'] = {name: _finite_or_none([m[name] for m in metrics]) for name in names}
    doc['render_times'] = render_times
    if non_finite:
        doc['non_finite'] = non_finite
    utils.save_text(path_fn('metrics.json'), json.dumps(doc, indent=1, allow_nan=False))


def evaluate_once(model, dataset, config, step: int, out_dir: str, writer=None, log=print, rank: int = 0,
                  world_size: int = 1):
    """Renders every test image, computes the metrics and writes them; returns the metrics.json dict.

    Under torchrun rank r renders the images r, r + world_size, ...; rank 0 gathers the per-image metrics and
    writes the metric files and metrics.json (all ranks return the summary). Non-finite metrics (a diverged
    model) are written as null in metrics.json (valid JSON) and raise MetricsError after every file is written.
    """
    postprocess_fn = dataset.scene.metadata['postprocess_fn'] if config.rawnerf_mode else (lambda z, *_: z)
    cc_fun = raw_utils.match_images_affine if config.eval_raw_affine_cc else image.color_correct
    metric_harness = image.MetricHarness()
    if config.eval_save_output:
        os.makedirs(out_dir, exist_ok=True)
    path_fn = lambda x: os.path.join(out_dir, x)
    num_eval = min(dataset.size, config.eval_dataset_limit)
    train_frac = train_utils.eval_train_frac(step, config)
    showcase = set(showcase_indices(config, num_eval, step).tolist())
    keep_showcases = writer is not None or config.eval_save_ray_data
    results, showcases = {}, []
    for idx in range(rank, num_eval, world_size):
        t0 = time.time()
        batch = dataset.generate_ray_batch(idx)
        with common.no_grad_eval(model):
            rendering = models.render_image(functools.partial(model, train_frac=train_frac, compute_extras=True),
                                            batch.rays, None, config)
        rendering = _to_numpy(rendering)
        batch = _to_numpy(batch)
        render_time = time.time() - t0
        metric, metric_cc = _image_metrics(config, rendering, batch, metric_harness, cc_fun, postprocess_fn)
        results[idx] = (metric, metric_cc, render_time)
        log(f'Image {idx + 1}/{num_eval}: rendered in {render_time:0.2f}s, ' +
                ', '.join(f'{k}={v:.4f}' for k, v in metric.items()))
        if keep_showcases and idx in showcase:
            showcase_idx = idx if config.deterministic_showcase else len(showcases)
            showcases.append((showcase_idx, rendering, batch))
        if config.eval_save_output and config.eval_render_interval > 0 and idx % config.eval_render_interval == 0:
            _save_image_outputs(rendering, idx, path_fn, postprocess_fn)
    _write_showcases(config, showcases, step, writer, path_fn, postprocess_fn)

    for part in _gather(results, world_size):
        results.update(part)
    summary, metrics, metrics_cc, render_times = _summarise(results, step)
    names = list(metrics[0]) if metrics else []
    non_finite = sorted(k for k, v in summary.items() if isinstance(v, float) and not np.isfinite(v))
    if rank == 0:
        _write_metric_files(summary, metrics, metrics_cc, render_times, non_finite, step, out_dir)
    summary['per_image'] = {name: [m[name] for m in metrics] for name in names}
    summary['render_times'] = render_times
    if writer is not None:
        for name in names:
            if name not in non_finite:
                writer.add_scalar(f'eval_metrics/{name}', summary[name], step)
        writer.add_scalar('eval_median_render_time', float(np.median(render_times)), step)
    if non_finite:
        raise common.MetricsError(
            f'Step {step}: non-finite metrics ({", ".join(non_finite)}): the model renders NaN/Inf, so it has '
            f'diverged or its checkpoint is damaged; {path_fn("metrics.json")} records them as null. Retrain (e.g. '
            'with a lower Config.lr_init) or evaluate an earlier checkpoint.')
    log(f'Step {step}: ' + ', '.join(f'{n}={summary[n]:.4f}' for n in names) + f'  (written to {out_dir})')
    return summary


def main(unused_argv):
    rank, world_size, local_rank = common.distributed_env()
    config = common.load_config(for_training=False)
    if config.eval_only_once:
        common.require_checkpoint(config)
    out_dir = os.path.join(config.checkpoint_dir, 'path_renders' if config.render_path else 'test_preds')
    common.ensure_output_dir(out_dir, 'Config.checkpoint_dir')
    device = common.get_device(config, local_rank)
    dataset = common.load_dataset('test', config, device)
    writer = None
    try:
        model = common.build_model(config, device)
        if not config.eval_only_once and rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(config.checkpoint_dir, 'eval'))
        num_steps = config.early_exit_steps if config.early_exit_steps is not None else config.max_steps
        last_step = 0
        log = print if rank == 0 else (lambda *a, **k: None)
        with common.distributed_group(world_size, device):
            while True:
                path = common.broadcast_object(checkpoints.latest_checkpoint(config.checkpoint_dir), world_size)
                step = checkpoints.step_of(path) if path else 0
                if step <= last_step:
                    log(f'Checkpoint step {step} <= last evaluated step {last_step}; waiting for a new one.',
                        flush=True)
                    time.sleep(_POLL_SECONDS)
                    continue
                step = common.restore_model(model, config, device, path=path)
                log(f'Evaluating checkpoint {path} (step {step}).', flush=True)
                with common.output_errors('Config.checkpoint_dir'):
                    evaluate_once(model, dataset, config, step, out_dir, writer, log=log, rank=rank,
                                  world_size=world_size)
                if config.eval_only_once or step >= num_steps:
                    break
                last_step = step
    finally:
        dataset.close()
        if writer is not None:
            writer.close()


def run(argv=None):
    common.run(main, 'eval', argv)


if __name__ == '__main__':
    run()
