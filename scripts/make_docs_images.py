"""Makes the README's pictures in docs/ from a trained model and the PLYs `python -m mipnerf360.export` wrote.

    python scripts/make_docs_images.py mesh --gin_config=configs/demo.gin --data_dir=demo_out/scene \
        --mesh=mesh.ply --points=points.ply --view=3 --output=docs/mesh.png
    python scripts/make_docs_images.py viewer --gin_config=configs/demo.gin --data_dir=demo_out/scene \
        --checkpoint_dir=demo_out/demo/synthetic360 --output=docs/viewer.png

`mesh`: a training image next to the mesh (vertex colours, then Lambert-shaded grey) and the point cloud, seen
from that training camera, rasterised in numpy: each triangle is splatted at a barycentric grid of points into
a z-buffer at twice the image size.
`viewer`: the viewer `python -m mipnerf360.view` serves (viewer.Viewer, here in this process, started behind the
first training camera), screenshotted in headless Chromium (tests/test_viewer.py's driver) after its final render.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, REPO)


def read_ply(path: str):
    """(vertices [n, 3], colours uint8 [n, 3], faces [f, 3] or None) of a PLY that mipnerf360.export wrote."""
    with open(path, 'rb') as f:
        header = []
        while not header or header[-1] != 'end_header':
            header.append(f.readline().decode('ascii').strip())
        data = f.read()
    n_vertex = next(int(h.split()[2]) for h in header if h.startswith('element vertex'))
    n_face = next((int(h.split()[2]) for h in header if h.startswith('element face')), 0)
    fields = [(h.split()[2], '<f4' if h.split()[1] == 'float' else 'u1')
              for h in header if h.startswith('property ') and 'list' not in h]
    vertex = np.frombuffer(data, dtype=fields, count=n_vertex)
    offset = vertex.nbytes
    faces = None
    if n_face:
        faces = np.frombuffer(data, dtype=[('n', 'u1'), ('v', '<i4', (3,))], count=n_face, offset=offset)['v']
    xyz = np.stack([vertex[c] for c in 'xyz'], -1).astype(np.float64)
    rgb = np.stack([vertex[c] for c in ('red', 'green', 'blue')], -1)
    return xyz, rgb, faces


def _load_scene(gin_config: str, data_dir: str):
    from mipnerf360 import configs, datasets
    config = configs.load_config(save_config=False, gin_configs=[gin_config],
                                 gin_bindings=[f"Config.data_dir = '{data_dir}'"])
    return datasets.load_scene(config, 'train')


def splat(points, colors, camtoworld, pixtocam, width, height, background=255):
    """Nearest-point z-buffer image [height, width, 3] of `points` (normalised frame) from an OpenGL camera."""
    rot, t = camtoworld[:3, :3], camtoworld[:3, 3]
    cam = (points - t) @ rot * np.array([1., -1., -1.])  # OpenCV axes: x right, y down, z forward.
    front = cam[:, 2] > 1e-6
    cam, colors = cam[front], colors[front]
    pix = cam @ np.linalg.inv(pixtocam).T
    u, v = pix[:, 0] / pix[:, 2], pix[:, 1] / pix[:, 2]
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    idx = v[inside].astype(np.int64) * width + u[inside].astype(np.int64)
    depth, colors = cam[inside, 2], colors[inside]
    zbuf = np.full(width * height, np.inf)
    np.minimum.at(zbuf, idx, depth)
    nearest = depth <= zbuf[idx]
    image = np.full((width * height, 3), background, np.uint8)
    image[idx[nearest]] = colors[nearest]
    return image.reshape(height, width, 3)


def _face_samples(vertices, faces, values, n=6):
    """`values` per vertex ([n, k]) on a barycentric grid of `n` steps per edge of every face."""
    weights = [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)]
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    va, vb, vc = (values[faces[:, i]] for i in range(3))
    pts = np.concatenate([wa * a + wb * b + wc * c for wa, wb, wc in weights])
    vals = np.concatenate([wa * va + wb * vb + wc * vc for wa, wb, wc in weights])
    return pts, vals


def mesh_picture(args):
    scene = _load_scene(args.gin_config, args.data_dir)
    to_normalized = np.asarray(scene.world_transform, np.float64)
    i = args.view
    scale = args.scale
    width, height = int(scene.widths[i]) * scale, int(scene.heights[i]) * scale
    pixtocam = scene.pixtocams[i] @ np.diag([1. / scale, 1. / scale, 1.])
    camtoworld = scene.camtoworlds[i]
    panels = [np.asarray(Image.fromarray(np.asarray(scene.images[i])).resize((width, height), Image.NEAREST))]

    vertices, colors, faces = read_ply(args.mesh)
    vertices = vertices @ to_normalized[:3, :3].T + to_normalized[:3, 3]
    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    centroids = vertices[faces].mean(1)
    to_eye = camtoworld[:3, 3] - centroids
    to_eye /= np.linalg.norm(to_eye, axis=-1, keepdims=True)
    shade = (0.25 + 0.75 * np.abs((normals * to_eye).sum(-1)))[:, None] * 230
    pts, vals = _face_samples(vertices, faces, colors.astype(np.float64))
    panels.append(splat(pts, vals.round().astype(np.uint8), camtoworld, pixtocam, width, height))
    panels.append(splat(pts, np.tile(shade.repeat(3, 1), (len(pts) // len(faces), 1)).astype(np.uint8), camtoworld, pixtocam,
                        width, height))
    if args.points:
        points, point_colors, _ = read_ply(args.points)
        points = points @ to_normalized[:3, :3].T + to_normalized[:3, 3]
        panels.append(splat(points, point_colors, camtoworld, pixtocam, width, height))
    gap = np.full((height, 4, 3), 255, np.uint8)
    strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], 1)
    _save(strip, args.output)


def viewer_picture(args):
    import test_viewer  # pylint: disable=import-outside-toplevel
    from mipnerf360 import configs, datasets, viewer  # pylint: disable=import-outside-toplevel
    from mipnerf360.cli import common  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    test_viewer.WINDOW = (args.width, args.height)
    config = configs.load_config(save_config=False, gin_configs=[args.gin_config], gin_bindings=[
        f"Config.data_dir = '{args.data_dir}'", f"Config.checkpoint_dir = '{args.checkpoint_dir}'",
        *args.gin_bindings])
    device = torch.device('cpu')
    model = common.build_model(config, device)
    step = common.restore_model(model, config, device)
    scene = datasets.load_scene(config, 'train')
    # The first training camera, moved back along its axis so its neighbours' frustums are in the picture.
    camtoworld = np.array(scene.camtoworlds[0], np.float64)
    camtoworld[:3, 3] += args.pull_back * camtoworld[:3, 2]
    view = viewer.Viewer(model, config, scene, port=test_viewer._free_port(), step=step,  # pylint: disable=protected-access
                         initial_camtoworld=camtoworld,
                         initial_fov=viewer.vertical_fov(scene.pixtocams[0], int(scene.heights[0])))
    browser = test_viewer._Chromium(view.url)  # pylint: disable=protected-access
    try:
        deadline = time.time() + args.timeout
        while time.time() < deadline and (view.last_final is None or view.last_final[:2] != test_viewer.WINDOW):
            time.sleep(.5)
        time.sleep(args.settle)  # The browser draws the received image asynchronously.
        # Headless Chromium has no GPU: hide viser's "software WebGL" notice, which a user would not see.
        browser.call('Runtime.evaluate', expression=(
            "document.querySelectorAll('.mantine-Notification-root, [class*=Notification]')"
            ".forEach(e => e.style.display = 'none')"))
        time.sleep(1)
        _save(browser.screenshot(), args.output)
    finally:
        browser.close()
        view.close()


def _save(image: np.ndarray, path: str, max_bytes: int = 300_000):
    """PNG at `path`; quantised to 256 colours when the full-colour file would be over `max_bytes`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture = Image.fromarray(image)
    picture.save(path, optimize=True)
    if os.path.getsize(path) > max_bytes:
        picture.quantize(256).save(path, optimize=True)
    print(f'Wrote {path} ({image.shape[1]}x{image.shape[0]}, {os.path.getsize(path) // 1024} KB)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='what', required=True)
    for name in ('mesh', 'viewer'):
        p = sub.add_parser(name)
        p.add_argument('--gin_config', required=True)
        p.add_argument('--data_dir', required=True)
        p.add_argument('--output', required=True)
    mesh = sub.choices['mesh']
    mesh.add_argument('--mesh', required=True, help='PLY from `python -m mipnerf360.export mesh` (input frame)')
    mesh.add_argument('--points', help='PLY from `python -m mipnerf360.export pointcloud` (input frame)')
    mesh.add_argument('--view', type=int, default=0, help='training view whose camera looks at the mesh')
    mesh.add_argument('--scale', type=int, default=2, help='picture size / the training image size')
    view = sub.choices['viewer']
    view.add_argument('--checkpoint_dir', required=True)
    view.add_argument('--gin_bindings', action='append', default=[])
    view.add_argument('--width', type=int, default=960)
    view.add_argument('--height', type=int, default=600)
    view.add_argument('--pull_back', type=float, default=1.5, help='camera moved back this far (normalised)')
    view.add_argument('--settle', type=float, default=3, help='seconds between the final render and the shot')
    view.add_argument('--timeout', type=float, default=300)
    args = parser.parse_args(argv)
    (mesh_picture if args.what == 'mesh' else viewer_picture)(args)


if __name__ == '__main__':
    main()
