"""A folder's safetensors weights, by tensor name: `model.safetensors`, or
shards listed in `model.safetensors.index.json` ({"weight_map": {tensor:
file}}): what Hugging Face's and heartlib's save_pretrained write, and
`musicjax export` (export/files.py).

Only safetensors are read (a JSON header and raw arrays: nothing is
unpickled). Errors name the file, and the tensor where there is one.
"""
from __future__ import annotations

import json
import os

# safetensors builds a bfloat16 numpy array from numpy's dtype name
# 'bfloat16', which exists only once ml_dtypes is imported.
import ml_dtypes  # noqa: F401  pylint: disable=unused-import
import numpy as np
from safetensors import safe_open

from musicjax.errors import UserError

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


class WeightsError(UserError, ValueError):
  """A weights folder that cannot be read; the message names the file and the
  tensor."""


class Reader:
  """Tensors of a folder's safetensors file(s), by name, as stored (bfloat16
  as ml_dtypes.bfloat16).

  Args:
    folder: holds SINGLE, or INDEX and the shards it lists.
    error: the exception class raised (a loader's own, for its callers).
    what: what the folder should be, for the error when it holds neither
      file ('a HeartMuLa checkpoint folder').
    redo: how to get a whole file again ('download it again').
  """

  def __init__(self, folder: str, error: type[Exception] = WeightsError,
               what: str = 'a checkpoint folder',
               redo: str = 'download it again'):
    self.folder, self.error, self.redo = folder, error, redo
    self._handles = {}
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          self.where = dict(json.load(f)['weight_map'])
      except (ValueError, KeyError, TypeError) as err:
        raise error(f'{index}: not a safetensors index ({err})') from None
    elif os.path.isfile(os.path.join(folder, SINGLE)):
      self.where = {n: SINGLE for n in self._open(SINGLE).keys()}
    else:
      raise error(f'{folder}: no {SINGLE} or {INDEX} (not {what}, or an '
                  f'incomplete copy: {redo})')

  @property
  def names(self) -> list[str]:
    return sorted(self.where)

  def path(self, name: str) -> str:
    return os.path.join(self.folder, self.where.get(name, SINGLE))

  def _open(self, fname: str):
    if fname not in self._handles:
      path = os.path.join(self.folder, fname)
      if not os.path.isfile(path):
        raise self.error(f'{path}: missing (listed in {INDEX}; {self.redo})')
      if not os.access(path, os.R_OK):
        # safetensors writes 0600 (so did `musicjax export` before
        # 2026-11-22): another user's files may be unreadable.
        raise self.error(f'{path}: not readable by this user (mode '
                         f'{os.stat(path).st_mode & 0o777:o}); its owner can '
                         f'run chmod a+r {path}')
      try:
        self._handles[fname] = safe_open(path, framework='numpy')
      except Exception as err:  # safetensors raises its own error types
        raise self.error(f'{path}: not a readable safetensors file ({err}); it '
                         f'may be truncated: {self.redo}') from None
    return self._handles[fname]

  def _handle(self, name: str):
    if name not in self.where:
      raise self.error(f'{self.folder}: tensor {name!r} is missing')
    h = self._open(self.where[name])
    if name not in h.keys():
      raise self.error(f'{self.path(name)}: tensor {name!r} listed in {INDEX} '
                       'is not in the file')
    return h

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The safetensors dtype ('F32', 'BF16', ...)."""
    return self._handle(name).get_slice(name).get_dtype()

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: self.shape(name) for name in self.names}

  def get(self, name: str) -> np.ndarray:
    h = self._handle(name)
    try:
      return h.get_tensor(name)
    except Exception as err:  # a file cut short fails here
      raise self.error(f'{self.path(name)}: tensor {name!r} unreadable '
                       f'({err})') from None


class Prefixed:
  """The tensors of `reader` under `prefix`, by their names without it (one
  part of a composite checkpoint: MusicGen's 'audio_encoder.' EnCodec);
  reader's interface, paths and errors as the reader's."""

  def __init__(self, reader, prefix: str):
    self.reader, self.prefix, self.error = reader, prefix, reader.error
    self.names = sorted(n[len(prefix):] for n in reader.names
                        if n.startswith(prefix))

  def path(self, name: str) -> str:
    return self.reader.path(self.prefix + name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.reader.shape(self.prefix + name)

  def dtype(self, name: str) -> str:
    return self.reader.dtype(self.prefix + name)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: self.shape(name) for name in self.names}

  def get(self, name: str) -> np.ndarray:
    return self.reader.get(self.prefix + name)
