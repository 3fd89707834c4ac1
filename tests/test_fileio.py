"""Atomic writes: all or nothing, and the mode a plain open() would give
(tempfile.mkstemp and safetensors >= 0.8 alone leave 0600 files that the rest
of a team sharing a run directory cannot read)."""
import os
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from musicjax import fileio


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(umask):
  assert fileio.umask() == umask
  assert fileio.umask() == umask


def test_text_gets_the_mode_of_a_plain_open(tmp_path, umask):
  plain = tmp_path / 'plain.txt'
  plain.write_text('x')
  path = str(tmp_path / 'sub' / 'a.json')     # the directory is created
  fileio.write_text(path, '{"a": 1}')
  assert open(path).read() == '{"a": 1}'
  assert _mode(path) == _mode(plain) == 0o666 & ~umask
  assert os.listdir(tmp_path / 'sub') == ['a.json']


def test_a_library_writer_gets_the_mode_too(tmp_path, umask):
  path = str(tmp_path / 'w.safetensors')
  fileio.write_with(path, lambda tmp: save_file({'w': np.arange(3.0)}, tmp))
  np.testing.assert_array_equal(load_file(path)['w'], np.arange(3.0))
  assert _mode(path) == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = str(tmp_path / 'meta.json')
  fileio.write_text(path, 'old')

  def fail(tmp):
    with open(tmp, 'w') as f:
      f.write('half')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    fileio.write_with(path, fail)
  assert open(path).read() == 'old'
  assert os.listdir(tmp_path) == ['meta.json']
