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
  chroma               int8 [C]: MusicGen-Melody's chroma class (0..num_chroma-1)
                       of the melody source, C frames at the feature
                       extractor's rate (dataset.json 'chroma' has its
                       settings); only with `--chroma`
  vocal_codes          [F, K] like codes; only with `--stems`
  accompaniment_codes  [F, K] like codes; only with `--stems`
  accompaniment_eq_codes
                       [N, F, K] like codes: N frequency-balance (EQ) copies of
                       the accompaniment stem (`data.augment.eq_copies` = N,
                       `musicjax.data.augment`); only with `--stems` and N > 0
  meta_json            uint8: UTF-8 JSON of the item's metadata (title, lyrics,
                       phrases, tags, ... whatever the source had) plus 'origin'
                       (the source path), 'id', 'num_frames', 'frame_rate',
                       'sample_rate'; with `--stems` also 'stem_stats'
                       {'vocal_rms_db', 'accompaniment_rms_db' (dBFS of the
                       whole stem), 'vocal_active', 'accompaniment_active'
                       (share of codec frames above an activity level)}; tempo
                       / pitch copies also 'augment' {'time_stretch': rate} or
                       {'pitch_shift': semitones}
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import Any, Sequence

import grain
import numpy as np

from musicjax.data import npz
from musicjax.errors import UserError

FORMAT = 'musicjax-tokens-v1'
DATASET_INFO = 'dataset.json'
TOKENIZER = 'tokenizer.json'
SHARD_PATTERN = '{split}-p{process:03d}-{shard:05d}.array_record'
# Per-shard bookkeeping next to the shard: <shard>.array_record.json.
SIDECAR_SUFFIX = '.json'
STEM_KEYS = ('vocal_codes', 'accompaniment_codes')
# Stacks of N variants of a stem: [N, F, K].
ACCOMPANIMENT_EQ_KEY = 'accompaniment_eq_codes'
STEM_VARIANT_KEYS = (ACCOMPANIMENT_EQ_KEY,)
# One record per chunk: random access reads exactly one record.
WRITER_OPTIONS = 'group_size:1'
CHROMA_KEY = 'chroma'
_PREPARE_HINT = ('write them with `musicjax prepare --codec-workdir CODEC_RUN '
                 '--out DIR`')


def codes_dtype(codebook_size: int) -> type:
  """The smallest signed integer type that holds every code."""
  return np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32


def encode_record(codes: np.ndarray, melody: np.ndarray, meta: dict[str, Any],
                  codebook_size: int,
                  stems: dict[str, np.ndarray] | None = None, *,
                  chroma: np.ndarray | None = None) -> bytes:
  """One song as record bytes.

  Args:
    codes: [F, K] RVQ codes of the mix.
    melody: [F] chroma classes (-1 = no melody).
    meta: JSON-serialisable metadata (stored as UTF-8, non-ASCII kept).
    codebook_size: the codec's codebook size (picks the stored integer type).
    stems: optional {'vocal_codes': [F, K], 'accompaniment_codes': [F, K],
      'accompaniment_eq_codes': [N, F, K]}.
    chroma: optional [C] MusicGen-Melody chroma classes.
  """
  codes = np.asarray(codes)
  melody = np.asarray(melody)
  if codes.ndim != 2 or melody.shape != (codes.shape[0],):
    raise ValueError(f'codes must be [F, K] and melody [F]; got {codes.shape} '
                     f'and {melody.shape}')
  dtype = codes_dtype(codebook_size)
  arrays = {'codes': codes.astype(dtype), 'melody': melody.astype(np.int8)}
  if chroma is not None:
    arrays[CHROMA_KEY] = _checked_chroma(np.asarray(chroma))
  for key, value in (stems or {}).items():
    if key not in STEM_KEYS + STEM_VARIANT_KEYS:
      raise ValueError(f'unknown stem {key!r}; expected one of '
                       f'{STEM_KEYS + STEM_VARIANT_KEYS}')
    _check_stem_shape(key, np.shape(value), codes.shape)
    arrays[key] = np.asarray(value).astype(dtype)
  arrays['meta_json'] = np.frombuffer(
      json.dumps(meta, ensure_ascii=False).encode('utf-8'), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _checked_chroma(chroma: np.ndarray) -> np.ndarray:
  if (chroma.ndim != 1 or not len(chroma) or
      not np.issubdtype(chroma.dtype, np.integer) or chroma.min() < 0 or
      chroma.max() > np.iinfo(np.int8).max):
    raise ValueError(f'chroma must be non-empty [C] integer classes >= 0, got '
                     f'{chroma.dtype} {chroma.shape}')
  return chroma.astype(np.int8)


def _check_stem_shape(key: str, shape: tuple[int, ...],
                      codes_shape: tuple[int, ...]) -> None:
  """[F, K] like the codes, or [N, F, K] for STEM_VARIANT_KEYS."""
  want = tuple(codes_shape)
  got = tuple(shape[1:]) if key in STEM_VARIANT_KEYS else tuple(shape)
  if got != want or (key in STEM_VARIANT_KEYS and len(shape) != len(want) + 1):
    form = '[N, F, K]' if key in STEM_VARIANT_KEYS else '[F, K]'
    raise ValueError(f'{key} has shape {tuple(shape)}, expected {form} with '
                     f'[F, K] = codes {want}')


def decode_record(raw: bytes, name: str) -> dict[str, Any]:
  """{'name', 'codes', 'melody', 'meta', [stems and variants, chroma]}; never
  raises.

  A damaged record gives {'name', 'error'} instead, so a reader can report it
  with `audio.report_bad` and go on.
  """
  try:
    arrays = npz.load_npz(raw)
    meta = json.loads(arrays.pop('meta_json').tobytes().decode('utf-8'))
    codes, melody = arrays['codes'], arrays['melody']
    if not isinstance(meta, dict):
      raise ValueError(f'meta_json is a {type(meta).__name__}, not an object')
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f'codes are {codes.dtype} {codes.shape}, not integer [F, K]')
    if melody.shape != (codes.shape[0],):
      raise ValueError(f'melody has shape {melody.shape}, codes {codes.shape}')
    for key in STEM_KEYS + STEM_VARIANT_KEYS:
      if key in arrays:
        _check_stem_shape(key, arrays[key].shape, codes.shape)
    if CHROMA_KEY in arrays:
      _checked_chroma(arrays[CHROMA_KEY])
  except Exception as e:  # np.load/json raise many types for damaged bytes
    return {'name': name, 'error': f'damaged record ({type(e).__name__}: {e})'}
  origin = meta.get('origin')
  out = {'name': f'{name} ({origin})' if origin else name,
         'codes': codes, 'melody': melody, 'meta': meta}
  out.update({k: arrays[k] for k in STEM_KEYS + STEM_VARIANT_KEYS + (CHROMA_KEY,)
              if k in arrays})
  return out


def decode_meta(raw: bytes, name: str) -> dict[str, Any]:
  """Only the metadata of a record (no code arrays parsed); never raises.

  {'name', 'meta'}, or {'name', 'error'} for a damaged record.
  """
  try:
    z = npz.load_npz(raw, ('meta_json',))
    meta = json.loads(z['meta_json'].tobytes().decode('utf-8'))
    if not isinstance(meta, dict):
      raise ValueError(f'meta_json is a {type(meta).__name__}, not an object')
  except Exception as e:  # np.load/json raise many types for damaged bytes
    return {'name': name, 'error': f'damaged record ({type(e).__name__}: {e})'}
  origin = meta.get('origin')
  return {'name': f'{name} ({origin})' if origin else name, 'meta': meta}


def shard_name(split: str, process: int, shard: int) -> str:
  return SHARD_PATTERN.format(split=split, process=process, shard=shard)


def shard_paths(directory: str, split: str) -> list[str]:
  """The finished shards of `split` from every process, in a stable order.

  Temporary files of an interrupted run are hidden (`.<name>.tmp`) and never
  match.
  """
  directory = os.path.expanduser(directory)
  return sorted(glob.glob(os.path.join(directory, f'{split}-p*-*.array_record')))


def _require_directory(directory: str) -> None:
  """An empty path is an unset config.data.path: say so, not "'' not found"."""
  if not str(directory).strip():
    raise UserError('config.data.path is empty, so there is no token dataset to '
                    'read: set it to the directory that `musicjax prepare '
                    '--codec-workdir CODEC_RUN --out DIR` wrote, e.g. '
                    '--config.data.path=DIR')


def _open_records(directory: str, split: str):
  """(ArrayRecordDataSource of `split`, the name prefix of its records).

  Raises:
    UserError: no directory, no shards for `split`, or the shards are empty.
  """
  _require_directory(directory)
  where = os.path.expanduser(directory)
  if not os.path.isdir(where):
    raise UserError(f'token dataset {directory!r} is not a directory; '
                    f'{_PREPARE_HINT}')
  paths = shard_paths(where, split)
  if not paths:
    raise UserError(f'token dataset {directory!r} has no {split}-p*-*.array_record '
                    f'shards; {_PREPARE_HINT}')
  records = grain.sources.ArrayRecordDataSource(paths)
  if len(records) == 0:
    raise UserError(f'the {split} shards in token dataset {directory!r} hold no '
                    f'records (every item was bad?); {_PREPARE_HINT}')
  return records, os.path.join(where, f'{split}-*.array_record')


class _Subset:
  """(record number, raw record) of the chosen records, as a sequence."""

  def __init__(self, records, keep: list[int]):
    self._records, self._keep = records, keep

  def __len__(self) -> int:
    return len(self._keep)

  def __getitem__(self, i: int) -> tuple[int, bytes]:
    number = self._keep[i]
    return number, self._records[number]


def source(directory: str, split: str,
           keep: Sequence[int] | None = None) -> grain.MapDataset:
  """A MapDataset of decoded records of `split` (see `decode_record`).

  Args:
    directory: the token dataset.
    split: 'train' or 'eval'.
    keep: only these record numbers (of all shards of `split`, in
      `shard_paths` order), in this order; None = every record. Names keep
      the original numbers ('<DIR>/train-*.array_record#7').

  Raises:
    UserError: no directory, no shards for `split`, the shards are empty, or
      `keep` is empty or names records that do not exist.
  """
  records, name = _open_records(directory, split)
  n = len(records)
  if keep is None:
    # Repeat hands parents unbounded indices; the record number is modulo n.
    return grain.MapDataset.source(records).map_with_index(
        lambda i, raw: decode_record(raw, f'{name}#{i % n}'))
  keep = [int(i) for i in keep]
  if not keep:
    raise UserError(f'no {split} record of token dataset {directory!r} is left '
                    'to read (all were filtered out)')
  outside = [i for i in keep if not 0 <= i < n]
  if outside:
    raise ValueError(f'record numbers {outside[:3]} are outside the {n} '
                     f'{split} records of {directory!r}')
  return grain.MapDataset.source(_Subset(records, keep)).map(
      lambda item: decode_record(item[1], f'{name}#{item[0]}'))


# Records read per call when only the metadata is wanted.
_META_READ_BATCH = 64


def metas(directory: str, split: str) -> list[dict[str, Any]]:
  """`decode_meta` of every record of `split`, in record-number order.

  Reads every record once (the metadata lives inside each record).

  Raises:
    UserError: as `source`.
  """
  records, name = _open_records(directory, split)
  out = []
  for start in range(0, len(records), _META_READ_BATCH):
    numbers = list(range(start, min(start + _META_READ_BATCH, len(records))))
    for i, raw in zip(numbers, records.__getitems__(numbers)):
      out.append(decode_meta(raw, f'{name}#{i}'))
  return out


def read_dataset_info(directory: str) -> dict[str, Any]:
  """DIR/dataset.json: codec facts, split counts and bad files of a finished run."""
  _require_directory(directory)
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
