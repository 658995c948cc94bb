"""User input that used to end in a plain ValueError (a traceback, reported as a bug) is one `error:` line of
our own types: RawNeRF files (raw_utils), spline keyframes (camera_utils) and loss / optimiser settings the
model cannot honour (train_utils). The cases run the real train command in-process on a tiny 32x24 scene, but for
three checked on the function or loader itself."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import gin
import numpy as np
import pytest

from mipnerf360 import camera_utils, configs, datasets, raw_utils
from mipnerf360.cli import common
from mipnerf360.cli import train as train_cli
import test_cli_faults

# test_cli_faults' tiny model, for one training step.
TINY_GIN = test_cli_faults.TINY_GIN + """
Config.batch_size = 64
Config.max_steps = 1
Config.train_render_every = 0
"""


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()  # An in-process CLI run leaves gin finalized (locked) for the tests that follow.


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('user_errors')
    scene, gin_file = test_cli_faults.write_tiny_scene(root, TINY_GIN)
    return root, str(gin_file), scene


def _train_error(setup, tmp_path, capsys, *bindings):
    """Runs train with `bindings`; returns its single stderr line (asserting exit status 2 and one line)."""
    _, gin_file, scene = setup
    argv = ['train', f'--gin_configs={gin_file}', f"--gin_bindings=Config.data_dir = '{scene}'",
            f"--gin_bindings=Config.checkpoint_dir = '{tmp_path / 'ckpt'}'"] + [f'--gin_bindings={b}'
                                                                               for b in bindings]
    os.environ.pop('MIPNERF360_DEBUG', None)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == common.EXIT_USER_ERROR == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def _raw_dir(setup, tmp_path):
    """A copy of the scene whose `raw/` is to be filled; returns (data dir, raw dir, the posed names)."""
    import shutil
    d = tmp_path / 'raw_scene'
    shutil.copytree(setup[2], d)
    names = sorted(os.listdir(d / 'images'))
    os.makedirs(d / 'raw')
    return d, d / 'raw', names


def _raw_error(setup, tmp_path, capsys, data_dir):
    _, gin_file, _ = setup
    return _train_error((None, gin_file, data_dir), tmp_path, capsys, 'Config.rawnerf_mode = True',
                        "Config.data_loss_type = 'rawnerf'")


_EXIF = {'BlackLevel': 512, 'WhiteLevel': 16383, 'AsShotNeutral': '0.5 1 0.7',
         'ColorMatrix2': '1.1 -0.2 0.05 -0.3 1.2 0.1 0.02 -0.1 0.9', 'ShutterSpeed': '1/30'}


def test_raw_folder_missing(setup, tmp_path, capsys):
    d, raw, _ = _raw_dir(setup, tmp_path)
    os.rmdir(raw)
    line = _raw_error(setup, tmp_path, capsys, d)
    assert f'Raw image folder {raw} does not exist' in line and 'DATA_DIR/raw' in line


def test_raw_exif_missing(setup, tmp_path, capsys):
    d, raw, names = _raw_dir(setup, tmp_path)
    stem = os.path.splitext(names[0])[0]
    (raw / f'{stem}.dng').write_bytes(b'not read before the EXIF check')
    line = _raw_error(setup, tmp_path, capsys, d)
    assert f'Missing EXIF metadata {raw / stem}.json' in line and f'exiftool -json {raw / stem}.dng' in line


def test_raw_unreadable_dng(setup, tmp_path, capsys):
    pytest.importorskip('rawpy')
    d, raw, names = _raw_dir(setup, tmp_path)
    for n in names:
        stem = os.path.splitext(n)[0]
        (raw / f'{stem}.dng').write_bytes(b'garbage, not a DNG')
        (raw / f'{stem}.json').write_text(json.dumps([_EXIF]))
    line = _raw_error(setup, tmp_path, capsys, d)
    assert f'Cannot read the raw image {raw / os.path.splitext(names[0])[0]}.dng' in line
    assert 'replace or remove it' in line


class _FakeRawpy(types.SimpleNamespace):
    class LibRawError(Exception):
        pass

    @staticmethod
    def imread(f):  # pylint: disable=unused-argument
        return types.SimpleNamespace(raw_image=np.full((24, 32), 1000, np.uint16))


@pytest.mark.parametrize('exif,message', [
    ({k: v for k, v in _EXIF.items() if k != 'ShutterSpeed'}, "Bad EXIF metadata in the JSON files of {raw}: "
                                                               "field 'ShutterSpeed' is missing"),
    (dict(_EXIF, AsShotNeutral=[0.5, 1, 0.7]), 'EXIF field AsShotNeutral has unsupported value [0.5, 1, 0.7]'),
    (dict(_EXIF, ShutterSpeed='0.03'), 'EXIF field ShutterSpeed has unsupported value \'0.03\''),
    (None, 'is not exiftool JSON output'),
])
def test_raw_bad_metadata(setup, tmp_path, capsys, monkeypatch, exif, message):
    monkeypatch.setattr(raw_utils, '_import_rawpy', lambda: _FakeRawpy())
    d, raw, names = _raw_dir(setup, tmp_path)
    for n in names:
        stem = os.path.splitext(n)[0]
        (raw / f'{stem}.dng').write_bytes(b'')
        (raw / f'{stem}.json').write_text(json.dumps([exif] if exif is not None else {'no': 'list'}))
    line = _raw_error(setup, tmp_path, capsys, d)
    assert message.format(raw=raw) in line, line
    assert 'exiftool -json' in line


def test_raw_factor_that_does_not_divide_the_raw_size(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(raw_utils, '_import_rawpy', lambda: _FakeRawpy())  # 32x24 raws.
    d, raw, names = _raw_dir(setup, tmp_path)
    for n in names:
        stem = os.path.splitext(n)[0]
        (raw / f'{stem}.dng').write_bytes(b'')
        (raw / f'{stem}.json').write_text(json.dumps([_EXIF]))
    config = configs.Config(data_dir=str(d), rawnerf_mode=True, data_loss_type='rawnerf', factor=5)
    with pytest.raises(datasets.DatasetError, match=f'The raw images of {raw} are 32x24, which Config.factor = 5 '
                       'does not divide'):
        datasets.load_scene(config, 'test', str(d))  # Training reads the raws at full size, the test split not.


def test_raw_no_dng_files(tmp_path):
    pytest.importorskip('rawpy')
    with pytest.raises(raw_utils.DatasetError, match=r'No raw images \(\*.dng\) found in .*Config.rawnerf_mode'):
        raw_utils.load_raw_images(str(tmp_path))


def test_spline_keyframes_that_match_no_image(setup, tmp_path, capsys):
    keys = tmp_path / 'keys.txt'
    keys.write_text('IMG_0001.JPG\nIMG_0002.JPG\n')
    line = _train_error(setup, tmp_path, capsys, f"Config.render_spline_keyframes = '{keys}'")
    assert (f"Config.render_spline_keyframes = '{keys}' lists 2 names, 0 of them dataset images (unmatched e.g. "
            'IMG_0001.JPG, IMG_0002.JPG; dataset images e.g. img_') in line
    assert 'at least 2 keyframes' in line


def test_spline_exposure_without_exposures(setup, tmp_path, capsys):
    keys = tmp_path / 'keys.txt'
    keys.write_text('\n'.join(sorted(os.listdir(setup[2] / 'images'))[:6]) + '\n')
    line = _train_error(setup, tmp_path, capsys, f"Config.render_spline_keyframes = '{keys}'",
                        'Config.render_spline_interpolate_exposure = True')
    assert 'render_spline_interpolate_exposure = True needs per-image exposures' in line and 'False' in line


def test_spline_too_few_keyframes_for_the_exposure_spline(tmp_path):
    keys = tmp_path / 'keys.txt'
    names = [f'{i}.jpg' for i in range(8)]
    keys.write_text('\n'.join(names[:3]))
    config = dataclasses.replace(configs.Config(), render_spline_keyframes=str(keys),
                                 render_spline_interpolate_exposure=True)
    poses = np.concatenate([np.broadcast_to(np.eye(3), (8, 3, 3)), np.arange(8.)[:, None, None] * np.ones((8, 3, 1))],
                           -1)
    with pytest.raises(configs.ConfigError, match=r'needs at least 6 keyframes .* matches 3; list more keyframes'):
        camera_utils.create_render_spline_path(config, names, poses, np.ones(8))
    missing = tmp_path / 'nope.txt'
    config = dataclasses.replace(config, render_spline_keyframes=str(missing))
    with pytest.raises(configs.ConfigError, match=f"Config.render_spline_keyframes = '{missing}' does not exist"):
        camera_utils.create_render_spline_path(config, names, poses, None)


@pytest.mark.parametrize('bindings,message', [
    (['Config.orientation_loss_mult = 0.1'],
     "Config.orientation_loss_mult = 0.1 (orientation_coarse_loss_mult = 0) needs the 'normals_pred' of "
     'Config.orientation_loss_target, which this model does not compute'),
    (['Config.predicted_normal_loss_mult = 0.1'],
     'Config.predicted_normal_loss_mult = 0.1 (predicted_normal_coarse_loss_mult = 0) needs density normals and '
     'predicted normals'),
    (["Config.weight_decay_mults = {'nerf_mlp.no_such_layer': 0.1}"],
     "Config.weight_decay_mults names 'nerf_mlp.no_such_layer', which matches no parameter"),
    (['Config.batch_size = 4', 'Config.grad_accum_steps = 8'],
     "Config.grad_accum_steps = 8 must be between 1 and the batch's first dimension (4)"),
])
def test_train_settings_the_model_cannot_honour(setup, tmp_path, capsys, bindings, message):
    line = _train_error(setup, tmp_path, capsys, *bindings)
    assert message in line, line
