"""ArrayRecord shards of audio: the record format, writing and reading them.

Written by `musicjax prepare` (`musicjax.prepare.audio`), read by `sources`.

Layout: `DIR/{train,eval}-00000-of-0000N.array_record`; `config.data.path`
points at DIR. Each record is an `np.savez` archive (read back with
allow_pickle=False, so loading a shard never runs code) of three arrays:

  audio_flac   uint8   the FLAC-encoded audio (16-bit)
  sample_rate  int64   its sample rate
  meta_json    uint8   UTF-8 JSON metadata, including 'origin' (the source path)
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable

import grain
import numpy as np
from array_record.python import array_record_module

from musicjax.data import audio
from musicjax.data import npz

_SHARD_PATTERN = '{split}-{index:05d}-of-{count:05d}.array_record'
# One record per chunk: random access reads exactly one record.
_WRITER_OPTIONS = 'group_size:1'


def encode_record(x: np.ndarray, sample_rate: int, meta: dict[str, Any]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf,
           audio_flac=np.frombuffer(audio.encode_flac(x, sample_rate), np.uint8),
           sample_rate=np.int64(sample_rate),
           meta_json=np.frombuffer(
               json.dumps(meta, ensure_ascii=False).encode('utf-8'), np.uint8))
  return buf.getvalue()


def decode_record(raw: bytes, name: str) -> dict[str, Any]:
  """A pipeline item {'name', 'source': FLAC bytes, 'meta'}; on a damaged
  record the item carries 'error' (reported and skipped by the pipeline)."""
  try:
    z = npz.load_npz(raw, ('audio_flac', 'meta_json'))
    flac = z['audio_flac'].tobytes()
    meta = json.loads(z['meta_json'].tobytes().decode('utf-8'))
  except Exception as e:  # np.load raises several types for damaged bytes
    return {'name': name, 'source': b'', 'meta': {},
            'error': f'damaged record ({type(e).__name__}: {e})'}
  origin = meta.get('origin')
  return {'name': f'{name} ({origin})' if origin else name, 'source': flac,
          'meta': meta}


def write_array_record(records: Iterable[dict[str, Any]], out_dir: str,
                       shard_size: int, split: str = 'train') -> list[str]:
  """Writes records {'audio': [T, C], 'sample_rate', 'meta'} as shards.

  Shards are written under temporary names and renamed once the count is
  known, so readers never see a half-written set.
  """
  return write_raw_records(
      (encode_record(r['audio'], r['sample_rate'], r.get('meta', {}))
       for r in records), out_dir, shard_size, split)


def write_raw_records(records: Iterable[bytes], out_dir: str, shard_size: int,
                      split: str = 'train') -> list[str]:
  """`write_array_record` of records already encoded (`encode_record`)."""
  if shard_size < 1:
    raise ValueError(f'shard_size must be >= 1, got {shard_size}')
  os.makedirs(out_dir, exist_ok=True)
  tmp_paths, writer, in_shard = [], None, 0
  try:
    for raw in records:
      if writer is None or in_shard == shard_size:
        if writer is not None:
          writer.close()
        tmp_paths.append(os.path.join(out_dir, f'.{split}-{len(tmp_paths):05d}.tmp'))
        writer = array_record_module.ArrayRecordWriter(tmp_paths[-1],
                                                       _WRITER_OPTIONS)
        in_shard = 0
      writer.write(raw)
      in_shard += 1
  finally:
    if writer is not None:
      writer.close()
  for old in shards(out_dir, split):  # replace a previous set completely
    os.remove(old)
  final = []
  for i, tmp in enumerate(tmp_paths):
    path = os.path.join(out_dir, _SHARD_PATTERN.format(
        split=split, index=i, count=len(tmp_paths)))
    os.replace(tmp, path)
    final.append(path)
  return final


def shards(out_dir: str, split: str) -> list[str]:
  """The shard files of `split` in `out_dir`, sorted."""
  return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                if f.startswith(f'{split}-') and f.endswith('.array_record'))


def read_array_record(out_dir: str, split: str) -> list[dict[str, Any]]:
  """All items of a split (small sets and tests; the pipeline reads lazily)."""
  paths = shards(out_dir, split)
  source = grain.sources.ArrayRecordDataSource(paths)
  return [decode_record(source[i], f'{out_dir}/{split}#{i}')
          for i in range(len(source))]
