"""Input checks of the loaders (mipnerf360/datasets/): bit depth from the image mode, images/ and images_N/
matched by file stem, camera sanity at load, missing JSON keys as one-line DatasetErrors."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mipnerf360 import datasets
from scenes import config as _config


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'RGB', 'RGBA', 'I;16'])
def test_bit_depth_comes_from_the_image_mode(tmp_path, mode):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = str(tmp_path / 'im.png')
    if mode == 'I;16':
        deep = grey.astype(np.uint16)  # Every value <= 255: a guess from the values would say 8-bit.
        Image.fromarray(deep).save(path)
        want = np.repeat((deep / 65535.).astype(np.float32)[..., None], 3, -1)
    elif mode == 'P':
        Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE, colors=16).save(path)
        want = np.asarray(Image.open(path).convert('RGB'))  # The palette's colours, not its indices.
    elif mode in ('L', 'LA'):
        Image.fromarray(grey).convert(mode).save(path)
        want = np.repeat(grey[..., None], 3, -1)
    else:
        Image.fromarray(rgb).convert(mode).save(path)
        want = rgb
    assert Image.open(path).mode == mode
    img = datasets.load_rgb(path)
    assert img.shape == (5, 7, 3) and img.dtype == want.dtype
    np.testing.assert_array_equal(img, want)


def _copy(colmap_scene, tmp_path, name):
    d, info = colmap_scene
    return str(shutil.copytree(d, tmp_path / name)), info


def test_images_n_matched_by_stem(colmap_scene, tmp_path):
    d, _ = colmap_scene
    want = datasets.load_scene(_config(d, factor=2), 'test')
    # images_2 as BMP (lossless), listed in another order than images/: paired by name.
    s, info = _copy(colmap_scene, tmp_path, 'bmp')
    folder = os.path.join(s, 'images_2')
    for i, n in enumerate(sorted(info.names)):
        Image.open(os.path.join(folder, n)).save(os.path.join(folder, f'{os.path.splitext(n)[0]}.bmp'))
        os.remove(os.path.join(folder, n))
    got = datasets.load_scene(_config(s, factor=2), 'test')
    np.testing.assert_array_equal(got.images, want.images)
    # A folder that renames every file (LLFF's release) is paired by sorted position.
    for i, n in enumerate(sorted(os.listdir(folder))):
        os.rename(os.path.join(folder, n), os.path.join(folder, f'image{i:03d}.bmp'))
    np.testing.assert_array_equal(datasets.load_scene(_config(s, factor=2), 'test').images, want.images)


def test_images_n_missing_or_extra_file(colmap_scene, tmp_path):
    s, info = _copy(colmap_scene, tmp_path, 'missing')
    name = sorted(info.names)[3]
    os.remove(os.path.join(s, 'images_2', name))
    stem = os.path.splitext(name)[0]
    with pytest.raises(datasets.DatasetError, match=rf'images_2 has no image named {stem}\.\* for .*images/{name}'):
        datasets.load_scene(_config(s, factor=2), 'train')
    s, info = _copy(colmap_scene, tmp_path, 'extra')
    shutil.copy(os.path.join(s, 'images_2', info.names[0]), os.path.join(s, 'images_2', 'stray.png'))
    with pytest.raises(datasets.DatasetError, match=r'images_2/stray.png has no counterpart in .*images \(1 extra'):
        datasets.load_scene(_config(s, factor=2), 'train')


def _nerfstudio_scene(tmp_path, **frame_kw):
    """One 8x6 image with a transforms.json frame (`frame_kw` overrides the frame's keys, None deletes one)."""
    os.makedirs(tmp_path / 'images')
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / 'images' / 'a.png')
    frame = {'file_path': 'images/a.png', 'fl_x': 10., 'transform_matrix': np.eye(4).tolist()}
    frame.update(frame_kw)
    frame = {k: v for k, v in frame.items() if v is not None}
    with open(tmp_path / 'transforms.json', 'w') as fp:
        json.dump({'frames': [frame, frame]}, fp)
    return str(tmp_path)


@pytest.mark.parametrize('frame_kw,match', [
        (dict(fl_x=None), r"transforms.json: frame 0 \(images/a.png\) has no 'fl_x' nor 'camera_angle_x'"),
        (dict(transform_matrix=None), r"transforms.json: frame 0 \(images/a.png\) has no 'transform_matrix' key"),
        (dict(file_path=None), r"transforms.json: frame 0 has no 'file_path' key"),
        (dict(transform_matrix=[[1, 0], [0, 1]]), r'transform_matrix of frame 0 .* 4x4 matrix, got shape \(2, 2\)'),
        (dict(transform_matrix=(np.eye(4) * 2).tolist()), r'frame 0 \(images/a.png\): the camera rotation is not '
                                                          r'orthonormal \(max \|R\^T R - I\| = 3\)'),
        (dict(transform_matrix=np.full((4, 4), np.nan).tolist()), r'frame 0 .*: the camera pose contains NaN'),
        (dict(fl_x=0.), r'frame 0 \(images/a.png\): the intrinsics must be finite with positive focal lengths'),
        (dict(fl_x=-10.), r'frame 0 \(images/a.png\): the intrinsics must be finite with positive focal lengths'),
])
def test_transforms_json_checks(tmp_path, frame_kw, match):
    s = _nerfstudio_scene(tmp_path, **frame_kw)
    with pytest.raises(datasets.DatasetError, match=match):
        datasets.load_scene(_config(s, dataset_loader='nerfstudio', llffhold=2), 'train')


def test_valid_transforms_json_loads(tmp_path):
    s = _nerfstudio_scene(tmp_path)
    scene = datasets.load_scene(_config(s, dataset_loader='nerfstudio', llffhold=2, forward_facing=True), 'train')
    np.testing.assert_allclose(np.linalg.inv(scene.pixtocams[0]), [[10, 0, 4], [0, 10, 3], [0, 0, 1]], rtol=1e-6)


def test_blender_missing_camera_angle(tmp_path):
    os.makedirs(tmp_path / 'train')
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / 'train' / 'r_0.png')
    with open(tmp_path / 'transforms_train.json', 'w') as fp:
        json.dump({'frames': [{'file_path': './train/r_0', 'transform_matrix': np.eye(4).tolist()}]}, fp)
    with pytest.raises(datasets.DatasetError, match=r"transforms_train.json: the top level has no 'camera_angle_x'"):
        datasets.load_scene(_config(str(tmp_path), dataset_loader='blender'), 'train')
    with open(tmp_path / 'transforms_train.json', 'w') as fp:
        json.dump({'camera_angle_x': 0.7}, fp)
    with pytest.raises(datasets.DatasetError, match=r"transforms_train.json: the file has no 'frames' key"):
        datasets.load_scene(_config(str(tmp_path), dataset_loader='blender'), 'train')


def test_poses_bounds_bounds_checked(tmp_path):
    os.makedirs(tmp_path / 'images')
    for n in ('a.png', 'b.png'):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / 'images' / n)
    row = np.concatenate([np.concatenate([[[0, 1, 0], [1, 0, 0], [0, 0, -1]], np.zeros((3, 1)),
                                          [[6], [8], [10]]], 1).ravel(), [1., 5.]])
    bad = row.copy()
    bad[15:] = [2., 1.]
    np.save(tmp_path / 'poses_bounds.npy', np.stack([row, bad]))
    with pytest.raises(datasets.DatasetError, match=r'poses_bounds.npy row 1 \(b.png\) has bounds near=2, far=1'):
        datasets.load_scene(_config(str(tmp_path), factor=0), 'train')
