"""Camera paths as nerfstudio camera_path.json (mipnerf360/camera_path.py, Config.render_path_file = '*.json').

Checked on the generated COLMAP scene (`colmap_scene`, poses known in the generator's = the input frame, which
the loader PCA-normalises): export -> load is exact (poses, intrinsics, size, fps); a hand-written file in the
input frame gives rays that hit the same scene points as the generator's camera; malformed files are one-line
DatasetErrors naming the key and the file; `render` with a json path writes its frames at the json's size and
the video at its fps (on test_cli_faults' tiny untrained checkpoint).
"""

import json
import re

import gin
import imageio_ffmpeg
import numpy as np
import pytest

from mipnerf360 import camera_path, camera_utils, configs, datasets, synthetic, utils
from mipnerf360.cli import render as render_cli
from scenes import config as _config
from scenes import load
from test_cli_faults import _flags, _run, setup  # noqa: F401  pylint: disable=unused-import


@pytest.fixture(autouse=True)
def _no_gin_state():
    """Each test starts and ends with no gin bindings (the CLIs parse theirs; Config() would pick them up)."""
    gin.clear_config()
    yield
    gin.clear_config()


def _export(argv):
    return camera_path.main(argv)


def _inverse_map(transform, origins, directions):
    """Rays of the normalised frame back in the input frame (directions keep their parametrisation)."""
    inv = np.linalg.inv(transform)
    return origins @ inv[:3, :3].T + inv[:3, 3], directions @ inv[:3, :3].T


@pytest.mark.parametrize('kw', [dict(factor=4), dict(factor=4, forward_facing=True)])
@pytest.mark.parametrize('frame', ['input', 'normalized'])
def test_export_then_load_is_exact(colmap_scene, tmp_path, kw, frame):
    d, info = colmap_scene
    out = str(tmp_path / 'camera_path.json')
    bindings = [f"Config.data_dir = '{d}'", 'Config.render_path_frames = 6', 'Config.render_video_fps = 24'] + [
            f'Config.{k} = {v!r}' for k, v in kw.items()]
    assert _export(['export', *[f'--gin_bindings={b}' for b in bindings], '--output', out, '--frame', frame]) == 0
    want = datasets.load_scene(_config(d, render_path=True, render_path_frames=6, **kw), 'test')
    with open(out) as f:
        data = json.load(f)
    assert (data['render_width'], data['render_height'], data['fps'], data['frame']) == (16, 12, 24, frame)
    assert data['camera_type'] == 'perspective' and len(data['camera_path']) == 6 and data['seconds'] == 0.25
    c2w = np.array([f['camera_to_world'] for f in data['camera_path']]).reshape(6, 4, 4)
    np.testing.assert_array_equal(c2w[:, 3], np.broadcast_to([0., 0., 0., 1.], (6, 4)))
    if frame == 'input':  # The centres are the normalised ones mapped back to the generator's (COLMAP) world.
        inv = np.linalg.inv(want.world_transform)
        np.testing.assert_allclose(c2w[:, :3, 3], want.camtoworlds[:, :3, 3] @ inv[:3, :3].T + inv[:3, 3],
                                   atol=1e-9)
        assert np.abs(c2w[:, :3, 3] - want.camtoworlds[:, :3, 3]).max() > 0.1
    fy = 1. / want.pixtocams[0, 1, 1]
    assert data['camera_path'][0]['fov'] == pytest.approx(np.degrees(2 * np.arctan(6. / fy)), rel=1e-12)

    got = datasets.load_scene(_config(d, render_path=True, render_path_file=out, **kw), 'test')
    np.testing.assert_allclose(got.camtoworlds, want.camtoworlds, atol=1e-6)
    np.testing.assert_allclose(got.pixtocams, want.pixtocams, rtol=1e-9)
    assert (got.width, got.height, got.size) == (16, 12, 6) and got.render_path and not got.render_spherical

    # fps reaches the video writer through Config.render_video_fps, unless a binding sets it.
    base = [f"Config.data_dir = '{d}'", 'Config.render_path = True', f"Config.render_path_file = '{out}'"]
    for extra, fps in (([], 24), (['Config.render_video_fps = 10'], 10)):
        gin.clear_config()
        assert configs.load_config(save_config=False, gin_configs=[], gin_bindings=base + extra).render_video_fps \
            == fps


def test_from_images_path_passes_through_the_chosen_views(colmap_scene, tmp_path):
    d, info = colmap_scene
    out = str(tmp_path / 'through.json')
    names = [info.names[i] for i in (1, 4, 6)]
    bindings = [f"Config.data_dir = '{d}'", 'Config.factor = 4', 'Config.render_spline_n_interp = 4',
                'Config.render_spline_smoothness = 0.', 'Config.render_spline_degree = 2']
    assert _export(['from-images', *[f'--gin_bindings={b}' for b in bindings], '--names', ','.join(names),
                    '--output', out]) == 0
    cpath = camera_path.read_camera_path(out)
    assert cpath.size == 8 and (cpath.width, cpath.height) == (16, 12)
    # Exact interpolation (smoothness 0) starts at the first keyframe: in the input frame that is the generator's
    # pose of the first named image; the frames are the spline helper's through the normalised poses, mapped back.
    np.testing.assert_allclose(cpath.camtoworlds[0], info.camtoworlds[1], atol=1e-6)
    scene = datasets.load_scene(_config(d, factor=4), 'train')
    spline = camera_utils.generate_interpolated_path(scene.poses[[1, 4, 6]], 4, spline_degree=2, smoothness=0.)
    np.testing.assert_allclose(cpath.camtoworlds,
                               camera_path.transform_poses(spline, np.linalg.inv(scene.world_transform)), atol=1e-9)
    assert _export(['from-images', f"--gin_bindings=Config.data_dir = '{d}'", '--names', 'nope.png,x.png',
                    '--output', out]) == 2


def test_hand_written_path_in_the_input_frame_sees_the_generated_scene(colmap_scene, tmp_path):
    """A camera_path.json through the generator's pose of image k: the rays (mapped back to the input frame)
    hit the same scene points as a pinhole camera of that fov at that pose, and the pose is the training
    camera's normalised pose."""
    d, info = colmap_scene
    k, width, height = 3, 32, 24
    focal = 0.5 / info.pixtocams[k][1, 1]  # The generator's fy at factor 2.
    fov = float(np.degrees(2 * np.arctan(0.5 * height / focal)))
    path = tmp_path / 'hand.json'
    path.write_text(json.dumps({
            'render_width': width, 'render_height': height, 'fps': 30, 'camera_type': 'perspective',
            'camera_path': [{'camera_to_world': camera_utils.pad_poses(info.camtoworlds[k]).reshape(-1).tolist(),
                             'fov': fov, 'aspect': width / height}]}))
    ds = load('test', d, _config(d, factor=2, render_path=True, render_path_file=str(path)))
    train = datasets.load_scene(_config(d, factor=2), 'train')
    np.testing.assert_allclose(ds.scene.camtoworlds[0], train.camtoworlds[train.split_names.index(info.names[k])],
                               atol=1e-6)
    assert (ds.scene.width, ds.scene.height) == (width, height)

    rays = ds.generate_ray_batch(0).rays
    o, dirs = _inverse_map(ds.scene.world_transform, rays.origins.reshape(-1, 3).double().numpy(),
                           rays.directions.reshape(-1, 3).double().numpy())
    py, px = np.meshgrid(np.arange(height) + .5, np.arange(width) + .5, indexing='ij')
    go, gd = synthetic.pixel_rays(info.camtoworlds[k], camera_utils.get_pixtocam(focal, width, height),
                                  px.reshape(-1), py.reshape(-1))
    _, _, t_true = synthetic.trace(go, gd)
    _, _, t = synthetic.trace(o, dirs)
    np.testing.assert_allclose(o + t[:, None] * dirs, go + t_true[:, None] * gd, atol=1e-4)
    assert np.ptp(t_true) > 0.5  # The rays see different depths (not only the background).


def _valid_path():
    return {'render_width': 8, 'render_height': 6, 'fps': 5, 'camera_type': 'perspective',
            'camera_path': [{'camera_to_world': np.eye(4).reshape(-1).tolist(), 'fov': 50., 'aspect': 4 / 3}] * 2}


def _drop(key):
    return lambda p: p.pop(key)


def _set_frame(i, key, value):
    def edit(p):
        p['camera_path'] = [dict(f) for f in p['camera_path']]
        if value is None:
            p['camera_path'][i].pop(key)
        else:
            p['camera_path'][i][key] = value
    return edit


_BAD = {
        'no_camera_path': (_drop('camera_path'), r'missing key "camera_path"'),
        'no_render_height': (_drop('render_height'), r'missing key "render_height"'),
        'zero_width': (lambda p: p.update(render_width=0), r'render_width = 0 must be an integer >= 1'),
        'empty_path': (lambda p: p.update(camera_path=[]), r'camera_path must be a non-empty list'),
        'no_matrix': (_set_frame(1, 'camera_to_world', None), r'camera_path\[1\] has no key "camera_to_world"'),
        'no_fov': (_set_frame(0, 'fov', None), r'camera_path\[0\] has no key "fov"'),
        'matrix_3x4': (_set_frame(1, 'camera_to_world', np.eye(4)[:3].reshape(-1).tolist()),
                       r'camera_path\[1\]\.camera_to_world must be 16 numbers .* got 12 values'),
        'matrix_text': (_set_frame(0, 'camera_to_world', ['1'] * 16), r'camera_path\[0\]\.camera_to_world must be'),
        'not_rigid': (_set_frame(0, 'camera_to_world', (2 * np.eye(4)).reshape(-1).tolist()),
                      r'camera_path\[0\]\.camera_to_world: the camera rotation is not orthonormal'),
        'fov_text': (_set_frame(0, 'fov', 'wide'), r"camera_path\[0\]\.fov = 'wide' must be a positive"),
        'fov_180': (_set_frame(0, 'fov', 180), r'camera_path\[0\]\.fov = 180 must be below 180'),
        'camera_type': (lambda p: p.update(camera_type='ortho'), r"camera_type = 'ortho' is not one of"),
        'frame': (lambda p: p.update(frame='world'), r"frame = 'world' is not one of input, normalized"),
        'negative_fps': (lambda p: p.update(fps=-1), r'fps = -1 must be a positive'),
}


@pytest.mark.parametrize('case', sorted(_BAD) + ['not_json', 'top_level_list', 'missing'])
def test_malformed_path_is_one_line_error_naming_key_and_file(colmap_scene, tmp_path, case):
    path = tmp_path / f'{case}.json'
    if case == 'not_json':
        path.write_text('{"render_width": 8,')
        pattern, err = 'is not valid JSON', datasets.DatasetError
    elif case == 'top_level_list':
        path.write_text(json.dumps(_valid_path()['camera_path']))
        pattern, err = 'the top level is a list, not an object', datasets.DatasetError
    elif case == 'missing':
        pattern, err = 'does not exist', datasets.DatasetNotFoundError
    else:
        data = _valid_path()
        edit, pattern = _BAD[case]
        err = datasets.DatasetError
        edit(data)
        path.write_text(json.dumps(data))
    with pytest.raises(err) as e:
        datasets.load_render_path_file(str(path))
    msg = str(e.value)
    assert str(path) in msg and '\n' not in msg
    assert re.search(pattern, msg), msg
    d, _ = colmap_scene  # The loader raises the same error.
    with pytest.raises(err, match=re.escape(msg)):
        datasets.load_scene(_config(d, factor=4, render_path=True, render_path_file=str(path)), 'test')


def test_valid_path_reads_as_written(tmp_path):
    """The valid file of the error cases, its pixtocams, `seconds` for `fps`, a normalised-frame path, and
    the panorama / fisheye camera types."""
    data = _valid_path()
    data['camera_path'][1] = dict(data['camera_path'][1], fov=30.)
    data.pop('fps')
    data.update(seconds=0.5, frame='normalized', camera_type='fisheye')
    path = tmp_path / 'ok.json'
    path.write_text(json.dumps(data))
    cpath = camera_path.read_camera_path(str(path))
    assert cpath.fps == 4. and cpath.frame == 'normalized' and cpath.camera_type == 'fisheye'
    transform = np.diag([2., 2., 2., 1.])
    np.testing.assert_array_equal(cpath.normalized_camtoworlds(transform), np.broadcast_to(np.eye(4)[:3], (2, 3, 4)))
    focal = 3. / np.tan(np.radians([25., 15.]))
    np.testing.assert_allclose(cpath.pixtocams(), [np.linalg.inv([[f, 0, 4], [0, f, 3], [0, 0, 1]]) for f in focal],
                               rtol=1e-12)
    # Another render size (Config.render_resolution) keeps the vertical field of view.
    np.testing.assert_allclose(1. / cpath.pixtocams(16, 12)[:, 1, 1], 2. * focal, rtol=1e-12)
    # A similarity moves the centres by its scale and rotation and keeps the camera rotations rigid.
    rot = np.array([[0., -1, 0], [1, 0, 0], [0, 0, 1]])
    sim = np.eye(4)
    sim[:3, :3], sim[:3, 3] = 3. * rot, [1., 2., 3.]
    pose = np.concatenate([np.eye(3), [[1.], [0.], [0.]]], 1)[None]
    moved = camera_path.transform_poses(pose, sim)
    np.testing.assert_allclose(moved[0], np.concatenate([rot, [[1.], [5.], [3.]]], 1), atol=1e-12)
    np.testing.assert_allclose(camera_path.transform_poses(moved, np.linalg.inv(sim)), pose, atol=1e-12)


def test_render_cli_renders_a_json_path_at_its_size_and_fps(setup, tmp_path, capsys):  # noqa: F811
    """`python -m render` with Config.render_path_file = camera_path.json (input frame, 3 frames, 20 x 14,
    fps 7) on the tiny checkpoint of test_cli_faults."""
    poses = synthetic.ring_poses(3, radius=2.5, seed=0)
    path = tmp_path / 'camera_path.json'
    path.write_text(json.dumps({
            'render_width': 20, 'render_height': 14, 'fps': 7, 'seconds': 3 / 7, 'camera_type': 'perspective',
            'camera_path': [{'camera_to_world': camera_utils.pad_poses(p).reshape(-1).tolist(), 'fov': 40.,
                             'aspect': 20 / 14} for p in poses]}))
    render_dir = tmp_path / 'renders'
    assert _run(render_cli, _flags(setup, 'Config.render_path = True', f"Config.render_path_file = '{path}'",
                                   f"Config.render_dir = '{render_dir}'")) == 0
    frames = sorted((render_dir / 'path_renders_step_5').glob('color_*.png'))
    assert [f.name for f in frames] == ['color_000.png', 'color_001.png', 'color_002.png']
    for f in frames:
        assert utils.load_img(str(f)).shape[:2] == (14, 20)
    videos = sorted(render_dir.glob('*_color.mp4'))
    assert len(videos) == 1
    reader = imageio_ffmpeg.read_frames(str(videos[0]))
    meta = next(reader)
    n = sum(1 for _ in reader)
    assert meta['fps'] == 7 and meta['size'] == (20, 14) and n == 3
    assert 'rendered in' in capsys.readouterr().out


def test_from_nerfstudio_frame_undoes_the_dataparser_transform():
    """nerfstudio's world = scale * (transform @ [input, 1]) (dataparser_transforms.json); the helper inverts it."""
    rng = np.random.default_rng(0)
    poses = synthetic.ring_poses(4, seed=3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    transform = np.concatenate([q * np.sign(np.linalg.det(q)), rng.normal(size=(3, 1))], 1)
    scale = 0.37
    ns = camera_path.transform_poses(poses, np.diag([scale] * 3 + [1.]) @ np.concatenate([transform, [[0, 0, 0, 1]]]))
    np.testing.assert_allclose(ns[:, :3, 3], scale * (poses[:, :3, 3] @ transform[:, :3].T + transform[:, 3]),
                               atol=1e-12)
    np.testing.assert_allclose(camera_path.from_nerfstudio_frame(ns, transform, scale), poses, atol=1e-12)
