"""The notebooks in notebooks/ run top to bottom with their quick settings
(MUSICJAX_QUICK=1), in order, sharing one runs folder: later notebooks reuse
the codec the first one trains, as they do for a user. A failing cell fails
the test with that cell's traceback."""
import glob
import os

import jax
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
  # The kernels share the suite's XLA compilation cache (tests/conftest.py):
  # notebooks restore and run the same codec programs.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
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
