"""A live browser viewer (viser): the training cameras, and the model rendered from the browser's camera.

`Viewer(model, config, scene, ...)` serves a page at `http://<Config.viewer_host>:<port>` showing the scene's
cameras as frustums with thumbnails, and renders the model from each connected browser's camera into the
page's background, progressively: a coarse image while the camera moves, then finer ones up to
`Config.viewer_max_resolution` once it rests. Colour, depth or accumulation are chosen in the panel.

Rendering runs in one background thread, only while a browser is connected, on the viewer's own copy of the
model under `torch.no_grad`; `Viewer.update(model, step)` (called by train after each step) copies the weights
into it at most every `Config.viewer_refresh_seconds`, and costs one attribute check when nobody is watching.

Cameras: viser reports a camera as a position and a `wxyz` quaternion of its camera-to-world rotation in the
OpenCV convention (x right, y down, z forward) with a vertical field of view; ours are OpenGL camera-to-worlds
(x right, y up, z backward), so R_opengl = R_opencv @ diag(1, -1, -1). Everything is in the scene's normalised
frame, the one the model was trained in.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from mipnerf360 import camera_utils, configs, models, synthetic, train_utils, utils, vis

_OPENCV_TO_OPENGL = np.diag([1., -1., -1.])
MODES = ('colour', 'depth', 'accumulation')
NUM_LEVELS = 4  # Progressive levels: 1/8, 1/4, 1/2 and 1 of the final resolution.
THUMBNAIL_SIZE = 96  # Long side, in pixels, of the images shown on the frustums.


class ViewerError(configs.ConfigError):
    """The viewer cannot start (viser missing, port taken): a user error, printed as one line."""


def _closed_before_handshake(exc: Optional[BaseException]) -> bool:
    """Whether `exc` (or an exception it was raised from) is an EOFError: the peer went away mid-handshake."""
    while exc is not None:
        if isinstance(exc, EOFError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _BrowserDisconnectFilter(logging.Filter):
    """Drops websockets' 'opening handshake failed' tracebacks caused by a browser closing a connection before
    its handshake finished (page reloads, pre-opened sockets); every other websockets error stays. viser hides
    them only once its first HTTP request is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == 'opening handshake failed' and _closed_before_handshake(exc))


_DISCONNECT_FILTER = _BrowserDisconnectFilter()


def silence_browser_disconnects():
    """Installs `_BrowserDisconnectFilter` on websockets' server logger (once)."""
    logger = logging.getLogger('websockets.server')
    if _DISCONNECT_FILTER not in logger.filters:
        logger.addFilter(_DISCONNECT_FILTER)


# -- Cameras. --------------------------------------------------------------------------------------------------

# The (w, x, y, z) quaternion <-> rotation maps are COLMAP's, kept in `synthetic`.
quaternion_to_matrix = synthetic.qvec_to_rotmat
matrix_to_quaternion = synthetic.rotmat_to_qvec


def viser_to_camtoworld(wxyz: np.ndarray, position: np.ndarray) -> np.ndarray:
    """[3, 4] OpenGL camera-to-world of a viser camera (OpenCV rotation `wxyz`, centre `position`)."""
    rotation = quaternion_to_matrix(wxyz) @ _OPENCV_TO_OPENGL
    return np.concatenate([rotation, np.asarray(position, np.float64).reshape(3, 1)], 1)


def camtoworld_to_viser(camtoworld: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(wxyz, position) of viser's camera for a [3, 4] OpenGL camera-to-world (the inverse of the above)."""
    camtoworld = np.asarray(camtoworld, np.float64)
    return matrix_to_quaternion(camtoworld[:3, :3] @ _OPENCV_TO_OPENGL), camtoworld[:3, 3].copy()


def pinhole_pixtocam(fov_y: float, width: int, height: int) -> np.ndarray:
    """[3, 3] inverse intrinsics of a centred pinhole camera with vertical field of view `fov_y` (radians)."""
    focal = .5 * height / np.tan(.5 * fov_y)
    return np.asarray(camera_utils.get_pixtocam(focal, width, height, xnp=np), np.float64)


def vertical_fov(pixtocam: np.ndarray, height: int) -> float:
    """The vertical field of view (radians) of a camera with inverse intrinsics `pixtocam` and `height` rows."""
    return float(2 * np.arctan(.5 * height * pixtocam[1, 1]))


def viewer_rays(wxyz: np.ndarray, position: np.ndarray, fov_y: float, width: int, height: int, near: float,
                far: float, device: Any = 'cpu', pixtocam_ndc: Optional[np.ndarray] = None) -> utils.Rays:
    """Rays `[height, width]` (on `device`) of a viser camera, as a centred pinhole camera, cast by
    `camera_utils.pixels_to_rays` (through `cast_ray_batch`) as the datasets cast theirs."""
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)
    cameras = (f32(pinhole_pixtocam(fov_y, width, height)), f32(viser_to_camtoworld(wxyz, position)), None,
               None if pixtocam_ndc is None else f32(pixtocam_ndc))
    pix_y, pix_x = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                  indexing='ij')
    full = lambda v: torch.full((height, width, 1), float(v), device=device)
    pixels = utils.Pixels(pix_x, pix_y, lossmult=full(1.), near=full(near), far=full(far),
                          cam_idx=torch.zeros((height, width, 1), dtype=torch.long, device=device))
    return camera_utils.cast_ray_batch(cameras, pixels, xnp=torch)


def initial_camera_of(scene: Any) -> Dict[str, Any]:
    """`Viewer` keyword arguments that start browsers at the first camera of `scene` (a `datasets.Scene`, e.g.
    the test split), or {} (the viewer's default) when `scene` is None or empty."""
    if scene is None or scene.size == 0:
        return {}
    return {'initial_camtoworld': scene.camtoworlds[0],
            'initial_fov': vertical_fov(scene.pixtocams[0], int(scene.heights[0]))}


def level_size(width: int, height: int, max_resolution: int, level: int) -> Tuple[int, int]:
    """(width, height) rendered at progressive `level` (NUM_LEVELS - 1 is the finest) for a canvas of
    width x height: the canvas scaled so its long side is at most `max_resolution`, then halved per level
    below the finest."""
    scale = min(1., max_resolution / max(width, height)) / 2 ** (NUM_LEVELS - 1 - level)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_display(rendering: Dict[str, Any], mode: str) -> np.ndarray:
    """[H, W, 3] uint8 image of a rendering (numpy arrays) for `mode` in MODES."""
    acc = np.asarray(rendering['acc'])
    if mode == 'colour':
        img = np.asarray(rendering['rgb'])
    elif mode == 'depth':
        img = vis.visualize_cmap(np.asarray(rendering['distance_mean']), acc, vis.get_colormap('turbo'),
                                 curve_fn=lambda x: -np.log(x + np.finfo(np.float32).eps))
    else:
        img = np.repeat(acc[..., None], 3, -1)
    return utils.to_uint8(img[..., :3])


# -- The viewer. ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _ClientView:
    key: Tuple[Any, ...]  # What was rendered: camera, canvas size, mode and weights version.
    level: int


class _Superseded(Exception):
    """A camera moved while a fine level was rendering: that image is abandoned for a coarse one."""


def import_viser():
    """The viser module, or a ViewerError saying how to install it."""
    try:
        import viser  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ViewerError("The viewer needs viser, which is not installed; pip install 'mipnerf360[viewer]' "
                          '(or pip install viser), or unset Config.viewer_port.') from None
    return viser


def _camera_key(camera) -> Tuple[Any, ...]:
    """(wxyz, position, fov, width, height) of a viser camera handle, as hashable values."""
    return (tuple(float(v) for v in camera.wxyz), tuple(float(v) for v in camera.position), float(camera.fov),
            int(camera.image_width), int(camera.image_height))


def _thumbnail(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    step = max(1, int(np.ceil(max(img.shape[:2]) / THUMBNAIL_SIZE)))
    img = img[::step, ::step, :3]
    return img if img.dtype == np.uint8 else utils.to_uint8(img)


class Viewer:
    """The viser server, the scene's cameras and a render thread that serves the connected browsers.

    Args:
        model: the model to show; the viewer renders its own copy (on the same device).
        config: supplies viewer_host, viewer_max_resolution, viewer_refresh_seconds, render_chunk_size.
        scene: the `datasets.Scene` whose cameras (and images, as thumbnails) are shown; its near / far and NDC
            camera are used for the rays.
        port: the port to serve on (Config.viewer_port).
        step: the training step of `model`'s weights (sets the proposal annealing).
        initial_camtoworld, initial_fov: the pose ([3, 4], OpenGL) and vertical field of view (radians) a browser
            starts at; by default the scene's first camera's field of view, from a little behind it.
        show_cameras: whether the frustums start visible (a checkbox toggles them).
    """

    def __init__(self, model: torch.nn.Module, config: configs.Config, scene: Any, port: int, step: int = 0,
                 initial_camtoworld: Optional[np.ndarray] = None, initial_fov: Optional[float] = None,
                 show_cameras: bool = True):
        viser = import_viser()
        self.config = config
        self._scene = scene
        self._device = next(model.parameters()).device
        self._model = copy.deepcopy(model).eval().requires_grad_(False)
        self._step, self._version = step, 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending: Optional[Tuple[Dict[str, torch.Tensor], int]] = None
        self._last_copy = time.monotonic()
        self._views: Dict[int, _ClientView] = {}
        self.renders_done = 0  # Finest-level images sent.
        self.last_final: Optional[Tuple[Any, ...]] = None  # (canvas width, height, wxyz, position, fov) of the last.
        self.watching = False  # Whether any browser is connected (read by `update` without a lock).
        self._rendering: Optional[Tuple[int, Tuple[Any, ...]]] = None  # (client id, camera key) being rendered.
        self._camera_moved = False  # Set when that camera moves; aborts a fine level mid-render.
        self._client_left = False  # Set when that browser disconnects; nothing is sent then.
        silence_browser_disconnects()
        try:
            self.server = viser.ViserServer(host=config.viewer_host, port=port, verbose=False)
        except OSError as e:
            raise ViewerError(f'The viewer cannot serve on {config.viewer_host}:{port} ({e.strerror or e}); set '
                              'Config.viewer_port to a free port.') from None
        self.port = self.server.get_port()
        self._set_up_scene(initial_camtoworld, initial_fov, show_cameras)
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(self._on_disconnect)
        self._thread = threading.Thread(target=self._render_loop, name='viewer-render', daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = self.config.viewer_host
        return f'http://{"localhost" if host in ("0.0.0.0", "::") else host}:{self.port}'

    def _set_up_scene(self, initial_camtoworld, initial_fov, show_cameras):
        s = self._scene
        server = self.server
        up = np.mean(s.camtoworlds[:, :3, 1], 0)  # OpenGL camera y is up.
        server.scene.set_up_direction(tuple(up / max(np.linalg.norm(up), 1e-9)))
        centres = s.camtoworlds[:, :3, 3]
        spread = float(np.median(np.linalg.norm(centres - np.median(centres, 0), axis=-1))) if s.size > 1 else 1.
        scale = .06 * max(spread, 1e-3)
        self.frustums = []
        for i in range(s.size):
            wxyz, position = camtoworld_to_viser(s.camtoworlds[i])
            height, width = int(s.heights[i]), int(s.widths[i])
            image = None if s.images is None else _thumbnail(s.images[i])
            self.frustums.append(server.scene.add_camera_frustum(
                f'/cameras/{i}', fov=vertical_fov(s.pixtocams[i], height), aspect=width / height, scale=scale,
                thickness=1.5, thickness_units='screen', wxyz=wxyz, position=position, image=image,
                visible=show_cameras))
        if initial_camtoworld is None:  # Behind the first camera, so that its frustum is in view, not at the eye.
            initial_camtoworld = np.array(s.camtoworlds[0, :3, :4], np.float64)
            initial_camtoworld[:, 3] += 3 * scale * initial_camtoworld[:, 2]
            initial_fov = vertical_fov(s.pixtocams[0], int(s.heights[0]))
        camtoworld = np.asarray(initial_camtoworld, np.float64)
        forward = -camtoworld[:3, 2]
        distance = max(float(np.dot(-camtoworld[:3, 3], forward)), scale)  # To the point nearest the origin.
        server.initial_camera.position = tuple(camtoworld[:3, 3])
        server.initial_camera.look_at = tuple(camtoworld[:3, 3] + distance * forward)
        server.initial_camera.up = tuple(camtoworld[:3, 1])
        if initial_fov is not None:
            server.initial_camera.fov = float(initial_fov)

        self.mode = server.gui.add_dropdown('Output', MODES, initial_value='colour')
        cameras = server.gui.add_checkbox('Training cameras', initial_value=show_cameras)
        self.status = server.gui.add_markdown(f'Step {self._step}')

        @cameras.on_update
        def _(_event):
            for f in self.frustums:
                f.visible = cameras.value

        self.mode.on_update(lambda _event: self._wake.set())

    def _on_connect(self, client):
        self.watching = True
        client.camera.on_update(self._on_camera)
        self._wake.set()

    def _on_camera(self, camera):
        rendering = self._rendering
        if rendering is not None and rendering[0] == camera.client.client_id and _camera_key(camera) != rendering[1]:
            self._camera_moved = True
        self._wake.set()

    def _on_disconnect(self, client):
        rendering = self._rendering
        if rendering is not None and rendering[0] == client.client_id:
            self._client_left = self._camera_moved = True  # Nobody to send it to: stop that render.
        with self._lock:
            self._views.pop(client.client_id, None)
        self.watching = bool(self.server.get_clients())

    def update(self, model: torch.nn.Module, step: int, force: bool = False):
        """Hands the viewer `model`'s current weights (a copy, taken here, between training steps): at most
        every `Config.viewer_refresh_seconds`, and only while a browser is watching, unless `force`."""
        if not force and not (self.watching and
                              time.monotonic() - self._last_copy >= self.config.viewer_refresh_seconds):
            return
        with torch.no_grad():
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with self._lock:
            self._pending = (snapshot, step)
        self._last_copy = time.monotonic()
        self._wake.set()

    def _take_pending(self):
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._model.load_state_dict(pending[0])
            self._step, self._version = pending[1], self._version + 1
            self.status.content = f'Step {self._step}'

    def _render_loop(self):
        while not self._stop.is_set():
            self._wake.wait(timeout=.5)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._take_pending()
            busy = False
            for client in list(self.server.get_clients().values()):
                busy |= self._serve(client)
            if busy:
                self._wake.set()  # Go on refining (or re-render a camera that moved meanwhile).

    def _serve(self, client) -> bool:
        """Renders the next level for `client` (level 0 when its camera moved); False when it is up to date."""
        try:
            camera_key = _camera_key(client.camera)
        except AssertionError:  # viser has no camera from this browser yet.
            return False
        wxyz, position, fov, width, height = camera_key
        if width <= 0 or height <= 0:
            return False
        key = camera_key + (self.mode.value, self._version)
        with self._lock:
            view = self._views.get(client.client_id)
        if view is not None and view.key == key and view.level == NUM_LEVELS - 1:
            return False
        level = view.level + 1 if view is not None and view.key == key else 0
        w, h = level_size(width, height, self.config.viewer_max_resolution, level)
        final = level == NUM_LEVELS - 1
        self._camera_moved = self._client_left = False
        self._rendering = (client.client_id, camera_key)
        try:
            img = self.render(np.array(wxyz), np.array(position), fov, w, h, self.mode.value,
                              interruptible=level > 0)
            if self._stop.is_set() or self._client_left:
                return False  # Closed or disconnected mid-render: nobody to send it to.
            client.scene.set_background_image(img, format='png' if final else 'jpeg')
        except _Superseded:
            return True
        except Exception:  # pylint: disable=broad-except
            if self._stop.is_set() or client.client_id not in self.server.get_clients():
                return False  # Closed or disconnected mid-render.
            raise
        finally:
            self._rendering = None
        with self._lock:
            self._views[client.client_id] = _ClientView(key, level)
        if final:
            self.last_final = (width, height, np.array(wxyz), np.array(position), fov)
            self.renders_done += 1
        return True

    def render(self, wxyz: np.ndarray, position: np.ndarray, fov_y: float, width: int, height: int,
               mode: str = 'colour', interruptible: bool = False) -> np.ndarray:
        """[height, width, 3] uint8 image of the viewer's model from a viser camera, shown as `mode`;
        `interruptible`: raises _Superseded between chunks once a browser's camera moves (or leaves); any render
        raises it once the viewer is closing, so Ctrl-C does not wait for a full-resolution image."""
        s = self._scene
        rays = viewer_rays(wxyz, position, fov_y, width, height, s.near, s.far, self._device, s.pixtocam_ndc)
        train_frac = train_utils.train_frac_of(max(self._step, 1), self.config)
        model_fn = functools.partial(self._model, train_frac=train_frac, compute_extras=True)

        def render_fn(rng, chunk):
            if self._stop.is_set() or (interruptible and self._camera_moved):
                raise _Superseded
            return model_fn(rng, chunk)

        with torch.no_grad():
            rendering = models.render_image(render_fn, rays, None, self.config)
        return to_display({k: v.numpy() for k, v in rendering.items() if isinstance(v, torch.Tensor)}, mode)

    def close(self):
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.server.stop()
