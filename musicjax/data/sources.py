"""Random-access sources of audio items, one per `config.data.kind`.

An item is a dict {'name': str, 'source': path or encoded bytes, 'meta': dict}.
File-based sources (chorales, folder) are scanned upfront in the calling (main)
process: every unusable file is reported with `audio.report_bad` and left out,
so `audio.bad_file_count()` in the trainer sees them even when Grain decodes in
worker processes. Record-based sources (array_record, tfds) hold audio that the
project wrote from an already-scanned source; problems found while reading them
are reported by the pipeline.

Folder split: every audio file of the folder is scanned first (both splits,
so each bad file is named whichever split it would fall in), and the usable
ones are split. A file is in 'eval' iff the first 32 bits of the SHA-1 of its
path relative to `config.data.path`, read as a fraction of 2**32, are below
`config.data.eval_fraction`. It depends on nothing but the path, so adding
files never moves others. If that leaves eval empty and the folder has >= 2
usable files, the usable file with the smallest hash goes to eval (a folder
with one usable file has no eval split unless eval_fraction is 1; train
without evaluation, `config.train.eval_every=0`); likewise, if train would be
empty, the largest hash goes to train. So a small folder whose hashed eval files are all bad
still trains and evaluates, on a good file moved over.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Any, Sequence

import grain
import ml_collections

from musicjax.data import audio
from musicjax.data import audio_records
from musicjax.data import chorales
from musicjax.errors import UserError

logger = logging.getLogger('musicjax.data')

SPLITS = ('train', 'eval')
KINDS = ('chorales', 'folder', 'array_record', 'tfds')


class NoUsableAudio(UserError, ValueError):
  """No usable audio file was found for a split."""


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


# ------------------------------------------------------------------ folder


def _hash_fraction(rel_path: str) -> float:
  digest = hashlib.sha1(rel_path.encode('utf-8')).digest()
  return int.from_bytes(digest[:4], 'big') / 2**32


def list_audio_files(root: str) -> list[str]:
  """All audio files under `root` (recursive), sorted by relative path."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for fn in filenames:
      if fn.lower().endswith(audio.AUDIO_EXTENSIONS):
        found.append(os.path.join(dirpath, fn))
  return sorted(found, key=lambda p: os.path.relpath(p, root))


def folder_split(files: Sequence[str], root: str,
                 eval_fraction: float) -> dict[str, list[str]]:
  rels = {f: os.path.relpath(f, root) for f in files}
  frac = {f: _hash_fraction(r) for f, r in rels.items()}
  eval_set = {f for f in files if frac[f] < eval_fraction}
  if not eval_set and len(files) >= 2 and eval_fraction > 0:
    eval_set = {min(files, key=lambda f: (frac[f], rels[f]))}
  # Train needs a file more than eval, unless eval_fraction 1 asks for all.
  if files and len(eval_set) == len(files) and (len(files) >= 2 or
                                                eval_fraction < 1):
    eval_set.remove(max(files, key=lambda f: (frac[f], rels[f])))
  return {'train': [f for f in files if f not in eval_set],
          'eval': [f for f in files if f in eval_set]}


def sidecar_metadata(path: str) -> dict[str, Any]:
  """`<file>.json` (e.g. song.wav.json) or `<stem>.json` (song.json), else {}."""
  for candidate in (path + '.json', os.path.splitext(path)[0] + '.json'):
    if os.path.isfile(candidate):
      try:
        with open(candidate, encoding='utf-8') as f:
          meta = json.load(f)
      except (OSError, ValueError) as e:
        logger.warning('musicjax: ignoring unreadable metadata %s: %s',
                       candidate, e)
        return {}
      if not isinstance(meta, dict):
        logger.warning('musicjax: ignoring metadata %s: expected a JSON object,'
                       ' got %s', candidate, type(meta).__name__)
        return {}
      return meta
  return {}


# Scan results by (path, size, mtime, limits): every eval rebuilds its dataset.
_scanned: dict[tuple[Any, ...], str | None] = {}


def scan(paths: Sequence[str], config: ml_collections.ConfigDict) -> list[str]:
  """The usable files of `paths`; reports each unusable one (main process)."""
  good = []
  limits = (config.data.segment_seconds, config.data.max_file_seconds)
  for p in paths:
    try:
      st = os.stat(p)
      key = (p, st.st_size, st.st_mtime_ns, *limits)
    except OSError:
      key = None
    reason = _scanned.get(key, '') if key else ''
    if reason == '':  # not scanned yet
      try:
        audio.check_file(p, min_seconds=limits[0], max_seconds=limits[1])
        reason = None
      except audio.BadAudio as e:
        reason = e.reason
      if key:
        _scanned[key] = reason
    if reason is not None:
      audio.report_bad(p, reason)
      continue
    good.append(p)
  return good


def _no_usable(config, split: str, where: str, total: int) -> NoUsableAudio:
  return NoUsableAudio(
      f'no usable audio found for split {split!r} in {where} '
      f'(config.data.kind={config.data.kind!r}): {total} candidate file(s), '
      f'{audio.bad_file_count()} bad file(s) reported above')


def folder_items(config: ml_collections.ConfigDict, split: str) -> list[dict[str, Any]]:
  _check_split(split)
  root = os.path.expanduser(config.data.path)
  where = f'config.data.path={config.data.path!r}'
  if not config.data.path or not os.path.isdir(root):
    raise NoUsableAudio(f'{where} is not a directory (data.kind=folder needs a '
                        'folder of wav/flac/ogg/mp3 files)')
  files = list_audio_files(root)
  usable = scan(files, config)
  splits = folder_split(usable, root, config.data.eval_fraction)
  if not splits[split]:
    counts = ', '.join(f'{k} {len(v)}' for k, v in splits.items())
    fix = ('add audio files' if len(usable) < 2 else
           'raise config.data.eval_fraction above 0')
    raise NoUsableAudio(
        f'no usable audio for split {split!r} in {where}: {len(files)} audio '
        f'file(s), {len(usable)} usable ({counts}) and {len(files) - len(usable)} '
        f'bad (each named above). Each split needs a usable file: {fix}'
        + (', or train without evaluation (--config.train.eval_every=0)'
           if split == 'eval' else ''))
  return [{'name': p, 'source': p, 'meta': sidecar_metadata(p)}
          for p in splits[split]]


def chorale_items(config: ml_collections.ConfigDict, split: str) -> list[dict[str, Any]]:
  entries = chorales.chorale_manifest(config, split)
  good = set(scan([e['path'] for e in entries], config))
  items = [{'name': e['path'], 'source': e['path'], 'meta': e['meta']}
           for e in entries if e['path'] in good]
  if not items:
    raise _no_usable(config, split,
                     f'config.data.cache_dir={config.data.cache_dir!r}',
                     len(entries))
  return items


# ------------------------------------------------------------ array_record


def array_record_paths(directory: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, f'{split}-*-of-*.array_record')))


def array_record_dataset(config: ml_collections.ConfigDict,
                         split: str) -> grain.MapDataset:
  _check_split(split)
  directory = os.path.expanduser(config.data.path)
  paths = array_record_paths(directory, split)
  if not paths:
    raise NoUsableAudio(
        f'no usable audio found: config.data.path={config.data.path!r} has no '
        f'{split}-*-of-*.array_record shards (write them with `musicjax prepare`)')
  source = grain.sources.ArrayRecordDataSource(paths)
  if len(source) == 0:
    raise NoUsableAudio(f'no usable audio found: the {split} shards under '
                        f'config.data.path={config.data.path!r} are empty')
  name = os.path.join(directory, f'{split}-*.array_record')
  n = len(source)
  # Repeat hands parents unbounded indices; the record number is modulo n.
  return grain.MapDataset.source(source).map_with_index(
      lambda i, raw: audio_records.decode_record(raw, f'{name}#{i % n}'))


def tfds_dataset(config: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  # Deferred: tensorflow_datasets is slow to import and only this kind needs it.
  from musicjax.data import tfds_chorales  # pylint: disable=g-import-not-at-top
  _check_split(split)
  source = tfds_chorales.data_source(config, split)
  if len(source) == 0:
    raise NoUsableAudio(f'no usable audio found: the tfds {split} split under '
                        f'config.data.path={config.data.path!r} is empty')
  n = len(source)
  return grain.MapDataset.source(source).map_with_index(
      lambda i, example: tfds_chorales.to_item(i % n, example))


def source_dataset(config: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """A MapDataset of items for `config.data.kind` and `split`."""
  kind = config.data.kind
  if kind == 'chorales':
    return grain.MapDataset.source(chorale_items(config, split))
  if kind == 'folder':
    return grain.MapDataset.source(folder_items(config, split))
  if kind == 'array_record':
    return array_record_dataset(config, split)
  if kind == 'tfds':
    return tfds_dataset(config, split)
  raise ValueError(f'unknown config.data.kind={kind!r}; expected one of {KINDS}')


def items(config: ml_collections.ConfigDict, split: str) -> list[dict[str, Any]]:
  """Materialised items of a file-based source (for `musicjax prepare`)."""
  kind = config.data.kind
  if kind == 'chorales':
    return chorale_items(config, split)
  if kind == 'folder':
    return folder_items(config, split)
  ds = source_dataset(config, split)
  return [ds[i] for i in range(len(ds))]


def describe(config: ml_collections.ConfigDict) -> str:
  """Where a config's data comes from, named by its config keys."""
  if config.data.kind == 'chorales':
    return f'config.data.cache_dir={config.data.cache_dir!r} (chorales)'
  return f'config.data.path={config.data.path!r} ({config.data.kind})'
