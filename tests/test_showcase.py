"""scripts/make_docs_images.py: it reads back what mipnerf360.export writes and projects like the dataset cameras."""

import importlib.util
import os

import numpy as np

from mipnerf360 import export

_SPEC = importlib.util.spec_from_file_location(
    'make_docs_images', os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts', 'make_docs_images.py'))
docs_images = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(docs_images)


def test_read_ply_reads_what_export_writes(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3)).astype(np.float32)
    colors = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    normals = rng.normal(size=(50, 3)).astype(np.float32)
    faces = rng.integers(0, 50, (20, 3))
    export.write_ply(str(tmp_path / 'm.ply'), points, colors, normals, faces)
    xyz, rgb, read_faces = docs_images.read_ply(str(tmp_path / 'm.ply'))
    np.testing.assert_array_equal(xyz, points)
    np.testing.assert_array_equal(rgb, colors)
    np.testing.assert_array_equal(read_faces, faces)
    export.write_ply(str(tmp_path / 'p.ply'), points, colors)
    assert docs_images.read_ply(str(tmp_path / 'p.ply'))[2] is None


def test_splat_projects_like_an_opengl_camera_and_keeps_the_nearest():
    # Camera at (0, 0, 1) looking down -z (OpenGL), focal 10, principal point (8, 6) of a 16 x 12 image.
    camtoworld = np.array([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]])
    pixtocam = np.linalg.inv(np.array([[10., 0, 8], [0, 10, 6], [0, 0, 1]]))
    # x = 0.4, y = 0.2 at distance 2: pixel (8 + 10 * 0.4 / 2, 6 - 10 * 0.2 / 2) = (10, 5); a farther point on
    # the same ray, a point behind the camera and one outside the image are hidden.
    points = np.array([[0.4, 0.2, -1.], [0.8, 0.4, -3.], [0., 0., 2.], [5., 0., -1.]])
    colors = np.array([[10, 20, 30], [200, 200, 200], [1, 1, 1], [2, 2, 2]], np.uint8)
    image = docs_images.splat(points, colors, camtoworld, pixtocam, 16, 12)
    np.testing.assert_array_equal(image[5, 10], [10, 20, 30])
    image[5, 10] = 255
    assert (image == 255).all()
