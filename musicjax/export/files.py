"""Reading and writing an export directory's safetensors files.

One `model.safetensors`, or shards `model-00001-of-0000N.safetensors` plus
`model.safetensors.index.json` ({"metadata": {"total_size": bytes},
"weight_map": {tensor: file}}, the layout PyTorch tooling reads). Only
tensors: nothing is pickled, and nothing here ever unpickles.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

import numpy as np

from musicjax import fileio

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


class ExportFileError(ValueError):
  """A missing, truncated or inconsistent export file; the message names it."""


def write(tensors: dict[str, np.ndarray], out_dir: str,
          max_shard_bytes: int) -> list[str]:
  """Writes the tensors (sorted by name) and returns the file names."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  # Weight files of an earlier export here would be read instead of (or
  # mixed with) these: the reader prefers an index.
  for old in os.listdir(out_dir):
    if old in (SINGLE, INDEX) or re.fullmatch(r'model-\d{5}-of-\d{5}\.safetensors', old):
      os.remove(os.path.join(out_dir, old))
  names = sorted(tensors)

  def save(group, fname):
    # Under a temporary name first (a crash never leaves half a weights file
    # under the real one), then the umask's mode: safetensors writes 0600.
    fileio.write_with(os.path.join(out_dir, fname),
                      lambda tmp: save_file({n: tensors[n] for n in group}, tmp))

  shards: list[list[str]] = [[]]
  size = 0
  for n in names:
    nbytes = tensors[n].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(n)
    size += nbytes
  if len(shards) == 1:
    save(names, SINGLE)
    return [SINGLE]
  files, weight_map = [], {}
  for i, group in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save(group, fname)
    files.append(fname)
    weight_map.update({n: fname for n in group})
  total = int(sum(t.nbytes for t in tensors.values()))
  with open(os.path.join(out_dir, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f,
              indent=1, sort_keys=True)
  files.append(INDEX)
  return files


def _open(path: str):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ExportFileError(f'{path}: missing (was the export copied completely?)')
  if not os.access(path, os.R_OK):
    # Exports written before 2026-11-22 were 0600 (safetensors' own mode).
    raise ExportFileError(f'{path}: not readable by this user (mode '
                          f'{os.stat(path).st_mode & 0o777:o}); its owner can '
                          f'run chmod a+r {path}')
  try:
    return safe_open(path, framework='np')
  except Exception as e:  # safetensors raises its own error types
    raise ExportFileError(f'{path}: not a readable safetensors file ({e}); '
                          'it may be truncated: export again') from None


def reader(export_dir: str) -> tuple[Callable[[str], np.ndarray], list[str]]:
  """(get(name) -> array, all tensor names) of an export directory."""
  index = os.path.join(export_dir, INDEX)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
    except (ValueError, KeyError) as e:
      raise ExportFileError(f'{index}: not a safetensors index ({e})') from None
  elif os.path.isfile(os.path.join(export_dir, SINGLE)):
    weight_map = None
  else:
    raise ExportFileError(f'{export_dir}: no {SINGLE} or {INDEX} (not an export '
                          'directory, or an incomplete copy)')
  handles = {}

  def handle(fname):
    if fname not in handles:
      handles[fname] = _open(os.path.join(export_dir, fname))
    return handles[fname]

  if weight_map is None:
    names = list(handle(SINGLE).keys())
    weight_map = {n: SINGLE for n in names}

  def get(name: str) -> np.ndarray:
    if name not in weight_map:
      raise ExportFileError(f'{export_dir}: tensor {name!r} is missing')
    fname = weight_map[name]
    h = handle(fname)
    if name not in h.keys():
      raise ExportFileError(f'{os.path.join(export_dir, fname)}: tensor '
                            f'{name!r} listed in the index is not in the file')
    try:
      return h.get_tensor(name)
    except Exception as e:  # a file cut short fails here
      raise ExportFileError(f'{os.path.join(export_dir, fname)}: tensor '
                            f'{name!r} unreadable ({e})') from None

  return get, sorted(weight_map)
