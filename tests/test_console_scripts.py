"""Every console script of pyproject.toml names a callable that exists and answers --help (exit 0)."""

from __future__ import annotations

import importlib
import os

import pytest

tomllib = pytest.importorskip('tomllib')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as _f:
    SCRIPTS = tomllib.load(_f)['project']['scripts']


def test_the_new_commands_have_scripts():
    assert SCRIPTS['mipnerf360-photos'] == 'mipnerf360.photos:main'
    assert SCRIPTS['mipnerf360-colmap'] == 'mipnerf360.colmap:main'
    assert SCRIPTS['mipnerf360-synthetic'] == 'mipnerf360.synthetic:main'


@pytest.mark.parametrize('name', ['mipnerf360-photos', 'mipnerf360-colmap', 'mipnerf360-synthetic'])
def test_argparse_scripts_answer_help(name, monkeypatch, capsys):
    module, func = SCRIPTS[name].split(':')
    entry = getattr(importlib.import_module(module), func)
    monkeypatch.setattr('sys.argv', [name, '--help'])
    with pytest.raises(SystemExit) as e:
        entry()  # As the generated script calls it: no arguments, sys.argv parsed.
    assert e.value.code == 0 and 'usage:' in capsys.readouterr().out


def test_every_entry_point_resolves():
    for name, target in SCRIPTS.items():
        module, func = target.split(':')
        assert callable(getattr(importlib.import_module(module), func)), name
