"""`python -m eval --gin_configs=... --gin_bindings=...`: renders the test split and writes metrics.

Outputs (in `checkpoint_dir/test_preds`, as the reference): color_XXX.png, color_cc_XXX.png,
distance_{mean,median}_XXX.tiff, acc_XXX.tiff, normals_XXX.png when predicted, the reference's
`metric_<name>_<step>.txt` / `metric_cc_<name>_<step>.txt` (one value per image), render_times_<step>.txt, and
`metrics.json` with the step, mean psnr / ssim (and lpips when available) and the per-image lists.
PSNR and SSIM are computed on 8-bit quantised images (`eval_quantize_metrics`), as the reference does.
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np
import torch

from mipnerf360 import checkpoints, image, models, raw_utils, ref_utils, utils, vis
from mipnerf360.cli import common

# Seconds between looks for a new checkpoint when evaluating in a loop (Config.eval_only_once = False).
_POLL_SECONDS = 10.


def _to_numpy(tree):
    return utils.tree_map(lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, tree)


def evaluate_once(model, dataset, config, step: int, out_dir: str, writer=None, log=print):
    """Renders every test image, computes the metrics and writes them; returns the metrics.json dict."""
    postprocess_fn = dataset.scene.metadata['postprocess_fn'] if config.rawnerf_mode else (lambda z, *_: z)
    cc_fun = raw_utils.match_images_affine if config.eval_raw_affine_cc else image.color_correct
    metric_harness = image.MetricHarness()
    if config.eval_save_output:
        os.makedirs(out_dir, exist_ok=True)
    path_fn = lambda x: os.path.join(out_dir, x)
    num_eval = min(dataset.size, config.eval_dataset_limit)
    train_frac = float(np.clip(step / config.max_steps, 0, 1))
    metrics, metrics_cc, render_times = [], [], []
    for idx in range(num_eval):
        t0 = time.time()
        batch = dataset.generate_ray_batch(idx)
        with common.no_grad_eval(model):
            rendering = models.render_image(functools.partial(model, train_frac=train_frac, compute_extras=True),
                                            batch.rays, None, config)
        rendering = _to_numpy(rendering)
        batch = _to_numpy(batch)
        render_times.append(time.time() - t0)
        gt_rgb = np.asarray(batch.rgb, dtype=np.float64)
        rendering['rgb'] = np.asarray(rendering['rgb'], dtype=np.float64)
        rendering['rgb_cc'] = np.asarray(cc_fun(rendering['rgb'], gt_rgb))

        rgb, rgb_cc, rgb_gt = (postprocess_fn(rendering['rgb']), postprocess_fn(rendering['rgb_cc']),
                               postprocess_fn(gt_rgb))
        if config.eval_quantize_metrics:
            # Metrics on exactly the 8-bit images written to disk.
            rgb = np.round(np.clip(rgb, 0, 1) * 255) / 255
            rgb_cc = np.round(np.clip(rgb_cc, 0, 1) * 255) / 255
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
        metrics.append(metric)
        metrics_cc.append(metric_cc)
        log(f'Image {idx + 1}/{num_eval}: rendered in {render_times[-1]:0.2f}s, ' +
                ', '.join(f'{k}={v:.4f}' for k, v in metric.items()))

        if config.eval_save_output and config.eval_render_interval > 0 and idx % config.eval_render_interval == 0:
            utils.save_img_u8(postprocess_fn(rendering['rgb']), path_fn(f'color_{idx:03d}.png'))
            utils.save_img_u8(postprocess_fn(rendering['rgb_cc']), path_fn(f'color_cc_{idx:03d}.png'))
            for key in ['distance_mean', 'distance_median']:
                if key in rendering:
                    utils.save_img_f32(rendering[key], path_fn(f'{key}_{idx:03d}.tiff'))
            if 'normals' in rendering:
                utils.save_img_u8(rendering['normals'] / 2. + 0.5, path_fn(f'normals_{idx:03d}.png'))
            utils.save_img_f32(rendering['acc'], path_fn(f'acc_{idx:03d}.tiff'))
            if writer is not None and idx < config.num_showcase_images:
                for k, v in vis.visualize_suite(rendering, batch.rays).items():
                    v = np.clip(np.asarray(v), 0, 1)
                    writer.add_image(f'output_{k}_{idx}', v, step, dataformats='HWC' if v.ndim == 3 else 'HW')

    summary = {'step': step, 'num_images': len(metrics)}
    names = list(metrics[0]) if metrics else []
    for name in names:
        summary[name] = float(np.mean([m[name] for m in metrics]))
    for name in (list(metrics_cc[0]) if metrics_cc else []):
        summary[f'cc_{name}'] = float(np.mean([m[name] for m in metrics_cc]))
    summary['per_image'] = {name: [m[name] for m in metrics] for name in names}
    summary['render_times'] = render_times
    os.makedirs(out_dir, exist_ok=True)
    with open(path_fn(f'render_times_{step}.txt'), 'w') as f:
        f.write(' '.join(str(r) for r in render_times))
    for name in names:
        with open(path_fn(f'metric_{name}_{step}.txt'), 'w') as f:
            f.write(' '.join(str(m[name]) for m in metrics))
    for name in (list(metrics_cc[0]) if metrics_cc else []):
        with open(path_fn(f'metric_cc_{name}_{step}.txt'), 'w') as f:
            f.write(' '.join(str(m[name]) for m in metrics_cc))
    tmp = path_fn('metrics.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path_fn('metrics.json'))
    if writer is not None:
        for name in names:
            writer.add_scalar(f'eval_metrics/{name}', summary[name], step)
        writer.add_scalar('eval_median_render_time', float(np.median(render_times)), step)
    if metric_harness.lpips_message:
        log(metric_harness.lpips_message)
    log(f'Step {step}: ' + ', '.join(f'{n}={summary[n]:.4f}' for n in names) + f'  (written to {out_dir})')
    return summary


def main(unused_argv):
    config = common.load_config(for_training=False)
    if config.eval_only_once:
        common.require_checkpoint(config)
    out_dir = os.path.join(config.checkpoint_dir, 'path_renders' if config.render_path else 'test_preds')
    common.ensure_output_dir(out_dir, 'Config.checkpoint_dir')
    device = common.get_device(config)
    dataset = common.load_dataset('test', config, device)
    torch.manual_seed(config.seed)
    model = models.Model(config=config).to(device)
    writer = None
    if not config.eval_only_once:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(config.checkpoint_dir, 'eval'))
    num_steps = config.early_exit_steps if config.early_exit_steps is not None else config.max_steps
    last_step = 0
    try:
        while True:
            path = checkpoints.latest_checkpoint(config.checkpoint_dir)
            step = checkpoints.step_of(path) if path else 0
            if step <= last_step:
                print(f'Checkpoint step {step} <= last evaluated step {last_step}; waiting for a new one.',
                      flush=True)
                time.sleep(_POLL_SECONDS)
                continue
            step = common.restore_model(model, config, device, path=path)
            print(f'Evaluating checkpoint {path} (step {step}).', flush=True)
            evaluate_once(model, dataset, config, step, out_dir, writer)
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
