"""The COLMAP loader reports how many of the photos in images/ the model registered, with the names left out
and the pycolmap report's detail, and refuses a scene below Config.min_registered_fraction."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mipnerf360 import colmap, configs, datasets, synthetic
from mipnerf360.datasets import llff

N_VIEWS = 24


@pytest.fixture(scope='module')
def full_scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('registration'))
    info = synthetic.write_colmap_scene(d, n_views=N_VIEWS, width=16, height=12, factors=(2,), write_points=False)
    return d, info


def _drop_from_model(src, dst, drop):
    """A copy of `src` whose sparse/0/images.txt lacks the images named in `drop` (images/ keeps them all)."""
    import shutil
    shutil.copytree(src, dst)
    path = os.path.join(dst, 'sparse', '0', 'images.txt')
    with open(path) as f:
        lines = f.read().split('\n')
    header = [ln for ln in lines if ln.startswith('#')]
    body = [ln for ln in lines if not ln.startswith('#')]
    pairs = [(body[i], body[i + 1]) for i in range(0, len(body) - 1, 2) if body[i].strip()]
    kept = [p for p in pairs if p[0].split()[-1] not in drop]
    assert len(kept) == len(pairs) - len(drop)
    with open(path, 'w') as f:
        f.write('\n'.join(header + [ln for p in kept for ln in p]) + '\n')
    return str(dst)


def _load(d, **kw):
    config = configs.Config(data_dir=d, factor=2, **kw)
    return datasets.load_scene(config, 'train', d)


def test_reports_the_left_out_photos_and_trains_on_the_rest(full_scene, tmp_path, capsys):
    src, info = full_scene
    drop = info.names[3:16]  # 13 of 24 left out: more than the 10 names listed.
    d = _drop_from_model(src, tmp_path / 'scene', drop)
    scene = _load(d, min_registered_fraction=0.4)
    out = capsys.readouterr().out
    expected = (f'COLMAP registered 11 of 24 photos in {d}; left out: {", ".join(drop[:10])} and 3 more '
                '(see README: When too few photos register)')
    assert out.splitlines() == [expected]
    # The scene holds the registered photos only.
    assert sorted(scene.image_names) == sorted(set(info.names) - set(drop))
    # A second load in the same process (the test split) does not repeat the line.
    _load(d, min_registered_fraction=0.4)
    assert capsys.readouterr().out == ''
    assert llff.check_registration(d, scene.image_names, 0.) == expected


def test_too_few_registered_is_a_dataset_error(full_scene, tmp_path):
    src, info = full_scene
    d = _drop_from_model(src, tmp_path / 'scene', info.names[:13])
    with pytest.raises(datasets.DatasetError, match=r'COLMAP registered 11 of 24 photos in .*left out: img_000.png, '
                       r'.* and 3 more .*fewer than Config.min_registered_fraction = 0.5 of them: pose the photos '
                       r'again .*Config.min_registered_fraction = 0'):
        _load(d)  # The default, 0.5.
    assert len(_load(d, min_registered_fraction=0.).image_names) == 11


def test_all_registered_and_the_pycolmap_report(full_scene, tmp_path, capsys):
    src, info = full_scene
    d = _drop_from_model(src, tmp_path / 'scene', info.names[:2])
    report = {'registered': 22, 'total': 24, 'mean_reprojection_error_px': 0.4321, 'settings': 'hard',
              'unregistered_images': info.names[:2],
              'attempts': [{'settings': {'name': 'default'}, 'registered': 5, 'total': 24},
                           {'settings': {'name': 'hard'}, 'registered': 22, 'total': 24}]}
    with open(os.path.join(d, 'sparse', colmap.REPORT_NAME), 'w') as f:
        json.dump(report, f)
    line = llff.check_registration(d, info.names[2:], 0.5)
    assert line == (f'COLMAP registered 22 of 24 photos in {d}; left out: img_000.png, img_001.png (see README: '
                    'When too few photos register); pycolmap attempts: default settings 5, hard settings 22; mean '
                    'reprojection error 0.43 px')
    # A report of another model is named and ignored.
    assert llff.check_registration(d, info.names[3:], 0.5).endswith(
            f'; {os.path.join(d, "sparse", colmap.REPORT_NAME)} describes another model (22 of 24), ignored')
    capsys.readouterr()
    _load(src)
    assert capsys.readouterr().out == f'COLMAP registered 24 of 24 photos in {src}\n'


def test_only_colmap_scenes_are_checked(tmp_path, capsys):
    d = str(tmp_path / 'llff')
    synthetic.write_llff_scene(d, n_views=10, width=16, height=12, factors=(2,))
    assert not os.path.isdir(os.path.join(d, 'sparse', '0'))
    scene = _load(d, forward_facing=True, min_registered_fraction=1.)
    assert len(scene.image_names) > 0 and 'COLMAP registered' not in capsys.readouterr().out


def test_min_registered_fraction_is_validated():
    with pytest.raises(configs.ConfigError, match='min_registered_fraction'):
        configs.validate_config(configs.Config(min_registered_fraction=1.5))
    assert np.isclose(configs.Config().min_registered_fraction, 0.5)
