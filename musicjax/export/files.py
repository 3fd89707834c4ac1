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
from safetensors.numpy import save_file

from musicjax import fileio
from musicjax.export.released import reader as released_reader

SINGLE = released_reader.SINGLE
INDEX = released_reader.INDEX


class ExportFileError(ValueError):
  """A missing, truncated or inconsistent export file; the message names it."""


def write(tensors: dict[str, np.ndarray], out_dir: str,
          max_shard_bytes: int) -> list[str]:
  """Writes the tensors (sorted by name) and returns the file names."""
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


def reader(export_dir: str) -> tuple[Callable[[str], np.ndarray], list[str]]:
  """(get(name) -> array as stored, all tensor names) of an export directory."""
  r = released_reader.Reader(export_dir, ExportFileError, 'an export directory',
                             'export again')
  return r.get, r.names
