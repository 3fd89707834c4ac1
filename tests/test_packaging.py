"""A wheel of musicjax carries the shipped configs, they resolve by name
from the installed package, and the wheel installed into a clean venv trains
the tiny codec on a folder of wavs (issue 17, item 5)."""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest
import soundfile as sf

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
  assert {'musicjax/config.py', 'musicjax/cli/app.py', 'musicjax/cli/__main__.py',
          'musicjax/bench/machine.py', 'musicjax/train/trainer.py',
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


# What the clean venv's python reports about the musicjax it imports, and a
# `pip check` of the wheel's declared dependencies (extras left out).
_PROBE = r'''
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
import musicjax
from musicjax import config
dist = md.distribution('musicjax')
unmet = []
for text in dist.requires or []:
  req = Requirement(text)
  if req.marker is not None and not req.marker.evaluate({'extra': ''}):
    continue
  try:
    have = md.version(req.name)
  except md.PackageNotFoundError:
    unmet.append(f'{req}: not installed')
    continue
  if not req.specifier.contains(have, prereleases=True):
    unmet.append(f'{req}: {have} installed')
json.dump({'file': musicjax.__file__,
           'dist_file': str(dist.locate_file('musicjax/__init__.py')),
           'tiny': config.resolve('codec/tiny'), 'requires': dist.requires or [],
           'unmet': unmet, 'meta_path': [repr(f) for f in sys.meta_path]}, sys.stdout)
'''


def _run(cmd, cwd, env, timeout=600):
  r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                     timeout=timeout, check=False)
  return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
def test_wheel_in_a_clean_venv_trains_the_tiny_codec_on_a_folder(wheel, tmp_path):
  """The acceptance of item 5: `pip install` of the wheel into a clean venv,
  then `musicjax train --config codec/tiny` on a folder of wavs.

  Installing the dependencies into the clean venv would download hundreds of
  MB, so the wheel goes in with --no-deps and a .pth file appends this test
  venv's site-packages to the clean venv's sys.path. A path line of a .pth is
  only appended; the .pth files inside that directory are not run, so the
  editable-install hook there (__editable__.musicjax-*.pth, which maps
  `musicjax` to this checkout) stays off. The probes below prove it: the
  musicjax imported is the wheel's, and without the wheel there is none."""
  venv = tmp_path / 'venv'
  r = subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  py = str(venv / 'bin' / 'python')
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP', 'VIRTUAL_ENV')}
  env['PYTHONNOUSERSITE'] = '1'
  work = tmp_path / 'elsewhere'  # outside the repo: no configs/, no musicjax/
  work.mkdir()
  get = lambda p, key: _run([p, '-c', f'import sysconfig; print(sysconfig.get_path({key!r}))'],
                            work, env)[1].strip()
  site = get(py, 'purelib')
  assert site.startswith(str(venv)), site

  # This venv's pip installs the wheel into the clean one (which has no pip).
  rc, out = _run([sys.executable, '-m', 'pip', '--python', py, 'install', '--no-deps',
                  '--no-index', '-q', wheel], work, env)
  assert rc == 0, out
  assert os.path.isfile(venv / 'bin' / 'musicjax')  # the wheel's console script
  ours = sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})
  assert not any(p.startswith(str(venv)) for p in ours)
  with open(os.path.join(site, '_test_venv_deps.pth'), 'w') as f:
    f.write(''.join(p + '\n' for p in ours))

  rc, out = _run([py, '-c', _PROBE], work, env)
  assert rc == 0, out
  probe = json.loads(out)
  wheel_init = os.path.join(site, 'musicjax', '__init__.py')
  assert probe['file'] == wheel_init, probe['file']
  assert not probe['file'].startswith(ROOT)
  assert probe['dist_file'] == wheel_init  # its metadata is the wheel's too
  assert not any('editable' in f.lower() for f in probe['meta_path']), probe['meta_path']
  assert probe['tiny'] == os.path.join(site, 'musicjax', 'configs', 'codec', 'tiny.py')
  assert any(q.startswith('jax') for q in probe['requires']), probe['requires']
  assert probe['unmet'] == [], probe['unmet']
  # Without the wheel's copy on the path, nothing else provides musicjax.
  rc, out = _run([py, '-c', f'import sys; sys.path.remove({site!r}); import musicjax'],
                 work, env)
  assert rc != 0 and "No module named 'musicjax'" in out, out

  # A folder of wavs as a user has them: nested, other rates, stereo.
  data = work / 'wavs'
  for i in range(6):
    sr, ch = (44100, 2) if i % 3 == 0 else (16000, 1)
    t = np.arange(sr) / sr
    x = 0.4 * np.sin(2 * np.pi * (220.0 + 40.0 * i) * t)
    os.makedirs(data / f'set{i % 2}', exist_ok=True)
    sf.write(data / f'set{i % 2}' / f'take{i}.wav',
             np.tile(x[:, None], (1, ch)).astype(np.float32), sr)
  rc, out = _run([str(venv / 'bin' / 'musicjax'), 'train', '--config', 'codec/tiny',
                  '--workdir', 'W', '--config.data.kind=folder',
                  f'--config.data.path={data}', '--config.data.eval_fraction=0.3',
                  f'--config.data.cache_dir={work / "cache"}',
                  '--config.train.steps=2', '--config.train.log_every=1',
                  '--config.train.checkpoint_every=2', '--config.train.eval_every=1000',
                  '--config.train.eval_at_start=false'], work, env)
  assert rc == 0, out[-4000:]
  wd = work / 'W'
  assert os.path.isdir(wd / 'checkpoints' / '2'), os.listdir(wd)
  recs = [json.loads(l) for l in open(wd / 'metrics.jsonl')]
  assert [r['step'] for r in recs] == [1, 2]
  assert all(np.isfinite(r['loss/total']) and r['data/bad_files'] == 0 for r in recs)
  saved = json.load(open(wd / 'config.json'))
  assert saved['task'] == 'codec' and saved['data']['path'] == str(data)
  assert list(saved['model']['strides']) == [4, 8, 8]  # codec/tiny's, by name
