"""`python -m mipnerf360.export {pointcloud,mesh} --gin_configs=... --gin_bindings=... --output PATH.ply`.

Takes the same gin flags as train / eval / render (the newest checkpoint of `Config.checkpoint_dir` on the scene
of `Config.data_dir`) and writes a binary PLY:
  pointcloud: the training views' rendered surface points (opacity >= --min_acc, inside --bbox), coloured, with
      normals when the model predicts them; --voxel_size averages them per voxel.
  mesh: --method tsdf (default) fuses the training views' rendered depth into a TSDF grid over --bbox at
      --resolution voxels along its longest side, then marching cubes; --method density runs marching cubes on
      the NeRF MLP's density at --density_threshold (default: the density where a few training views' rays reach
      an accumulated opacity of 0.5, see export.surface_density_level).
--bbox and --voxel_size are in the model's normalised frame (default box: around the point the cameras look at);
the result is written in the input data's frame (--frame input, e.g. COLMAP's) or the model's (--frame normalized).
"""

from __future__ import annotations

import os
from typing import Optional

from absl import flags

from mipnerf360 import datasets, export, train_utils
from mipnerf360.cli import common

MODES = ('pointcloud', 'mesh')
_DEFINED = False


def define_flags():
    global _DEFINED
    if _DEFINED:
        return
    flags.DEFINE_string('output', None, 'PLY file to write (its folder is created).')
    flags.DEFINE_float('min_acc', 0.9, 'Keep only rays whose accumulated opacity is at least this (pointcloud, and '
                       'the depth used by the TSDF).')
    flags.DEFINE_float('voxel_size', 0., 'pointcloud: average the points per voxel of this edge (normalised '
                       'frame); 0 keeps every point.')
    flags.DEFINE_list('bbox', None, 'x0,y0,z0,x1,y1,z1 of the box to export, in the normalised frame (default: '
                      'a cube around the point the cameras look at).')
    flags.DEFINE_enum('method', 'tsdf', list(export.METHODS), 'mesh: TSDF fusion of rendered depth, or '
                      'marching cubes on the MLP density.')
    flags.DEFINE_integer('resolution', 256, 'mesh: voxels along the longest side of the box.', lower_bound=2)
    flags.DEFINE_float('density_threshold', None, 'mesh --method density: the density iso-level (default: the '
                       'median density where the rays of %d training views reach an accumulated opacity of 0.5).'
                       % export.AUTO_LEVEL_VIEWS)
    flags.DEFINE_enum('frame', 'input', list(export.FRAMES), "Frame of the output: the input data's own "
                      "(e.g. COLMAP's sparse/0) or the model's normalised one.")
    flags.DEFINE_integer('export_chunk', None, 'Voxels processed at once (default 2^20 for the TSDF, 2^16 for '
                         'the density; lower it if device memory runs out).', lower_bound=1)
    _DEFINED = True


def _mode(argv) -> str:
    args = list(argv[1:])
    if len(args) != 1 or args[0] not in MODES:
        raise export.ExportError(f'Expected one command, pointcloud or mesh, after `python -m mipnerf360.export`; '
                                 f'got {args or "none"}.')
    return args[0]


def _output_path() -> str:
    path = flags.FLAGS.output
    if not path:
        raise export.ExportError('--output is not set; add --output=PATH.ply.')
    if not path.lower().endswith('.ply'):
        raise export.ExportError(f'--output = {path!r} must end in .ply (a binary PLY is written).')
    if os.path.isdir(path):
        raise export.ExportError(f'--output = {path!r} is a folder; give a file name ending in .ply.')
    common.ensure_output_dir(os.path.dirname(os.path.abspath(path)), '--output')
    return path


def _user_bbox() -> Optional[export.BBox]:
    if flags.FLAGS.bbox is None:
        return None
    try:
        values = [float(v) for v in flags.FLAGS.bbox]
    except ValueError:
        raise export.ExportError(f'--bbox = {",".join(flags.FLAGS.bbox)} is not six numbers; give '
                                 'x0,y0,z0,x1,y1,z1 (in the normalised frame).') from None
    return export.check_bbox(values)


def main(argv):
    mode = _mode(argv)
    f = flags.FLAGS
    config = common.load_config(for_training=False)
    common.require_checkpoint(config)
    output = _output_path()
    export.check_min_acc(f.min_acc)
    if f.voxel_size < 0:
        raise export.ExportError(f'--voxel_size = {f.voxel_size} must be positive (or 0 to keep every point).')
    bbox = _user_bbox()
    if mode == 'mesh':
        export.require_skimage()
    device = common.get_device(config)
    scene = datasets.load_scene(config, 'train')
    if bbox is None:
        bbox = export.default_bbox(scene.camtoworlds)
    grid = export.Grid.over(bbox, f.resolution)
    model = common.build_model(config, device)
    step = common.restore_model(model, config, device)
    model.eval()
    train_frac = train_utils.eval_train_frac(step, config)
    print(f'Exporting {mode} from step {step}; box {export.format_bbox(bbox)} (normalised frame).', flush=True)
    transform = export.frame_transform(scene.world_transform, f.frame)
    chunk = {} if f.export_chunk is None else {'chunk': f.export_chunk}
    sampler = datasets.RaySampler(scene, config, device)
    if mode == 'mesh' and f.method == 'density':
        level = f.density_threshold
        if level is None:
            views = export.render_views(model, sampler, config, train_frac,
                                        indices=export.auto_level_views(sampler.size))
            level = export.surface_density_level(model.nerf_mlp, views, grid.h, f.min_acc, bbox, **chunk)
            print(f'Density level {level:.4g} (median density where the rendered opacity reaches 0.5; set '
                  '--density_threshold to override).', flush=True)
        mesh = export.mesh_from_density(model.nerf_mlp, bbox, f.resolution, level, **chunk)
    else:
        views = export.render_views(model, sampler, config, train_frac)
        if mode == 'pointcloud':
            cloud = export.point_cloud(views, f.min_acc, bbox, f.voxel_size or None)
            export.write_point_cloud(output, export.transform_point_cloud(cloud, transform))
            print(f'Wrote {len(cloud.points)} points to {output} ({f.frame} frame).', flush=True)
            return
        print(f'TSDF grid {grid.shape[0]}x{grid.shape[1]}x{grid.shape[2]}, voxel {grid.h:.4g}.', flush=True)
        volume = export.tsdf_fusion(views, bbox, f.resolution, min_acc=f.min_acc, device=device, **chunk)
        mesh = export.mesh_from_tsdf(volume)
    export.write_mesh(output, export.transform_mesh(mesh, transform))
    print(f'Wrote a mesh of {len(mesh.vertices)} vertices and {len(mesh.faces)} faces to {output} '
          f'({f.frame} frame).', flush=True)


def run(argv=None):
    define_flags()
    common.run(main, 'export', argv)


if __name__ == '__main__':
    run()
