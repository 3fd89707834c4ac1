"""The items `musicjax prepare --codec-workdir` encodes, and their ids.

Stems (`--stems`): records also get the codes of the vocal and accompaniment
stems. Chorales have them. A folder dataset (`data.kind=folder`) uses this
convention, one sub-folder per song:

  <data.path>/<song>/vocals.<ext>         the melody stem    (required)
  <data.path>/<song>/accompaniment.<ext>  everything else    (required)
  <data.path>/<song>/mix.<ext>            the full song      (optional; else
                                          vocals + accompaniment, summed)
  <data.path>/<song>/meta.json or <data.path>/<song>.json   metadata (optional)

with <ext> any of `audio.AUDIO_EXTENSIONS`. The split hashes the song folder's
path like `sources.folder_split` hashes file paths. A song with a missing or
duplicated stem is reported and skipped.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections

from musicjax.data import audio
from musicjax.data import chorales
from musicjax.data import sources
from musicjax.errors import UserError

# Folder convention: stem -> file name (without extension) in a song folder.
STEM_FILES = {'vocal': 'vocals', 'accompaniment': 'accompaniment', 'mix': 'mix'}
REQUIRED_STEMS = ('vocal', 'accompaniment')
SONG_META_FILE = 'meta.json'


def _find_stem_songs(root: str) -> dict[str, dict[str, list[str]]]:
  """{song folder: {stem: [files]}} for every folder holding a stem file."""
  by_name = {v: k for k, v in STEM_FILES.items()}
  songs: dict[str, dict[str, list[str]]] = {}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for fn in sorted(filenames):
      base, ext = os.path.splitext(fn)
      if ext.lower() in audio.AUDIO_EXTENSIONS and base.lower() in by_name:
        stems = songs.setdefault(dirpath, {})
        stems.setdefault(by_name[base.lower()], []).append(os.path.join(dirpath, fn))
  return songs


def _song_meta(song_dir: str) -> dict[str, Any]:
  """<song>/meta.json, else <song>.json next to the folder, else {}."""
  inside = os.path.join(song_dir, SONG_META_FILE)
  # sidecar_metadata(p) reads p + '.json': here <song>/meta.json.
  meta = sources.sidecar_metadata(os.path.splitext(inside)[0])
  return meta or sources.sidecar_metadata(song_dir)


def stem_folder_items(config: ml_collections.ConfigDict,
                      split: str) -> list[dict[str, Any]]:
  """Items of a folder of song sub-folders with stems (see the module docstring).

  Each item: {'name': song folder, 'source': mix path or None,
  'stems': {'vocal', 'accompaniment'[, 'mix']: path}, 'meta'}.
  """
  root = os.path.expanduser(config.data.path)
  where = f'config.data.path={config.data.path!r}'
  if not config.data.path or not os.path.isdir(root):
    raise sources.NoUsableAudio(f'{where} is not a directory (--stems with '
                                'data.kind=folder needs a folder of song folders)')
  songs = _find_stem_songs(root)
  dirs = sorted(songs, key=lambda d: os.path.relpath(d, root))
  exts = '|'.join(e.lstrip('.') for e in audio.AUDIO_EXTENSIONS)
  usable = []
  for song in dirs:  # every split's bad songs are named, then the rest split
    found = songs[song]
    missing = [f'{STEM_FILES[s]}.<{exts}>' for s in REQUIRED_STEMS if s not in found]
    doubled = [os.path.basename(p) for s in found.values() if len(s) > 1 for p in s]
    if missing or doubled:
      reason = (f'missing stem {", ".join(missing)}' if missing else
                f'more than one file for a stem: {", ".join(doubled)}')
      audio.report_bad(song, reason)
      continue
    usable.append(song)
  chosen = sources.folder_split(usable, root, config.data.eval_fraction)[split]
  items = []
  for song in chosen:
    stems = {s: paths[0] for s, paths in songs[song].items()}
    items.append({'name': song, 'source': stems.get('mix'), 'stems': stems,
                  'meta': _song_meta(song)})
  if not items:
    raise sources.NoUsableAudio(
        f'no usable song folder for split {split!r} in {where}: --stems with '
        f'data.kind=folder needs sub-folders with {STEM_FILES["vocal"]}.<ext> and '
        f'{STEM_FILES["accompaniment"]}.<ext> ({len(dirs)} song folder(s), '
        f'{len(usable)} usable, the rest named above; each split needs one)')
  return items


def split_items(config: ml_collections.ConfigDict, split: str,
                stems: bool) -> list[dict[str, Any]]:
  """The items of `split` to encode; chorales always carry their stems."""
  kind = config.data.kind
  if stems and kind == 'folder':
    return stem_folder_items(config, split)
  if stems and kind != 'chorales':
    raise UserError(f'--stems needs config.data.kind chorales or folder (song '
                    f'folders with vocals/accompaniment files), got {kind!r}; '
                    'drop --stems or convert the data')
  items = sources.items(config, split)
  if kind == 'chorales':
    by_mix = {e['path']: e['stems'] for e in chorales.chorale_manifest(config, split)}
    items = [dict(it, stems=by_mix[it['source']]) for it in items]
  return items


def _default_id(path: str, root: str | None) -> str:
  """A stable id: the path relative to the data folder, without extension."""
  if root and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
    path = os.path.relpath(path, root)
  else:
    path = os.path.basename(path.rstrip(os.sep))
  base, ext = os.path.splitext(path)
  return base if ext.lower() in audio.AUDIO_EXTENSIONS else path


def item_identity(item: dict[str, Any],
                  config: ml_collections.ConfigDict) -> tuple[str | None, str]:
  """(origin, id) a record of `item` gets; a variant's id has its suffix.

  origin: the source path (None for items read from records), unless the
  metadata names one; id: meta['id'], else the path relative to the data
  folder without extension (`_default_id`).
  """
  variant = item.get('variant') or {}
  name = variant.get('of', item['name'])
  origin = name if isinstance(item['source'], (str, type(None))) else None
  origin = item['meta'].get('origin', origin)
  root = config.data.path if config.data.kind == 'folder' else None
  base = str(item['meta'].get('id') or _default_id(origin or name, root))
  return origin, base + variant.get('suffix', '')
