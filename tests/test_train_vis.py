"""Training's tensorboard test render (cli/train.py `_render_test_view`): metrics on the full image, images
decimated by `Config.vis_decimate` as the reference's train.py does."""

from __future__ import annotations

import numpy as np
import torch

from mipnerf360 import configs, image, models, utils
from mipnerf360.cli import train as train_cli


class _Writer:
    def __init__(self):
        self.images, self.scalars = {}, {}

    def add_image(self, tag, img, step, dataformats):  # pylint: disable=unused-argument
        self.images[tag] = np.asarray(img)

    def add_scalar(self, tag, value, step):  # pylint: disable=unused-argument
        self.scalars[tag] = value


def _test_case(h, w):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    viewdirs = torch.nn.functional.normalize(r(h, w, 3) - 0.5, dim=-1)
    ones = torch.ones(h, w, 1)
    rays = utils.Rays(origins=r(h, w, 3) - 0.5, directions=viewdirs, viewdirs=viewdirs, radii=0.01 * ones,
                      imageplane=r(h, w, 2), lossmult=ones, near=0.2 * ones, far=5. * ones,
                      cam_idx=torch.zeros(h, w, 1, dtype=torch.long))
    return utils.Batch(rays=rays, rgb=r(h, w, 3))


def _render(vis_decimate):
    config = configs.Config(vis_decimate=vis_decimate, render_chunk_size=256)
    torch.manual_seed(0)
    model = models.Model(config=config)
    case = _test_case(12, 15)
    writer = _Writer()
    train_cli._render_test_view(model, iter([case]), config, writer, image.MetricHarness(), 0.5, 1,
                                lambda msg: None)
    return case, writer


def test_vis_decimate_shrinks_the_tensorboard_images_not_the_metrics():
    case, full = _render(0)
    _, small = _render(3)
    np.testing.assert_array_equal(full.images['test_true_color'], case.rgb.numpy())
    np.testing.assert_array_equal(small.images['test_true_color'], case.rgb.numpy()[::3, ::3])
    for tag in ('test_output_color', 'test_output_acc', 'test_output_depth_mean'):
        assert small.images[tag].shape[:2] == (4, 5), tag
    np.testing.assert_allclose(small.images['test_output_color'], full.images['test_output_color'][::3, ::3],
                               atol=1e-6)
    # The metrics are those of the full 12x15 image (same model and rays, so equal; SSIM needs 11+ pixels).
    assert small.scalars['train_metrics/psnr'] == full.scalars['train_metrics/psnr']
    assert np.isfinite(full.scalars['train_metrics/psnr']) and np.isfinite(small.scalars['train_metrics/ssim'])
