"""The notebooks in notebooks/ run top to bottom with their quick settings
(MUSICJAX_QUICK=1), in order, sharing one runs folder: later notebooks reuse
the codec the first one trains, as they do for a user. A failing cell fails
the test with that cell's traceback."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(REPO, 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, '*.ipynb')))
# What each notebook must show besides running without error: audio players,
# pictures, and the checks it prints.
SHOWS = {
    '01_codec_quickstart': ('<audio', 'image/png'),
    '02_generate': ('<audio', 'image/png', 'the callback ran after ['),
    '03_accompany': ('<audio', 'image/png', 'masked share after each step'),
    '04_scale_out': ('identical on both meshes: True', 'text/html'),
    '05_export_to_pytorch': ('<audio', "'codes_equal': True",
                             'fine-tuned PyTorch vs imported JAX'),
}


def _name(path):
  return os.path.basename(path)[:-len('.ipynb')]


def test_every_notebook_is_listed_and_stored_without_outputs():
  assert sorted(SHOWS) == [_name(p) for p in NOTEBOOKS]
  readme = open(os.path.join(REPO, 'README.md')).read()
  for path in NOTEBOOKS:
    nbk = nbformat.read(path, as_version=4)
    nbformat.validate(nbk)
    code = [c for c in nbk.cells if c.cell_type == 'code']
    assert code, path
    for c in code:
      assert not c.outputs and c.execution_count is None, (
          f'{path}: cell outputs are committed; clear them (Jupyter: Edit > '
          'Clear All Outputs) so diffs stay readable')
    assert 'google.colab' in code[0].source, f'{path}: first cell must install in Colab'
    assert f'notebooks/{os.path.basename(path)}' in readme, (
        f'README does not link {path}')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return str(tmp_path_factory.mktemp('notebook_runs'))


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=_name)
def test_notebook_runs_with_quick_settings(path, runs, monkeypatch):
  monkeypatch.setenv('MUSICJAX_QUICK', '1')
  monkeypatch.setenv('MUSICJAX_RUNS', runs)
  nbk = nbformat.read(path, as_version=4)
  NotebookClient(nbk, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': NB_DIR}}).execute()
  shown = []
  for c in nbk.cells:
    for out in c.get('outputs', []):
      assert out.output_type != 'error', out
      data = out.get('data', {})
      shown.append(out.get('text', '') + data.get('text/html', '') +
                   ' '.join(data))
  for want in SHOWS[_name(path)]:
    assert any(want in s for s in shown), f'{_name(path)} shows no {want}'


@pytest.mark.parametrize('jax_there', [None, '0.4.38', '0.13.0', '0.10.2',
                                       '0.12.0.1'])
@pytest.mark.parametrize('runtime,extra', [('cpu', ''), ('gpu', 'cuda12,'),
                                           ('tpu', 'tpu,')])
def test_colab_first_cell_installs_the_jax_build_of_the_runtime(
    runtime, extra, jax_there, monkeypatch, tmp_path):
  """Each notebook's first cell, run as in Colab (a `google.colab` module is
  present): it clones the repository and pip-installs it, plus tinysoundfont
  without its playback-only deps. A preinstalled jax inside pyproject's range
  is kept (no jax extra, so pip leaves Colab's build alone); none, or one
  outside the range, gets the jax extra of the runtime. The commands are
  recorded here, not run (the clone is a copy of pyproject.toml)."""
  import importlib.metadata
  import shutil
  import subprocess
  import sys
  import types
  calls, dirs = [], []
  dest = str(tmp_path / 'musicjax')

  def check_call(cmd):
    calls.append(cmd)
    if cmd[:2] == ['git', 'clone']:
      os.makedirs(cmd[-1])
      shutil.copy(os.path.join(REPO, 'pyproject.toml'), cmd[-1])

  def version(name):
    if jax_there is None:
      raise importlib.metadata.PackageNotFoundError(name)
    return jax_there

  monkeypatch.chdir(REPO)
  monkeypatch.setenv('MUSICJAX_COLAB_DIR', dest)
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
  monkeypatch.setattr(subprocess, 'check_call', check_call)
  monkeypatch.setattr(importlib.metadata, 'version', version)
  monkeypatch.setattr(shutil, 'which',
                      lambda name: '/usr/bin/nvidia-smi' if runtime == 'gpu' else None)
  monkeypatch.delenv('COLAB_TPU_ADDR', raising=False)
  monkeypatch.delenv('TPU_ACCELERATOR_TYPE', raising=False)
  if runtime == 'tpu':
    monkeypatch.setenv('TPU_ACCELERATOR_TYPE', 'v5e-1')
  monkeypatch.setattr(os, 'chdir', dirs.append)
  monkeypatch.setattr(sys, 'path', list(sys.path))
  sources = {nbformat.read(p, as_version=4).cells[1].source for p in NOTEBOOKS}
  assert len(sources) == 1, 'the notebooks disagree on their setup cell'
  exec(compile(sources.pop(), 'setup-cell', 'exec'), {'__name__': 'nb'})
  assert calls[0][:2] == ['git', 'clone'] and calls[0][-1] == dest
  pip = [c for c in calls if c[1:4] == ['-m', 'pip', 'install']]
  kept = jax_there in ('0.10.2', '0.12.0.1')
  assert pip[0][-1] == f'{dest}[{"" if kept else extra}notebooks]'
  assert pip[1][-2:] == ['--no-deps', 'tinysoundfont>=0.3.6']
  assert dirs[0] == dest
