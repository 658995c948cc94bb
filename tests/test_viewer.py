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
import contextlib
import functools
import io
import json
import logging
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

from mipnerf360 import camera_utils, checkpoints, configs, datasets, models, synthetic, viewer
from mipnerf360.cli import common, train
from syncguard import no_host_sync
from test_cli import TINY_GIN, _in_process, _psnr

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
NO_VISER = "viser is not installed (pip install '.[viewer]')"
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason='chromium is not installed (apt-get install chromium)')


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


def _flags(root, *bindings, ckpt=None):
    return [f'--gin_configs={root}/tiny.gin', f"--gin_bindings=Config.data_dir = '{root}/scene'",
            f"--gin_bindings=Config.checkpoint_dir = '{ckpt or root / 'ckpt'}'"] + [f'--gin_bindings={b}'
                                                                                  for b in bindings]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny model trained (in this process) with the viewer on (Config.viewer_port); returns (root, its log)."""
    if not HAVE_VISER:
        pytest.skip(NO_VISER)
    root = tmp_path_factory.mktemp('viewer')
    synthetic.write_colmap_scene(str(root / 'scene'), n_views=16, width=64, height=48, factors=(2,), seed=0)
    (root / 'tiny.gin').write_text(TINY_GIN.format(steps=TRAIN_STEPS))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _in_process(train, _flags(root, f'Config.viewer_port = {_free_port()}'))
    assert code == 0, out.getvalue()[-3000:]
    return root, out.getvalue()


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
        camera.client = self
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

        # Moving while a finer level renders abandons it after the chunk in flight (nothing sent), then coarse.
        view.config.render_chunk_size = 16  # Level 1 is 8 x 6 = 3 chunks.
        chunks, forward = [], view._model.forward  # pylint: disable=protected-access

        def moving_forward(*args, **kwargs):
            if not chunks:
                client.camera.position = position + .02
                view._on_camera(client.camera)  # pylint: disable=protected-access
            chunks.append(1)
            return forward(*args, **kwargs)

        view._model.forward = moving_forward  # pylint: disable=protected-access
        sent = len(client.sent)
        assert view._serve(client) and len(client.sent) == sent and len(chunks) == 1  # pylint: disable=protected-access
        assert view._serve(client) and client.sent[-1] == ((3, 4), 'jpeg')  # pylint: disable=protected-access
        del view._model.forward  # pylint: disable=protected-access

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


def test_disconnect_and_close_stop_a_render_mid_image(trained):
    """A browser leaving mid-render gets nothing sent (viser would warn about a closed connection); closing the
    viewer (Ctrl-C) abandons even a coarsest-level render after the chunk in flight instead of finishing it."""
    root, _ = trained
    config, model, step = _load(root, 'Config.viewer_max_resolution = 32', 'Config.render_chunk_size = 4')
    scene = datasets.load_scene(config, 'train')
    view = viewer.Viewer(model, config, scene, port=_free_port(), step=step)
    wxyz, position = viewer.camtoworld_to_viser(scene.camtoworlds[0])
    client = _FakeClient(_FakeCamera(wxyz, position, .8, 640, 480))
    chunks, forward = [], view._model.forward  # pylint: disable=protected-access
    try:
        def leaving_forward(*args, **kwargs):
            if not chunks:
                view._on_disconnect(client)  # pylint: disable=protected-access
            chunks.append(1)
            return forward(*args, **kwargs)

        view._model.forward = leaving_forward  # pylint: disable=protected-access
        assert not view._serve(client) and client.sent == []  # pylint: disable=protected-access
        while view._serve(client):  # Level 0 finished; it was not sent.  pylint: disable=protected-access
            pass
        assert client.sent == [((3, 4), 'jpeg'), ((6, 8), 'jpeg'), ((12, 16), 'jpeg'), ((24, 32), 'png')]

        client.camera.position = position + .01
        chunks.clear()

        def closing_forward(*args, **kwargs):
            if not chunks:
                view._stop.set()  # pylint: disable=protected-access
            chunks.append(1)
            return forward(*args, **kwargs)

        view._model.forward = closing_forward  # pylint: disable=protected-access
        sent = len(client.sent)
        view._serve(client)  # pylint: disable=protected-access
        assert len(chunks) == 1 and len(client.sent) == sent  # Level 0 is 4 x 3 pixels: 3 chunks of 4.
    finally:
        del view._model.forward  # pylint: disable=protected-access
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
            return
        time.sleep(.1)
    raise AssertionError(f'no final render of the viewport from {position} in {timeout} s (last: {view.last_final})')


# 20 x 20 screen pixels per rendered pixel; rows 8.. and columns 4.. are clear of viser's overlays (the panel top
# right, a notice top left, the axes bottom left).
REGION = (slice(8, None), slice(4, None))


def _shown_until(browser, expected, bar, timeout=30):
    """The screenshot (box-filtered to the rendered 32 x 24 pixels, REGION) once it matches `expected` within
    `bar` dB, or the last one after `timeout` seconds (the browser draws a received image asynchronously)."""
    deadline = time.time() + timeout
    while True:
        shown = browser.screenshot().astype(np.float64).reshape(24, 20, 32, 20, 3).mean((1, 3))[REGION] / 255
        if _psnr(shown, expected) > bar or time.time() > deadline:
            return shown
        time.sleep(.5)


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
        colours = [np.clip(d['rgb'], 0, 1)[REGION] for d in direct]
        shown = _shown_until(browser, colours[0], BAR_DB)
        same, other = _psnr(shown, colours[0]), _psnr(shown, colours[1])
        assert same > BAR_DB and other < BAR_DB - 5, (same, other)

        # Depth: its colour map spans the image's own percentiles, so the viewer's centred pinhole (the dataset
        # camera's principal point is off centre by a fraction of a pixel) shifts it a little more than colour.
        view.mode.value = 'depth'
        expected = viewer.to_display(direct[0], 'depth')[REGION] / 255
        shown = _shown_until(browser, expected, DEPTH_BAR_DB)
        depth, colour = _psnr(shown, expected), _psnr(shown, colours[0])
        assert depth > DEPTH_BAR_DB and colour < DEPTH_BAR_DB - 10, (depth, colour)
    finally:
        browser.close()
        view.close()


def _close_before_handshake(url: str):
    """A browser's pre-opened socket: connects and closes without sending a request."""
    host, port = url.split('//')[1].split(':')
    socket.create_connection((host, int(port)), timeout=10).close()


@pytest.mark.parametrize('signum,code', [(signal.SIGTERM, common.EXIT_SIGTERM), (signal.SIGINT, common.EXIT_SIGINT)])
def test_view_command_serves_follows_and_stops(trained, tmp_path, signum, code):
    """python -m mipnerf360.view serves the page, loads a newer checkpoint when one appears, stops on SIGTERM and
    Ctrl-C, and prints no traceback for a browser that disconnects before its handshake."""
    root, _ = trained
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(root / 'ckpt', ckpt)
    argv = _flags(root, f'Config.viewer_port = {_free_port()}', 'Config.viewer_refresh_seconds = 0.2', ckpt=ckpt)
    proc = subprocess.Popen([sys.executable, '-m', 'mipnerf360.view'] + argv, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout)
        url = next((m.group(1) for m in (re.search(
            rf'Viewer of .*checkpoint_0*{TRAIN_STEPS}\.pt \(step {TRAIN_STEPS}\) at (http://\S+);', line)
            for line in lines) if m), None)
        assert url is not None, proc.stderr.read() if proc.poll() is not None else 'no URL printed'
        _close_before_handshake(url)  # Before any page is served (viser hides these only after one).
        assert '<html' in urllib.request.urlopen(url, timeout=30).read().decode().lower()
        state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(str(ckpt)))
        newer = checkpoints.save_checkpoint(str(ckpt), dict(state, step=2 * TRAIN_STEPS), 2 * TRAIN_STEPS)
        assert any(f'Loaded {newer} (step {2 * TRAIN_STEPS}).' in line for line in lines)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == code
        err = proc.stderr.read()
        assert 'Traceback' not in err and 'EOFError' not in err, err
        assert err.strip().splitlines()[-1].startswith('Stopped ('), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _handshake_record(exc: BaseException, message: str = 'opening handshake failed') -> logging.LogRecord:
    try:
        raise exc
    except BaseException:  # pylint: disable=broad-except
        return logging.LogRecord('websockets.server', logging.ERROR, __file__, 0, message, (), sys.exc_info())


def _raised_from(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.skipif(not HAVE_VISER, reason=NO_VISER)
def test_browser_disconnects_are_silent_and_real_errors_are_not(caplog):
    """A connection closed before its handshake logs nothing; other handshake and handler errors stay."""
    from websockets.exceptions import InvalidMessage
    viewer.silence_browser_disconnects()
    server = viser.ViserServer(host='127.0.0.1', port=_free_port(), verbose=False)
    errors = lambda: [r for r in caplog.records if r.levelno >= logging.ERROR]  # noqa: E731
    try:
        with caplog.at_level(logging.ERROR, logger='websockets.server'):
            _close_before_handshake(f'http://127.0.0.1:{server.get_port()}')
            with socket.create_connection(('127.0.0.1', server.get_port()), timeout=10) as s:
                s.sendall(b'GET / HTTP/1.1\r\n')  # Closed halfway through the headers.
            time.sleep(.5)
        assert not errors(), [r.getMessage() for r in errors()]
    finally:
        server.stop()
    keep = viewer._BrowserDisconnectFilter().filter  # pylint: disable=protected-access
    eof = _raised_from(InvalidMessage('did not receive a valid HTTP request'),
                       EOFError('connection closed while reading HTTP request line'))
    assert not keep(_handshake_record(eof))
    assert keep(_handshake_record(_raised_from(InvalidMessage('did not receive a valid HTTP request'),
                                               ValueError('invalid HTTP request line: NOT HTTP'))))
    assert keep(_handshake_record(eof, 'connection handler failed'))
    assert keep(_handshake_record(RuntimeError('boom')))


def test_missing_viser_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'viser', None)  # `import viser` raises ImportError.
    with pytest.raises(viewer.ViewerError, match=r"pip install 'mipnerf360\[viewer\]'"):
        viewer.import_viser()


@pytest.mark.parametrize('field,value', [('viewer_port', 0), ('viewer_port', 70000), ('viewer_port', '8080'),
                                         ('viewer_max_resolution', 0), ('viewer_refresh_seconds', -1.),
                                         ('viewer_host', 8080)])
def test_bad_viewer_fields_are_config_errors(field, value):
    with pytest.raises(configs.ConfigError, match=f'Config.{field} = '):
        configs.validate_config(configs.Config(**{field: value}))
    configs.validate_config(configs.Config(viewer_port=8080))
