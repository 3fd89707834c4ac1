"""Token shards of one split, written so that a rerun resumes them.

Work split: with P processes, item i of a split goes to process i % P. Each
process writes its own shards; its j-th item goes to shard j //
`config.data.records_per_shard`. A shard is written under a hidden temporary
name and renamed when complete, after its sidecar (<shard>.json: record count,
bad files, run settings). A rerun with the same --out therefore resumes: a
shard whose final file exists is skipped, everything else is (re)encoded, and
the result is the same as an uninterrupted run. Shards written with other
settings (another codec or checkpoint, other data, process count or shard
size) are an error, not silently mixed in.

Resume is per song, not per shard: while a shard is being written, each
finished item is kept as its own file in the hidden folder `.<shard>.parts/`
(`song_parts`). A rerun takes every item found there as done and encodes only
the rest; the shard is then assembled from the parts in item order, so a
killed run loses at most the song it was encoding, and the dataset is byte for
byte the one an uninterrupted run writes. The folder is removed once its shard
is final.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import jax
from array_record.python import array_record_module
from tqdm import tqdm

from musicjax import fileio
from musicjax.data import song_parts
from musicjax.data import token_records
from musicjax.errors import UserError

_TMP_PREFIX = '.'
_TMP_SUFFIX = '.tmp'
# Finished items of a shard in progress (module docstring: resume per song).
_PARTS_SUFFIX = '.parts'


def atomic_write_json(path: str, obj: Any) -> None:
  """`obj` as JSON at `path`, via a hidden temporary file."""
  fileio.write_text(path, json.dumps(obj, ensure_ascii=False, indent=1,
                                     sort_keys=True),
                    prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)


def _read_sidecar(shard_path: str) -> dict[str, Any] | None:
  try:
    with open(shard_path + token_records.SIDECAR_SUFFIX, encoding='utf-8') as f:
      side = json.load(f)
  except (OSError, ValueError):
    return None
  return side if isinstance(side, dict) else None


def _parts_dir(path: str) -> str:
  directory, name = os.path.split(path)
  return os.path.join(directory, _TMP_PREFIX + name + _PARTS_SUFFIX)


def _write_shard(path: str, items: list[dict[str, Any]], encode, bar,
                 settings: dict[str, Any]) -> dict[str, Any]:
  """Encodes `items` into `path` via a temporary file; returns the sidecar.

  Items already in the shard's parts folder (an interrupted earlier run) are
  taken from there; each newly encoded one is saved there before the next
  starts (`song_parts`).
  """
  parts = song_parts.SongParts(_parts_dir(path), settings, path)
  parts.make(items, encode, bar)
  records, bad = parts.finished(len(items))
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, _TMP_PREFIX + name + _TMP_SUFFIX)
  writer = array_record_module.ArrayRecordWriter(tmp, token_records.WRITER_OPTIONS)
  try:
    for raw in records:
      writer.write(raw)
  finally:
    writer.close()
  return {'tmp': tmp, 'records': len(records), 'bad_files': bad, 'parts': parts}


def prepare_split(split: str, items: list[dict[str, Any]], out_dir: str,
                   settings: dict[str, Any], encode) -> None:
  """Writes (or resumes) this process's shards of `split`.

  `settings` are those of the split (`split_settings`).
  """
  process, count = jax.process_index(), jax.process_count()
  per_shard = settings['records_per_shard']
  mine = items[process::count]
  with tqdm(total=len(mine), desc=f'prepare tokens {split}', unit='song') as bar:
    for shard in range(math.ceil(len(mine) / per_shard)):
      chunk = mine[shard * per_shard:(shard + 1) * per_shard]
      path = os.path.join(out_dir, token_records.shard_name(split, process, shard))
      side = _read_sidecar(path) if os.path.isfile(path) else None
      if side is not None:  # finished in an earlier run
        song_parts.settings_differ(path, side.get('settings', {}), settings)
        shutil.rmtree(_parts_dir(path), ignore_errors=True)  # killed after the rename
        bar.update(len(chunk))
        continue
      done = _write_shard(path, chunk, encode, bar, settings)
      tmp, parts = done.pop('tmp'), done.pop('parts')
      atomic_write_json(path + token_records.SIDECAR_SUFFIX,
                         dict(done, settings=settings))
      os.replace(tmp, path)  # the final name marks the shard done
      parts.remove()


def split_settings(settings: dict[str, Any], split: str,
                    items: list[dict[str, Any]]) -> dict[str, Any]:
  """The run settings of one split: they also pin its items."""
  return dict(settings, split=split,
              items=song_parts.items_fingerprint([it['name'] for it in items]))


def summarise(out_dir: str,
               split_settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Record counts and bad files over every process's shards."""
  counts, bad = {}, {}
  for split, settings in split_settings.items():
    counts[split] = 0
    for path in token_records.shard_paths(out_dir, split):
      side = _read_sidecar(path)
      if side is None:
        raise UserError(f'{path} has no readable sidecar {os.path.basename(path)}'
                        f'{token_records.SIDECAR_SUFFIX}; delete the shard and rerun '
                        'the same `musicjax prepare` to re-encode it')
      song_parts.settings_differ(path, side.get('settings', {}), settings)
      counts[split] += int(side['records'])
      bad.update(side.get('bad_files', {}))
  return {'splits': counts, 'bad_files': bad}
