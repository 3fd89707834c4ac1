"""A file lock shared by the processes of one machine."""
from __future__ import annotations

import contextlib
import fcntl
from typing import Iterator


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
  """An exclusive fcntl lock on `path`, so processes sharing a cache build it once."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
