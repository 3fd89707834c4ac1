"""Atomic file writes whose result has the permissions a plain `open` gives.

A file is written under a temporary name in its final directory and renamed
into place, so a reader (or a resumed run) never sees half a file. The
temporary file of `tempfile.mkstemp`, and every file safetensors >= 0.8
writes, has mode 0600 whatever the umask; renamed into place it would stay
unreadable to the rest of a team sharing a run directory or a data cache.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator

import numpy as np

_MODE = 0o666   # what open(path, 'w') asks for; the umask takes bits away


def umask() -> int:
  """The process umask, read without changing it where /proc allows (setting
  it to read it back races with other threads creating files)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  old = os.umask(0o022)
  os.umask(old)
  return old


def default_mode(path: str) -> None:
  """Gives `path` the mode a new file gets from open() under this umask."""
  os.chmod(path, _MODE & ~umask())


@contextlib.contextmanager
def atomic_path(path: str, prefix: str = '.', suffix: str = '.tmp'
                ) -> Iterator[str]:
  """Yields a temporary path beside `path`; when the block exits normally the
  file written there gets the default mode and replaces `path`. On an error
  the temporary file is removed and `path` is left as it was."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    default_mode(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str, **path_kwargs) -> None:
  with atomic_path(path, **path_kwargs) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)


def write_npz(path: str, **arrays) -> None:
  """np.savez_compressed(path, **arrays), whole or not at all."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:   # a file object: savez would add '.npz'
      np.savez_compressed(f, **arrays)


def write_with(path: str, write: Callable[[str], None], **path_kwargs) -> None:
  """`write(tmp_path)` fills the temporary file (a library's own writer)."""
  with atomic_path(path, **path_kwargs) as tmp:
    write(tmp)
