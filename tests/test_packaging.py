"""A wheel of musicjax carries the shipped configs, and they resolve by name
from the installed package (issue 17, item 5)."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from musicjax import config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _repo_configs() -> list[str]:
  return sorted(os.path.relpath(p, os.path.join(ROOT, 'configs'))
                for p in glob.glob(os.path.join(ROOT, 'configs', '*', '*.py')))


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """`pip wheel . --no-deps` of a copy of the source tree (the build writes
  build/ and *.egg-info next to the sources; the repo stays untouched)."""
  src = tmp_path_factory.mktemp('src')
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  for d in ('musicjax', 'musicjax_torch', 'configs'):
    shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
  for f in ('pyproject.toml', 'setup.py', 'README.md'):
    shutil.copy(os.path.join(ROOT, f), src / f)
  out = tmp_path_factory.mktemp('wheel')
  # No build isolation: the venv's setuptools builds it (no network needed).
  r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps',
                      '--no-build-isolation', '-q', '-w', str(out)],
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  (path,) = glob.glob(str(out / 'musicjax-*.whl'))
  return path


def test_wheel_ships_the_configs(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  expected = {f'musicjax/configs/{c}' for c in _repo_configs()}
  assert expected and expected <= names, sorted(expected - names)
  # The code is still all there.
  assert {'musicjax/config.py', 'musicjax/cli.py', 'musicjax/train/trainer.py',
          'musicjax_torch/__init__.py'} <= names


def test_configs_resolve_by_name_from_the_installed_package(wheel, tmp_path,
                                                             monkeypatch):
  site = tmp_path / 'site'
  zipfile.ZipFile(wheel).extractall(site)
  # musicjax.config as the wheel installs it: configs/ is package data beside it.
  monkeypatch.setattr(cfg, '__file__', str(site / 'musicjax' / 'config.py'))
  monkeypatch.chdir(tmp_path)  # no configs/ here: only names can find them
  assert cfg.shipped_dir() == str(site / 'musicjax' / 'configs')
  assert cfg.shipped_names() == sorted(c[:-3] for c in _repo_configs())
  want = str(site / 'musicjax' / 'configs' / 'lm' / 'tiny.py')
  for spec in ('lm/tiny', 'lm/tiny.py', 'configs/lm/tiny.py'):
    assert cfg.resolve(spec) == want
  c = cfg.load('lm/tiny', ['train.steps=3'])
  assert c.task == 'lm' and c.train.steps == 3
  # A config that loads its sibling by path (dpo_tiny.py -> tiny.py) works too.
  assert cfg.load('lm/dpo_tiny').task == 'lm_dpo'
