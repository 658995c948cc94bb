"""`RaySampler`: a `Scene`'s images and cameras on the model's device, served as batches of rays.

- Training batches (`get_train_batch(step)`) are a pure function of `(config.seed, step, rank)`: the global batch
  of `Config.batch_size` rays is drawn with a `torch.Generator` seeded from `(seed, step)`, and rank `r` of
  `world_size` processes takes slice `r` of it, so N processes together see exactly the batch one process draws
  (this differs from drawing an independent batch per rank: ranks > 0 see other rays than before that change;
  the single-process stream is unchanged). A resumed run sees exactly the batches of an uninterrupted one.
- 8-bit images stay uint8 on the device (converted to float32, `u8 / 255`, only for the gathered pixels);
  images of different sizes share one flat pixel buffer with per-image offsets. Pixel indices are drawn on the
  device and rays are cast there (`camera_utils.pixels_to_rays(..., xnp=torch)`); a training batch makes no
  host sync. With `Config.cast_rays_in_train_step` training batches hold `utils.Pixels` instead of `utils.Rays`
  (cast later with `cameras`).
- 'all_images' batching draws patches uniformly over all valid patch positions of all training images,
  'single_image' over those of one random image.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mipnerf360 import camera_utils
from mipnerf360 import configs
from mipnerf360 import raw_utils
from mipnerf360 import utils
from mipnerf360.datasets.scene import DatasetError, Scene, image_as_float


def _seed_for(seed: int, step: int) -> int:
    """A 63-bit generator seed that is a pure function of (seed, step) (the same on every rank, which slices the
    global batch; the trailing 0 keeps the streams of when the rank was hashed in)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 0]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class _FlatImages:
    """Images `[H_i, W_i, ...]` of any sizes as one `[sum H_i W_i, ...]` tensor; uint8 stays uint8."""

    def __init__(self, images: Sequence[np.ndarray], device: torch.device):
        arrs: List[np.ndarray] = [np.asarray(a) for a in images]
        sizes = np.array([a.shape[0] * a.shape[1] for a in arrs], dtype=np.int64)
        dtype = np.uint8 if all(a.dtype == np.uint8 for a in arrs) else np.float32
        if dtype != np.uint8:  # 8-bit images among float ones are scaled to [0, 1] like the float ones.
            arrs = [image_as_float(a).astype(dtype, copy=False) for a in arrs]
        flat = np.concatenate([a.reshape((-1,) + a.shape[2:]) for a in arrs])
        self.pixels = torch.as_tensor(flat, device=device)
        self.offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), device=device)
        self.widths = torch.as_tensor(np.array([a.shape[1] for a in arrs], dtype=np.int64), device=device)

    def gather(self, cam_idx: torch.Tensor, pix_y: torch.Tensor, pix_x: torch.Tensor) -> torch.Tensor:
        """float32 values at the pixels (long tensors of one shape SH): `SH + [...]`."""
        values = self.pixels[self.offsets[cam_idx] + pix_y * self.widths[cam_idx] + pix_x]
        if values.dtype == torch.uint8:
            return values.to(torch.float32) / 255.
        return values


class RaySampler:
    """Serves the rays of a `Scene` on `device`: training batches, whole test images, `cameras` for the train
    step's ray casting; `next()` cycles over the whole images (test views)."""

    def __init__(self, scene: Scene, config: configs.Config, device: Any = None, rank: int = 0,
                 world_size: int = 1):
        if device is None:
            device = config.device if config.device is not None else 'cpu'
        self.scene = scene
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self._seed = int(getattr(config, 'seed', 0))
        self._patch_size = max(int(config.patch_size), 1)
        if self._patch_size ** 2 > config.batch_size // self.world_size:
            raise DatasetError(f'Patch size {self._patch_size}^2 is too large for the per-process batch size '
                               f'{config.batch_size // self.world_size}; lower Config.patch_size or raise '
                               'Config.batch_size.')
        self._global_patches = config.batch_size // self._patch_size ** 2
        if self._global_patches % self.world_size:
            raise DatasetError(f'Config.batch_size = {config.batch_size} holds {self._global_patches} patches of '
                               f'{self._patch_size}^2 rays, which {self.world_size} processes cannot share '
                               'equally; make batch_size / patch_size^2 a multiple of the number of processes.')
        self._num_patches = self._global_patches // self.world_size
        self._batching = utils.BatchingMethod(config.batching)
        self._border = config.num_border_pixels_to_mask
        self._apply_bayer_mask = config.apply_bayer_mask
        self._load_disps = config.compute_disp_metrics
        self._load_normals = config.compute_normal_metrics
        self._train = scene.split == utils.DataSplit.TRAIN
        self._cast_in_train_step = config.cast_rays_in_train_step and self._train
        self._next_idx = 0
        self._setup_tensors()

    # -- Tensors on the device. ---------------------------------------------------------------------------------

    def _setup_tensors(self):
        s, dev = self.scene, self.device
        f32 = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32), device=dev)
        self._pixtocams_t = f32(s.pixtocams)
        self._camtoworlds_t = f32(s.camtoworlds[:, :3, :4])
        self._pixtocam_ndc_t = None if s.pixtocam_ndc is None else f32(s.pixtocam_ndc)
        distortion = None
        if s.distortion_params is not None:
            if any(np.ndim(v) > 0 for v in s.distortion_params.values()):
                distortion = {k: f32(np.broadcast_to(v, (s.size,))) for k, v in s.distortion_params.items()}
            else:
                distortion = {k: float(v) for k, v in s.distortion_params.items()}
        self._distortion_t = distortion
        self.cameras = (self._pixtocams_t, self._camtoworlds_t, distortion, self._pixtocam_ndc_t)
        self._exposures_t = None if s.exposures is None else f32(s.exposures)
        self._render_exposures_t = None if s.render_exposures is None else f32(s.render_exposures)
        self._metadata_t = None
        if s.metadata is not None:
            self._metadata_t = {k: torch.as_tensor(np.asarray(s.metadata[k]), device=dev)
                                for k in ['exposure_idx', 'exposure_values']}
        flat = lambda imgs: None if imgs is None else _FlatImages(list(imgs), dev)
        self._rgb = flat(s.images)
        self._disps = flat(s.disp_images)
        self._normals = flat(s.normal_images)
        self._alphas = flat(s.alphas)
        # Valid top-left corners of patches in each image, and their running count ('all_images' sampling).
        widths, heights = torch.as_tensor(s.widths, device=dev), torch.as_tensor(s.heights, device=dev)
        lo, hi = self._border, self._border + self._patch_size - 1
        self._valid_w = torch.clamp(widths - lo - hi, min=0)
        self._valid_h = torch.clamp(heights - lo - hi, min=0)
        counts = self._valid_w * self._valid_h
        if self._train and self._rgb is not None and int(counts.min()) <= 0:
            raise DatasetError(f'Some images of {s.data_dir} are smaller than the patch size plus masked '
                               'border; lower Config.patch_size or Config.num_border_pixels_to_mask.')
        self._cum_counts = torch.cumsum(counts, 0)
        self._total_count = int(self._cum_counts[-1]) if s.size else 0

    @property
    def size(self) -> int:
        return self.scene.size

    @property
    def camtype(self) -> camera_utils.ProjectionType:
        return self.scene.camtype

    # -- Batches. -----------------------------------------------------------------------------------------------

    def cast_rays(self, pixels: utils.Pixels) -> utils.Rays:
        """Rays (on the device) for a batch of pixels of this scene's cameras."""
        return camera_utils.cast_ray_batch(self.cameras, pixels, self.camtype, xnp=torch)

    def _make_ray_batch(self, pix_x_int: torch.Tensor, pix_y_int: torch.Tensor, cam_idx: torch.Tensor,
                        lossmult: Optional[torch.Tensor] = None, cast: bool = True) -> utils.Batch:
        """A Batch for integer pixel coordinates and camera indices (long tensors on the device, broadcastable
        to one shape SH); ray fields are `SH + [C]`. `cast=False` keeps `utils.Pixels`."""
        pix_x_int, pix_y_int, cam_idx = torch.broadcast_tensors(pix_x_int, pix_y_int, cam_idx)
        shape = pix_x_int.shape
        full = lambda v: torch.full(shape + (1,), float(v), device=self.device, dtype=torch.float32)
        kw: Dict[str, Any] = {
                'lossmult': full(1.) if lossmult is None else lossmult.to(self.device, torch.float32),
                'near': full(self.scene.near),
                'far': full(self.scene.far),
                'cam_idx': cam_idx[..., None],
        }
        render_path = self.scene.render_path
        src_idx = torch.zeros_like(cam_idx) if render_path else cam_idx  # A path takes image 0's exposure.
        if self._metadata_t is not None:
            for key in ['exposure_idx', 'exposure_values']:
                kw[key] = self._metadata_t[key][src_idx][..., None]
        if self._exposures_t is not None:
            kw['exposure_values'] = self._exposures_t[src_idx][..., None]
        if render_path and self._render_exposures_t is not None:
            kw['exposure_values'] = self._render_exposures_t[cam_idx][..., None]
        pixels = utils.Pixels(pix_x_int, pix_y_int, **kw)
        batch: Dict[str, Any] = {'rays': self.cast_rays(pixels) if cast else pixels}
        if self._rgb is not None:
            batch['rgb'] = self._rgb.gather(cam_idx, pix_y_int, pix_x_int)
        if self._load_disps and self._disps is not None:
            batch['disps'] = self._disps.gather(cam_idx, pix_y_int, pix_x_int)
        if self._load_normals and self._normals is not None:
            batch['normals'] = self._normals.gather(cam_idx, pix_y_int, pix_x_int)
            batch['alphas'] = self._alphas.gather(cam_idx, pix_y_int, pix_x_int)
        return utils.Batch(**batch)

    def train_generator(self, step: int) -> torch.Generator:
        """The torch.Generator (on the device) that draws the global batch of `step` (the same on every rank)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_seed_for(self._seed, step))
        return gen

    def get_train_batch(self, step: int) -> utils.Batch:
        """The training batch of `step` for this rank: slice `rank` of the global batch of `step`.

        Patches of `patch_size`^2 pixels (1 = single rays) are drawn uniformly, with replacement, over all valid
        patch positions of all training images ('all_images') or of one random image ('single_image').
        Returns a Batch with fields `[num_patches, patch_size, patch_size, C]`.
        """
        gen = self.train_generator(step)
        dev = self.device
        p = self._patch_size
        mine = slice(self.rank * self._num_patches, (self.rank + 1) * self._num_patches)
        lo = self._border
        if self._batching == utils.BatchingMethod.ALL_IMAGES:
            flat = torch.randint(0, self._total_count, (self._global_patches,), generator=gen, device=dev)[mine]
            cam_idx = torch.searchsorted(self._cum_counts, flat, right=True)
            vw = self._valid_w[cam_idx]
            local = flat - (self._cum_counts[cam_idx] - vw * self._valid_h[cam_idx])
            pix_x = lo + local % vw
            pix_y = lo + torch.div(local, vw, rounding_mode='floor')
        else:
            cam = torch.randint(0, self.size, (1,), generator=gen, device=dev)
            cam_idx = cam.expand(self._num_patches)
            u = torch.rand((2, self._global_patches), generator=gen, device=dev, dtype=torch.float64)[:, mine]
            pix_x = lo + torch.minimum((u[0] * self._valid_w[cam]).long(), self._valid_w[cam] - 1)
            pix_y = lo + torch.minimum((u[1] * self._valid_h[cam]).long(), self._valid_h[cam] - 1)
        offs = torch.arange(p, device=dev)
        pix_x = pix_x[:, None, None] + offs[None, None, :]
        pix_y = pix_y[:, None, None] + offs[None, :, None]
        cam_idx = cam_idx[:, None, None]
        lossmult = raw_utils.pixels_to_bayer_mask(pix_x, pix_y) if self._apply_bayer_mask else None
        return self._make_ray_batch(pix_x, pix_y, cam_idx, lossmult=lossmult, cast=not self._cast_in_train_step)

    def generate_ray_batch(self, cam_idx: int) -> utils.Batch:
        """The whole image of camera `cam_idx`: fields `[H_i, W_i, C]` on the device."""
        cam_idx = int(cam_idx)
        s = self.scene
        if s.render_spherical:
            rays = camera_utils.cast_spherical_rays(self._camtoworlds_t[cam_idx], s.height, s.width, s.near, s.far,
                                                    xnp=torch)
            return utils.Batch(rays=rays)
        w, h = int(s.widths[cam_idx]), int(s.heights[cam_idx])
        pix_y, pix_x = torch.meshgrid(torch.arange(h, device=self.device), torch.arange(w, device=self.device),
                                      indexing='ij')
        return self._make_ray_batch(pix_x, pix_y, torch.full_like(pix_x, cam_idx))

    def __iter__(self):
        return self

    def __next__(self) -> utils.Batch:
        """The next whole image (0, 1, ..., size - 1, 0, ...)."""
        batch = self.generate_ray_batch(self._next_idx)
        self._next_idx = (self._next_idx + 1) % self.size
        return batch

    def close(self):
        """Nothing to release (a RaySampler runs no thread); there so callers can close any dataset."""
