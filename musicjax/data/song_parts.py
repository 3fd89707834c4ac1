"""Per-song progress of a long `musicjax prepare`, so a killed run resumes at
the song it was on.

While a set of records is being written, each finished item is kept as its own
file in a hidden folder beside the output: `NNNNN.rec` (the record bytes) or
`NNNNN.bad.json` ({path: reason}: why the item was skipped), each written
atomically, next to `settings.json`, the run settings the items were made
with. A rerun takes every item found there as done; the caller assembles the
final shards from the parts in item order (so the result is byte for byte the
one an uninterrupted run writes) and then removes the folder. Parts made with
other settings are an error, never mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable

from musicjax import fileio
from musicjax.data import audio
from musicjax.errors import UserError

_RECORD, _BAD = '{:05d}.rec', '{:05d}.bad.json'
_SETTINGS = 'settings.json'
_TMP = dict(prefix='.', suffix='.tmp')


def _write_json(path: str, obj: Any) -> None:
  fileio.write_text(path, json.dumps(obj, ensure_ascii=False, indent=1,
                                     sort_keys=True), **_TMP)


def _write_bytes(path: str, raw: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(raw)


def items_fingerprint(names: list[str]) -> str:
  """Identifies an item list: a changed dataset would move items between
  shards, so it is part of the settings."""
  h = hashlib.sha1()
  for name in names:
    h.update(name.encode('utf-8') + b'\0')
  return h.hexdigest()


def settings_differ(path: str, found: dict[str, Any],
                    settings: dict[str, Any]) -> None:
  """Raises UserError naming the first setting `found` (written with `path`)
  has other than `settings`."""
  differ = sorted(k for k in set(found) | set(settings)
                  if found.get(k) != settings.get(k))
  if differ:
    k = differ[0]
    raise UserError(
        f'{path} was written with other settings ({k}: {found.get(k)!r}, '
        f'now {settings.get(k)!r}); pass a new --out, or delete '
        f'{os.path.dirname(path) or "."} to start over')


class SongParts:
  """The finished items of one output (a shard, or a split) in `folder`."""

  def __init__(self, folder: str, settings: dict[str, Any], output: str):
    """Opens (or starts) `folder` for `output`, checked against `settings`."""
    self.folder = folder
    marker = os.path.join(folder, _SETTINGS)
    if os.path.isfile(marker):
      try:
        with open(marker, encoding='utf-8') as f:
          found = json.load(f)
      except (OSError, ValueError):
        found = None
      if not isinstance(found, dict):
        raise UserError(f'{marker} is unreadable; delete {folder} (its songs '
                        'are encoded again) and rerun')
      settings_differ(output, found, settings)
    else:
      os.makedirs(folder, exist_ok=True)
      _write_json(marker, settings)

  def get(self, index: int) -> tuple[str, Any] | None:
    """('record', bytes) or ('bad', {path: reason}) of a finished item, else None."""
    rec = os.path.join(self.folder, _RECORD.format(index))
    if os.path.isfile(rec):
      with open(rec, 'rb') as f:
        return 'record', f.read()
    bad = os.path.join(self.folder, _BAD.format(index))
    if os.path.isfile(bad):
      with open(bad, encoding='utf-8') as f:
        return 'bad', json.load(f)
    return None

  def make(self, items: list[Any], encode: Callable[[Any], bytes],
           bar) -> None:
    """Encodes every item not finished yet; `audio.BadAudio` marks it bad."""
    for index, item in enumerate(items):
      if self.get(index) is None:
        try:
          raw = encode(item)
        except audio.BadAudio as e:
          _write_json(os.path.join(self.folder, _BAD.format(index)),
                      {e.path: e.reason})
        else:
          fileio.write_with(os.path.join(self.folder, _RECORD.format(index)),
                            lambda tmp, raw=raw: _write_bytes(tmp, raw), **_TMP)
      bar.update(1)

  def finished(self, count: int) -> tuple[list[bytes], dict[str, str]]:
    """(records in item order, {bad path: reason}) of items 0..count-1, all
    finished; bad items are reported again (a resumed run names them too)."""
    records, bad = [], {}
    for index in range(count):
      kind, value = self.get(index)
      if kind == 'record':
        records.append(value)
      else:
        for path, reason in value.items():
          audio.report_bad(path, reason)
        bad.update(value)
    return records, bad

  def remove(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)
