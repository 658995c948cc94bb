"""The live viewer (mipnerf360/viewer.py, python -m mipnerf360.view, Config.viewer_port).

- viser camera -> rays: against the closed form of a pinhole camera in viser's documented convention (OpenCV
  axes, P_world = R p_camera + t, vertical field of view), with rotations from scipy's quaternions.
- Progressive levels (coarse while the camera moves, finer while it rests) and the weight hand-over of
  `Viewer.update` (nothing copied while nobody watches; a copy, not a view, when someone does).
- In a real browser (headless Chromium through the DevTools protocol): the page shows the model rendered
  from the browser's camera, which starts at a test camera; its screenshot matches `models.render_image` of
  that camera's own rays (colour and depth), and not that of another camera.
- `python -m mipnerf360.view` serves the page and stops on SIGTERM; train with `Config.viewer_port` serves it
  while training. Skipped with the reason when viser or chromium is missing.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from mipnerf360 import camera_utils, configs, datasets, models, synthetic, viewer
from mipnerf360.cli import common
from syncguard import no_host_sync

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 100
WINDOW = (640, 480)  # The browser's viewport: 20 screen pixels per rendered pixel of the 32 x 24 test images.
BAR_DB = 35.  # Screenshot vs direct render of the same camera (46.8 dB measured); another camera: 25.9 dB.
DEPTH_BAR_DB = 30.  # The same for the depth view (33.7 dB measured).

try:
    import viser  # noqa: F401  pylint: disable=unused-import
    from websockets.sync.client import connect as ws_connect
    HAVE_VISER = True
except ImportError:
    HAVE_VISER = False
needs_viser = pytest.mark.skipif(not HAVE_VISER, reason="viser is not installed (pip install '.[viewer]')")
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason='chromium is not installed (apt-get install chromium)')

TINY_GIN = """
include 'configs/360.gin'
Config.factor = 2
Config.batch_size = 256
Config.render_chunk_size = 4096
Config.max_steps = {steps}
Config.lr_init = 0.01
Config.lr_final = 0.001
Config.lr_delay_steps = 20
Config.checkpoint_every = 100
Config.print_every = 50
Config.train_render_every = 0
Model.num_prop_samples = 16
Model.num_nerf_samples = 16
PropMLP.net_depth = 1
PropMLP.net_width = 32
PropMLP.basis_shape = 'octahedron'
PropMLP.basis_subdivisions = 1
NerfMLP.net_depth = 2
NerfMLP.net_width = 64
NerfMLP.bottleneck_width = 32
NerfMLP.basis_shape = 'octahedron'
NerfMLP.basis_subdivisions = 1
"""


def _psnr(a, b):
    return float(-10 * np.log10(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


# -- Cameras (no viser needed). --------------------------------------------------------------------------------

def _random_quaternions(n, seed=0):
    q = np.random.default_rng(seed).normal(size=(n, 4))
    q[0] = [0., 1., 0., 0.]  # 180 degrees about x (w = 0): the quaternion's other branches.
    q[1] = [0., 0., 1e-9, 1.]
    return q


def test_quaternions_match_scipy_and_invert():
    for wxyz in _random_quaternions(20):
        expected = Rotation.from_quat(np.roll(wxyz, -1)).as_matrix()  # scipy orders (x, y, z, w).
        np.testing.assert_allclose(viewer.quaternion_to_matrix(wxyz), expected, atol=1e-12)
        back = viewer.matrix_to_quaternion(expected)
        unit = wxyz / np.linalg.norm(wxyz)
        np.testing.assert_allclose(back, unit if np.dot(back, unit) > 0 else -unit, atol=1e-9)


@pytest.mark.parametrize('seed', [0, 1])
def test_viser_camera_rays_match_closed_form(seed):
    """A viser camera (OpenCV axes: x right, y down, z forward; vertical fov) -> our rays."""
    rng = np.random.default_rng(seed)
    wxyz = rng.normal(size=4)
    position = rng.normal(size=3)
    width, height, fov = 7, 5, 0.9
    rays = viewer.viewer_rays(wxyz, position, fov, width, height, near=0.5, far=3.)
    rotation = Rotation.from_quat(np.roll(wxyz, -1)).as_matrix()
    focal = height / 2 / np.tan(fov / 2)
    y, x = np.mgrid[:height, :width] + .5
    cam = np.stack([(x - width / 2) / focal, (y - height / 2) / focal, np.ones_like(x)], -1)  # OpenCV camera.
    directions = cam @ rotation.T
    np.testing.assert_allclose(rays.directions.numpy(), directions, atol=1e-6)
    np.testing.assert_allclose(rays.origins.numpy(), np.broadcast_to(position, (height, width, 3)), atol=1e-6)
    np.testing.assert_allclose(rays.viewdirs.numpy(), directions / np.linalg.norm(directions, axis=-1,
                                                                                  keepdims=True), atol=1e-6)
    # The right and lower neighbours are 1 / focal away (a rotation keeps lengths): radius (1 / f) 2 / sqrt(12).
    np.testing.assert_allclose(rays.radii.numpy(), np.full((height, width, 1), 2 / np.sqrt(12) / focal), rtol=1e-5)
    np.testing.assert_allclose(rays.near.numpy(), .5)
    np.testing.assert_allclose(rays.far.numpy(), 3.)
    # Our OpenGL camera-to-world: looking along -z, y up, and back to the same viser camera.
    c2w = viewer.viser_to_camtoworld(wxyz, position)
    np.testing.assert_allclose(c2w[:, 2], -rotation[:, 2], atol=1e-12)
    np.testing.assert_allclose(c2w[:, 1], -rotation[:, 1], atol=1e-12)
    q, p = viewer.camtoworld_to_viser(c2w)
    unit = wxyz / np.linalg.norm(wxyz)
    np.testing.assert_allclose(q, unit if np.dot(q, unit) > 0 else -unit, atol=1e-9)
    np.testing.assert_allclose(p, position)


def test_viewer_rays_match_a_dataset_camera(colmap_scene):
    """A scene's camera, handed to the viewer as viser's camera with its vertical field of view, casts the rays of
    that pose through a centred pinhole with the camera's vertical focal length."""
    data_dir, _ = colmap_scene
    config = configs.Config(data_dir=data_dir, factor=4, batch_size=64)
    sampler = datasets.RaySampler(datasets.load_scene(config, 'test', data_dir), config)
    scene = sampler.scene
    width, height = scene.width, scene.height
    wxyz, position = viewer.camtoworld_to_viser(scene.camtoworlds[0])
    with no_host_sync():
        rays = viewer.viewer_rays(wxyz, position, viewer.vertical_fov(scene.pixtocams[0], height), width, height,
                                  scene.near, scene.far)
    inv_focal = scene.pixtocams[0][1, 1]
    centred = np.array([[inv_focal, 0, -width / 2 * inv_focal], [0, inv_focal, -height / 2 * inv_focal], [0, 0, 1]])
    expected = camera_utils.pixels_to_rays(*np.meshgrid(np.arange(width), np.arange(height)), centred,
                                           scene.camtoworlds[0])
    for got, want in zip((rays.origins, rays.directions, rays.viewdirs, rays.radii), expected):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_level_sizes_and_display():
    assert [viewer.level_size(1280, 720, 512, lv) for lv in range(viewer.NUM_LEVELS)] == [
        (64, 36), (128, 72), (256, 144), (512, 288)]
    assert viewer.level_size(300, 200, 512, viewer.NUM_LEVELS - 1) == (300, 200)
    acc = np.array([[0., .5], [1., 1.]])
    rendering = {'rgb': np.array([[[0., .5, 1.]] * 2] * 2), 'acc': acc, 'distance_mean': np.ones((2, 2))}
    np.testing.assert_array_equal(viewer.to_display(rendering, 'colour')[0, 0], [0, 128, 255])
    np.testing.assert_array_equal(viewer.to_display(rendering, 'accumulation')[..., 1], [[0, 128], [255, 255]])


# -- A trained tiny model. -------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _flags(root, *bindings):
    return [f'--gin_configs={root}/tiny.gin', f"--gin_bindings=Config.data_dir = '{root}/scene'",
            f"--gin_bindings=Config.checkpoint_dir = '{root}/ckpt'"] + [f'--gin_bindings={b}' for b in bindings]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny model trained with the viewer on (Config.viewer_port); returns (root, train stdout)."""
    if not HAVE_VISER:
        pytest.skip("viser is not installed (pip install '.[viewer]')")
    root = tmp_path_factory.mktemp('viewer')
    synthetic.write_colmap_scene(str(root / 'scene'), n_views=16, width=64, height=48, factors=(2,), seed=0)
    (root / 'tiny.gin').write_text(TINY_GIN.format(steps=TRAIN_STEPS))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'train'] + _flags(root, f'Config.viewer_port = {_free_port()}'),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc.stdout


def _load(root, *bindings):
    import gin
    gin.clear_config()
    config = configs.load_config(save_config=False, gin_configs=[f'{root}/tiny.gin'], gin_bindings=[
        f"Config.data_dir = '{root}/scene'", f"Config.checkpoint_dir = '{root}/ckpt'", *bindings])
    device = torch.device('cpu')
    model = common.build_model(config, device)
    step = common.restore_model(model, config, device)
    return config, model, step


def test_training_serves_the_viewer(trained):
    _, stdout = trained
    assert re.search(r'Viewer at http://127\.0\.0\.1:\d+', stdout), stdout
    assert f'Finished training at step {TRAIN_STEPS}.' in stdout


class _FakeCamera:
    def __init__(self, wxyz, position, fov, width, height):
        self.wxyz, self.position, self.fov, self.image_width, self.image_height = wxyz, position, fov, width, height


class _FakeClient:
    """What `Viewer._serve` uses of a viser client: its camera, id, and the images it was sent."""
    client_id = 12345

    def __init__(self, camera):
        self.camera = camera
        self.sent = []
        self.scene = self

    def set_background_image(self, img, format):  # pylint: disable=redefined-builtin
        self.sent.append((img.shape[:2], format))


def test_progressive_levels_and_weight_updates(trained):
    root, _ = trained
    config, model, step = _load(root, 'Config.viewer_max_resolution = 32', 'Config.viewer_refresh_seconds = 0.')
    scene = datasets.load_scene(config, 'train')
    view = viewer.Viewer(model, config, scene, port=_free_port(), step=step)
    try:
        wxyz, position = viewer.camtoworld_to_viser(scene.camtoworlds[0])
        client = _FakeClient(_FakeCamera(wxyz, position, .8, 640, 480))
        while view._serve(client):  # pylint: disable=protected-access
            pass
        assert client.sent == [((3, 4), 'jpeg'), ((6, 8), 'jpeg'), ((12, 16), 'jpeg'), ((24, 32), 'png')]
        client.camera.position = position + .01  # Moved: back to the coarsest level.
        assert view._serve(client) and client.sent[-1] == ((3, 4), 'jpeg')  # pylint: disable=protected-access

        other = common.build_model(config, torch.device('cpu'))
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.)
        view.watching = False  # Nobody watching: update copies nothing.
        view.update(other, step + 1)
        assert view._pending is None  # pylint: disable=protected-access
        view.watching = True
        view.update(other, step + 1)
        # The render thread picks the copy up; the copy does not follow later changes to `other`.
        deadline = time.time() + 10
        while view._step != step + 1 and time.time() < deadline:  # pylint: disable=protected-access
            time.sleep(.05)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.)
        for a, b in zip(view._model.parameters(), other.parameters()):  # pylint: disable=protected-access
            torch.testing.assert_close(a, b - 1.)
    finally:
        view.close()


# -- In a browser. ---------------------------------------------------------------------------------------------

class _Chromium:
    """Headless Chromium on `url`, driven through the DevTools protocol."""

    def __init__(self, url: str):
        self.user_data = tempfile.mkdtemp(prefix='chromium-')
        self.proc = subprocess.Popen(
            [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={self.user_data}',
             '--remote-debugging-port=0', f'--window-size={WINDOW[0]},{WINDOW[1]}', url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        for line in self.proc.stderr:
            m = re.search(r'DevTools listening on ws://[^:]+:(\d+)/', line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None, 'chromium printed no DevTools address'
        for _ in range(100):
            pages = [t for t in json.load(urllib.request.urlopen(f'http://127.0.0.1:{port}/json'))
                     if t['type'] == 'page']
            if pages:
                break
            time.sleep(.1)
        self.page = pages[0]['webSocketDebuggerUrl']
        self.call('Emulation.setDeviceMetricsOverride', width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method, **params):
        with ws_connect(self.page, max_size=None) as ws:
            ws.send(json.dumps({'id': 1, 'method': method, 'params': params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get('id') == 1:
                    assert 'error' not in msg, msg
                    return msg['result']

    def screenshot(self) -> np.ndarray:
        png = base64.b64decode(self.call('Page.captureScreenshot', format='png')['data'])
        return np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.user_data, ignore_errors=True)


def _wait_for_final(view, position, timeout=60):
    """Waits until the viewer has sent a finest image of the whole viewport from `position`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = view.last_final
        if last is not None and last[:2] == WINDOW and np.allclose(last[3], position, atol=1e-4):
            time.sleep(1.)  # The browser decodes and draws it.
            return
        time.sleep(.1)
    raise AssertionError(f'no final render of the viewport from {position} in {timeout} s (last: {view.last_final})')


@needs_chromium
def test_browser_shows_the_model_from_its_camera(trained):
    root, _ = trained
    config, model, step = _load(root, 'Config.viewer_max_resolution = 32')
    test = datasets.RaySampler(datasets.load_scene(config, 'test'), config)
    assert (test.scene.width, test.scene.height) == (32, 24)
    render_fn = functools.partial(model, train_frac=1., compute_extras=True)
    direct = [models.render_image(render_fn, test.generate_ray_batch(i).rays, None, config) for i in range(2)]
    direct = [{k: v.numpy() for k, v in d.items() if isinstance(v, torch.Tensor)} for d in direct]
    view = viewer.Viewer(model, config, datasets.load_scene(config, 'train'), port=_free_port(), step=step,
                         show_cameras=False, **viewer.initial_camera_of(test.scene))
    browser = _Chromium(view.url)
    try:
        position = test.scene.camtoworlds[0][:3, 3]
        _wait_for_final(view, position)
        # 20 x 20 screen pixels per rendered pixel; rows 8.. and columns 4.. are clear of viser's overlays (the
        # panel top right, a notice top left, the axes bottom left).
        region = (slice(8, None), slice(4, None))
        shown = browser.screenshot().astype(np.float64).reshape(24, 20, 32, 20, 3).mean((1, 3)) / 255
        same = _psnr(shown[region], np.clip(direct[0]['rgb'], 0, 1)[region])
        other = _psnr(shown[region], np.clip(direct[1]['rgb'], 0, 1)[region])
        assert same > BAR_DB and other < BAR_DB - 5, (same, other)

        # Depth: its colour map spans the image's own percentiles, so the viewer's centred pinhole (the dataset
        # camera's principal point is off centre by a fraction of a pixel) shifts it a little more than colour.
        view.mode.value = 'depth'
        deadline = time.time() + 30
        expected = viewer.to_display(direct[0], 'depth')[region] / 255
        while time.time() < deadline:
            shown = browser.screenshot().astype(np.float64).reshape(24, 20, 32, 20, 3).mean((1, 3)) / 255
            if _psnr(shown[region], expected) > DEPTH_BAR_DB:
                break
            time.sleep(.5)
        depth, colour = _psnr(shown[region], expected), _psnr(shown[region], np.clip(direct[0]['rgb'], 0, 1)[region])
        assert depth > DEPTH_BAR_DB and colour < DEPTH_BAR_DB - 10, (depth, colour)
    finally:
        browser.close()
        view.close()


def test_view_command_serves_and_stops(trained):
    root, _ = trained
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', 'mipnerf360.view'] + _flags(root, f'Config.viewer_port = {_free_port()}'),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r'Viewer of .*checkpoint_0*%d\.pt \(step %d\) at (http://\S+);' % (TRAIN_STEPS, TRAIN_STEPS),
                          line)
            if m:
                url = m.group(1)
                break
        assert url is not None, proc.stderr.read() if proc.poll() is not None else 'no URL printed'
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert '<html' in page.lower()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == common.EXIT_SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_viser_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'viser', None)  # `import viser` raises ImportError.
    with pytest.raises(viewer.ViewerError, match=r"pip install 'mipnerf360\[viewer\]'"):
        viewer.import_viser()
