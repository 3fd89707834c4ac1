"""ArrayRecord shards of codec tokens, written by `musicjax prepare --codec-workdir`.

The language model trains on these instead of audio: the codec runs once, at
prepare time, never in the training loop. Layout of DIR (`--out`):

  {split}-p{process:03d}-{shard:05d}.array_record  records, one per song
  {split}-p{process:03d}-{shard:05d}.array_record.json
                           the shard's record count, bad files and settings
  dataset.json             codec facts and counts (written last: marks a finished run)
  tokenizer.json           the text tokenizer trained on the train split

Each record is an `np.savez` archive, read back with allow_pickle=False so
reading a shard never runs code:

  codes                int16 [F, K] (int32 if codebook_size > 32767): the mix's
                       RVQ codes, F frames at the codec frame rate, K codebooks
  melody               int8 [F]: per-frame chroma class (0-11) of the melody
                       source (the vocal stem when known, else the mix); -1 = none
  vocal_codes          [F, K] like codes; only with `--stems`
  accompaniment_codes  [F, K] like codes; only with `--stems`
  meta_json            uint8: UTF-8 JSON of the item's metadata (title, lyrics,
                       phrases, tags, ... whatever the source had) plus 'origin'
                       (the source path), 'id', 'num_frames', 'frame_rate',
                       'sample_rate'
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import Any

import grain
import numpy as np

from musicjax.errors import UserError

FORMAT = 'musicjax-tokens-v1'
DATASET_INFO = 'dataset.json'
TOKENIZER = 'tokenizer.json'
SHARD_PATTERN = '{split}-p{process:03d}-{shard:05d}.array_record'
# Per-shard bookkeeping next to the shard: <shard>.array_record.json.
SIDECAR_SUFFIX = '.json'
STEM_KEYS = ('vocal_codes', 'accompaniment_codes')
# One record per chunk: random access reads exactly one record.
WRITER_OPTIONS = 'group_size:1'
_PREPARE_HINT = ('write them with `musicjax prepare --codec-workdir CODEC_RUN '
                 '--out DIR`')


def codes_dtype(codebook_size: int) -> type:
  """The smallest signed integer type that holds every code."""
  return np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32


def encode_record(codes: np.ndarray, melody: np.ndarray, meta: dict[str, Any],
                  codebook_size: int,
                  stems: dict[str, np.ndarray] | None = None) -> bytes:
  """One song as record bytes.

  Args:
    codes: [F, K] RVQ codes of the mix.
    melody: [F] chroma classes (-1 = no melody).
    meta: JSON-serialisable metadata (stored as UTF-8, non-ASCII kept).
    codebook_size: the codec's codebook size (picks the stored integer type).
    stems: optional {'vocal_codes': [F, K], 'accompaniment_codes': [F, K]}.
  """
  codes = np.asarray(codes)
  melody = np.asarray(melody)
  if codes.ndim != 2 or melody.shape != (codes.shape[0],):
    raise ValueError(f'codes must be [F, K] and melody [F]; got {codes.shape} '
                     f'and {melody.shape}')
  dtype = codes_dtype(codebook_size)
  arrays = {'codes': codes.astype(dtype), 'melody': melody.astype(np.int8)}
  for key, value in (stems or {}).items():
    if key not in STEM_KEYS:
      raise ValueError(f'unknown stem {key!r}; expected one of {STEM_KEYS}')
    if np.shape(value) != codes.shape:
      raise ValueError(f'{key} has shape {np.shape(value)}, codes {codes.shape}')
    arrays[key] = np.asarray(value).astype(dtype)
  arrays['meta_json'] = np.frombuffer(
      json.dumps(meta, ensure_ascii=False).encode('utf-8'), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_record(raw: bytes, name: str) -> dict[str, Any]:
  """{'name', 'codes', 'melody', 'meta', [stems]}; never raises.

  A damaged record gives {'name', 'error'} instead, so a reader can report it
  with `audio.report_bad` and go on.
  """
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop('meta_json').tobytes().decode('utf-8'))
    codes, melody = arrays['codes'], arrays['melody']
    if not isinstance(meta, dict):
      raise ValueError(f'meta_json is a {type(meta).__name__}, not an object')
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f'codes are {codes.dtype} {codes.shape}, not integer [F, K]')
    if melody.shape != (codes.shape[0],):
      raise ValueError(f'melody has shape {melody.shape}, codes {codes.shape}')
    for key in STEM_KEYS:
      if key in arrays and arrays[key].shape != codes.shape:
        raise ValueError(f'{key} has shape {arrays[key].shape}, codes {codes.shape}')
  except Exception as e:  # np.load/json raise many types for damaged bytes
    return {'name': name, 'error': f'damaged record ({type(e).__name__}: {e})'}
  origin = meta.get('origin')
  out = {'name': f'{name} ({origin})' if origin else name,
         'codes': codes, 'melody': melody, 'meta': meta}
  out.update({k: arrays[k] for k in STEM_KEYS if k in arrays})
  return out


def shard_name(split: str, process: int, shard: int) -> str:
  return SHARD_PATTERN.format(split=split, process=process, shard=shard)


def shard_paths(directory: str, split: str) -> list[str]:
  """The finished shards of `split` from every process, in a stable order.

  Temporary files of an interrupted run are hidden (`.<name>.tmp`) and never
  match.
  """
  directory = os.path.expanduser(directory)
  return sorted(glob.glob(os.path.join(directory, f'{split}-p*-*.array_record')))


def source(directory: str, split: str) -> grain.MapDataset:
  """A MapDataset of decoded records of `split` (see `decode_record`).

  Raises:
    UserError: no directory, no shards for `split`, or the shards are empty.
  """
  where = os.path.expanduser(directory)
  if not os.path.isdir(where):
    raise UserError(f'token dataset {directory!r} is not a directory; '
                    f'{_PREPARE_HINT}')
  paths = shard_paths(where, split)
  if not paths:
    raise UserError(f'token dataset {directory!r} has no {split}-p*-*.array_record '
                    f'shards; {_PREPARE_HINT}')
  records = grain.sources.ArrayRecordDataSource(paths)
  n = len(records)
  if n == 0:
    raise UserError(f'the {split} shards in token dataset {directory!r} hold no '
                    f'records (every item was bad?); {_PREPARE_HINT}')
  name = os.path.join(where, f'{split}-*.array_record')
  # Repeat hands parents unbounded indices; the record number is modulo n.
  return grain.MapDataset.source(records).map_with_index(
      lambda i, raw: decode_record(raw, f'{name}#{i % n}'))


def read_dataset_info(directory: str) -> dict[str, Any]:
  """DIR/dataset.json: codec facts, split counts and bad files of a finished run."""
  path = os.path.join(os.path.expanduser(directory), DATASET_INFO)
  if not os.path.isfile(path):
    raise UserError(f'{path} not found: {directory!r} is not a finished token '
                    f'dataset; {_PREPARE_HINT} (an interrupted run resumes)')
  try:
    with open(path, encoding='utf-8') as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not readable JSON ({e}); rerun `musicjax prepare '
                    '--codec-workdir ...` with the same --out') from None
  if not isinstance(info, dict) or info.get('format') != FORMAT:
    raise UserError(f'{path} is not a {FORMAT} dataset description; '
                    f'{_PREPARE_HINT}')
  return info
