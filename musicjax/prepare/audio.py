"""`musicjax prepare --config`: a dataset as ArrayRecord shards of audio.

The records are described in `musicjax.data.audio_records`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from tqdm import tqdm

from musicjax import fileio
from musicjax.data import audio
from musicjax.data import audio_records
from musicjax.data import song_parts
from musicjax.data import sources

# Marks a split whose shards are complete, with the settings they were made with.
_DONE = '.{split}.done.json'


def prepare_audio_main(config: ml_collections.ConfigDict, out_dir: str) -> dict[str, int]:
  """Converts the config's source (chorales/folder/...) to ArrayRecord shards.

  Audio is stored at `config.data.sample_rate` with `config.data.channels`.
  A rerun with the same `out_dir` after a kill resumes at the file it was on
  (`song_parts`: each finished file is kept in DIR/.<split>.parts/ until the
  split's shards are written). Returns the number of records per split.
  """
  d = config.data
  os.makedirs(out_dir, exist_ok=True)

  def encode(item):
    x = audio.load_audio(item['source'], d.sample_rate, d.channels,
                         d.max_file_seconds, name=item['name'])
    origin = item['name'] if isinstance(item['source'], str) else None
    meta = dict(item['meta'], origin=item['meta'].get('origin', origin))
    return audio_records.encode_record(x, d.sample_rate, meta)

  counts = {}
  for split in sources.SPLITS:
    items = sources.items(config, split)
    settings = {'format': 'musicjax-audio-records', 'split': split,
                'data': sources.describe(config), 'sample_rate': int(d.sample_rate),
                'channels': int(d.channels),
                'max_file_seconds': float(d.max_file_seconds),
                'records_per_shard': int(d.records_per_shard),
                'items': song_parts.items_fingerprint([it['name'] for it in items])}
    done = os.path.join(out_dir, _DONE.format(split=split))
    finished = _read_json(done)
    if (finished and finished.get('settings') == settings
        and audio_records.shards(out_dir, split)):
      counts[split] = int(finished['records'])  # written by an earlier run
      continue
    parts = song_parts.SongParts(os.path.join(out_dir, f'.{split}.parts'),
                                 settings, os.path.join(out_dir, f'{split}-*'))
    with tqdm(total=len(items), desc=f'prepare {split}', unit='file') as bar:
      parts.make(items, encode, bar)
    records, _ = parts.finished(len(items))
    audio_records.write_raw_records(records, out_dir, d.records_per_shard, split)
    fileio.write_text(done, json.dumps({'settings': settings,
                                        'records': len(records)}))
    parts.remove()
    counts[split] = len(records)
  return counts


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding='utf-8') as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None
