"""Preference pairs for DPO (musicjax/lm/dpo.py): records, parsing, datasets.

Pairs (`dpo.pairs`) are a JSONL file or a directory of ArrayRecord shards, as
written by `musicjax prefs` (musicjax/lm/prefs.py). The whole source is
validated when the dataset is built, so a malformed record stops the run
before the first step rather than hours in. Both candidates are laid out in
the prefix layout with the same prompt; a candidate longer than
`data.max_frames` is cut there (no END).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sys
from typing import Any, Mapping

import grain
import ml_collections
import numpy as np

from musicjax.config import ConfigError
from musicjax.data import npz
from musicjax.data import song_text
from musicjax.errors import UserError
from musicjax.lm import conditions
from musicjax.lm import layout
from musicjax.lm import sequence
from musicjax.lm import token_data
from musicjax.lm.data import audio_slots, local_batch
from musicjax.parallel import distributed

ConfigDict = ml_collections.ConfigDict

SIDES = ('winner', 'loser')
# Slot arrays of one candidate (musicjax/lm/sequence.py `assemble`).
SEQ_KEYS = ('text', 'audio', 'melody', 'positions', 'valid')
# Keys of a JSONL pair. Informational keys (written by `musicjax prefs`) are
# allowed and ignored; anything else is a typo and an error.
_CODE_KEYS = ('winner', 'loser')
_NPZ_KEYS = ('winner_npz', 'loser_npz')
_END_KEYS = ('winner_end', 'loser_end')
_TEXT_KEYS = ('tags', 'lyrics')
_INFO_KEYS = ('scores', 'metric', 'source', 'seed')
_JSONL_KEYS = (_CODE_KEYS + _NPZ_KEYS + _END_KEYS + _TEXT_KEYS + ('melody',)
               + _INFO_KEYS)
# ArrayRecord pair records (np.savez): '<side>_codes' [F, K], optional
# 'melody' [F], and meta_json with the text keys, END flags and info keys.
_RECORD_CODES = '{side}_codes'
_NPZ_CODES = 'codes'
JSONL_SUFFIX = '.jsonl'
SHARD_SUFFIX = '.array_record'
# Eval split: records whose index hash (in [0, 1)) is below dpo.eval_fraction.
_HASH_BYTES = 4


def _say(msg: str) -> None:
  if distributed.is_primary():
    print(f'[dpo] {msg}', file=sys.stderr, flush=True)


def _codes(value: Any, where: str, what: str, num_codebooks: int,
           codebook_size: int) -> np.ndarray:
  """A candidate's codes as int32 [F, K], checked."""
  try:
    arr = np.asarray(value)
  except (ValueError, TypeError) as e:
    raise UserError(f'{where}: {what} is not a rectangular [frames][codebooks] '
                    f'array of integers ({e})') from None
  if arr.ndim != 2 or arr.shape[0] < 1 or not (
      np.issubdtype(arr.dtype, np.integer)):
    raise UserError(f'{where}: {what} must be a non-empty [frames][codebooks] '
                    f'array of integers, got {arr.dtype} shape {arr.shape}')
  if arr.shape[1] != num_codebooks:
    raise UserError(f'{where}: {what} has {arr.shape[1]} codebooks per frame, '
                    f'but config.model.num_codebooks = {num_codebooks}; make '
                    'the pairs with this LM (`musicjax prefs --workdir ...`)')
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= codebook_size:
    raise UserError(f'{where}: {what} has codes in [{lo}, {hi}], outside '
                    f'[0, {codebook_size}) (config.model.codebook_size)')
  return arr.astype(np.int32)


def _melody(value: Any, where: str) -> np.ndarray | None:
  """Per-frame chroma classes 0..11 (-1: silent), or None."""
  if value is None:
    return None
  try:
    arr = np.asarray(value)
  except (ValueError, TypeError):
    arr = np.zeros((0, 0))
  if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise UserError(f'{where}: "melody" must be a list of integers (chroma '
                    f'class per frame), got shape {arr.shape}')
  if arr.size and (arr.min() < -1 or arr.max() >= layout.MELODY_CLASSES):
    raise UserError(f'{where}: "melody" values must be in [-1, '
                    f'{layout.MELODY_CLASSES - 1}] (chroma class, -1 = silent)')
  return arr.astype(np.int32)


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
  value = obj.get(key, '')
  if not isinstance(value, str):
    raise UserError(f'{where}: "{key}" must be a string, got '
                    f'{type(value).__name__}')
  return value


def _end(obj: Mapping[str, Any], key: str, where: str) -> bool:
  value = obj.get(key, True)
  if not isinstance(value, bool):
    raise UserError(f'{where}: "{key}" must be true or false')
  return value


def _load_npz_codes(path: str, where: str, key: str, k: int, v: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise UserError(f'{where}: "{key}" file not found: {path}')
  try:
    with np.load(path, allow_pickle=False) as z:
      if _NPZ_CODES not in z.files:
        raise UserError(f'{where}: {path} ("{key}") has no "{_NPZ_CODES}" array '
                        f'(has {sorted(z.files)})')
      arr = z[_NPZ_CODES]
  except (OSError, ValueError) as e:
    raise UserError(f'{where}: {path} ("{key}") is not a readable .npz '
                    f'({e})') from None
  return _codes(arr, where, f'"{key}" codes', k, v)


def parse_pair(obj: Any, where: str, base_dir: str, num_codebooks: int,
               codebook_size: int) -> dict[str, Any]:
  """One JSONL object -> {'tags', 'lyrics', 'melody', 'winner', 'loser',
  'winner_end', 'loser_end'}; raises UserError naming `where`."""
  if not isinstance(obj, dict):
    raise UserError(f'{where}: expected a JSON object, got {type(obj).__name__}')
  unknown = sorted(set(obj) - set(_JSONL_KEYS))
  if unknown:
    raise UserError(f'{where}: unknown key(s) {unknown}; a pair has '
                    f'{list(_TEXT_KEYS)}, "melody", "winner"/"loser" (codes) '
                    'or "winner_npz"/"loser_npz" (paths)')
  out: dict[str, Any] = {k: _text(obj, k, where) for k in _TEXT_KEYS}
  out['melody'] = _melody(obj.get('melody'), where)
  for side, npz_key, end_key in zip(_CODE_KEYS, _NPZ_KEYS, _END_KEYS):
    if side in obj and npz_key in obj:
      raise UserError(f'{where}: give either "{side}" or "{npz_key}", not both')
    if side in obj:
      out[side] = _codes(obj[side], where, f'"{side}"', num_codebooks,
                         codebook_size)
    elif npz_key in obj:
      if not isinstance(obj[npz_key], str):
        raise UserError(f'{where}: "{npz_key}" must be a path string')
      path = os.path.join(base_dir, os.path.expanduser(obj[npz_key]))
      out[side] = _load_npz_codes(path, where, npz_key, num_codebooks,
                                  codebook_size)
    else:
      raise UserError(f'{where}: missing key "{side}" (codes [frames][K]) or '
                      f'"{npz_key}" (an .npz with "{_NPZ_CODES}")')
    out[end_key] = _end(obj, end_key, where)
  return out


def encode_pair_record(pair: Mapping[str, Any],
                       info: Mapping[str, Any] | None = None) -> bytes:
  """A pair as ArrayRecord record bytes (np.savez; read with allow_pickle=False)."""
  meta = {k: pair.get(k, '') for k in _TEXT_KEYS}
  meta.update({k: bool(pair.get(k, True)) for k in _END_KEYS})
  meta.update(info or {})
  arrays = {_RECORD_CODES.format(side=s): np.asarray(pair[s], np.int32)
            for s in SIDES}
  if pair.get('melody') is not None:
    arrays['melody'] = np.asarray(pair['melody'], np.int8)
  arrays['meta_json'] = np.frombuffer(
      json.dumps(meta, ensure_ascii=False).encode('utf-8'), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_pair_record(raw: bytes, where: str, num_codebooks: int,
                       codebook_size: int) -> dict[str, Any]:
  try:
    arrays = npz.load_npz(raw)
    meta = json.loads(arrays.pop('meta_json').tobytes().decode('utf-8'))
  except Exception as e:  # np.load/json raise many types for damaged bytes
    raise UserError(f'{where}: damaged pair record ({type(e).__name__}: {e})'
                    ) from None
  names = {s: _RECORD_CODES.format(side=s) for s in SIDES}
  missing = [n for n in names.values() if n not in arrays]
  if missing:
    raise UserError(f'{where}: pair record lacks {missing}')
  if not isinstance(meta, dict):
    raise UserError(f'{where}: meta_json must be a JSON object')
  obj = dict(meta)
  obj.update({s: arrays[n] for s, n in names.items()})
  if 'melody' in arrays:
    obj['melody'] = arrays['melody']
  return parse_pair(obj, where, '', num_codebooks, codebook_size)


class JsonlPairs:
  """Random access to the pairs of a JSONL file by line offsets (picklable)."""

  def __init__(self, path: str, offsets: list[tuple[int, int]],
               num_codebooks: int, codebook_size: int):
    self.path = path
    self._offsets = offsets   # (byte offset, line number) per pair
    self._k, self._v = num_codebooks, codebook_size

  def __len__(self) -> int:
    return len(self._offsets)

  def where(self, i: int) -> str:
    return f'{self.path} line {self._offsets[i][1]}'

  def __getitem__(self, i: int) -> dict[str, Any]:
    offset, _ = self._offsets[i]
    with open(self.path, 'rb') as f:
      f.seek(offset)
      line = f.readline()
    return self._parse(line, self.where(i))

  def _parse(self, line: bytes, where: str) -> dict[str, Any]:
    try:
      obj = json.loads(line.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
      raise UserError(f'{where}: not valid JSON ({e})') from None
    return parse_pair(obj, where, os.path.dirname(self.path), self._k, self._v)

  @classmethod
  def scan(cls, path: str, num_codebooks: int, codebook_size: int) -> 'JsonlPairs':
    """Reads the file once, checking every line; blank lines are skipped."""
    offsets = []
    out = cls(path, offsets, num_codebooks, codebook_size)
    with open(path, 'rb') as f:
      offset, number = 0, 0
      for line in f:
        number += 1
        if line.strip():
          out._parse(line, f'{path} line {number}')
          offsets.append((offset, number))
        offset += len(line)
    return out


class ArrayRecordPairs:
  """Pairs from ArrayRecord shards, in shard order (picklable)."""

  def __init__(self, paths: list[str], num_codebooks: int, codebook_size: int):
    self.paths = paths
    self._k, self._v = num_codebooks, codebook_size
    self._src = grain.sources.ArrayRecordDataSource(paths)
    counts = [len(grain.sources.ArrayRecordDataSource([p])) for p in paths]
    self._starts = np.cumsum([0] + counts)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def where(self, i: int) -> str:
    s = int(np.searchsorted(self._starts, i, side='right')) - 1
    return f'{self.paths[s]} record {i - int(self._starts[s])}'

  def __getitem__(self, i: int) -> dict[str, Any]:
    return decode_pair_record(self._src[i], self.where(i), self._k, self._v)


def load_pairs(config: ConfigDict):
  """The validated pairs of `dpo.pairs`: JsonlPairs or ArrayRecordPairs."""
  m = config.model
  path = os.path.expanduser(config.dpo.pairs)
  if not path:
    raise ConfigError('config.dpo.pairs is empty: set it to a pairs.jsonl file or '
                      'a directory of pair shards (make them with `musicjax '
                      'prefs --workdir LM_RUN --out pairs.jsonl`)')
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, f'*{SHARD_SUFFIX}')))
    if not paths:
      raise UserError(f'config.dpo.pairs={path!r} is a directory without '
                      f'*{SHARD_SUFFIX} shards')
    src = ArrayRecordPairs(paths, m.num_codebooks, m.codebook_size)
    for i in range(len(src)):
      src[i]  # pylint: disable=pointless-statement  (validates record i)
  elif os.path.isfile(path):
    src = JsonlPairs.scan(path, m.num_codebooks, m.codebook_size)
  else:
    raise UserError(f'config.dpo.pairs={path!r} not found (a {JSONL_SUFFIX} file '
                    f'or a directory of *{SHARD_SUFFIX} shards)')
  if len(src) == 0:
    raise UserError(f'config.dpo.pairs={path!r} holds no pairs')
  return src


def _hash_fraction(index: int) -> float:
  digest = hashlib.sha1(str(index).encode('utf-8')).digest()
  return int.from_bytes(digest[:_HASH_BYTES], 'big') / 2 ** (8 * _HASH_BYTES)


def split_indices(n: int, eval_fraction: float) -> dict[str, list[int]]:
  """Stable split of record indices by hash. With eval_fraction > 0 each split
  gets at least one record when n >= 2; with 0 eval reuses the train records."""
  frac = [_hash_fraction(i) for i in range(n)]
  eval_set = {i for i in range(n) if frac[i] < eval_fraction}
  if eval_fraction > 0 and not eval_set and n >= 2:
    eval_set = {min(range(n), key=lambda i: frac[i])}
  if len(eval_set) == n and n >= 2:
    eval_set.remove(max(range(n), key=lambda i: frac[i]))
  train = [i for i in range(n) if i not in eval_set]
  return {'train': train, 'eval': sorted(eval_set) if eval_fraction > 0 else train}


def prompt_ids(text, tags: str, lyrics: str, budget: int) -> list[int]:
  """Condition ids of a prompt, built the way `musicjax generate` builds them
  from --tags and --lyrics (so pairs match the prompts that made them)."""
  tags_text = None
  if tags.strip():
    tags_text = song_text.format_tags(song_text.derive_tags({'tags': tags})) or None
  secs = song_text.parse_lyrics_file(lyrics) if lyrics else []
  lyr = '\n'.join(f'{m}\n{x}' if x else m for m, x in secs) or None
  return text.prefix(tags_text, lyr, False, budget)


def melody_ids(chroma: np.ndarray | None, frames: int, use: bool) -> np.ndarray:
  """Melody ids of `frames` frames; NULL past the given melody or when unused."""
  out = np.full((frames,), layout.MELODY_NULL, np.int32)
  if chroma is not None and use:
    ids = sequence.melody_ids(chroma, frames, dropped=False)
    out[:len(ids)] = ids
  return out


class PairExample:
  """Pair -> slot arrays of both candidates with the same prefix prompt."""

  def __init__(self, config: ConfigDict):
    self.config = config
    self.text = conditions.ConditionText(token_data.load_tokenizer(config),
                                         config.model.text_vocab_size)

  def __call__(self, pair: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c = self.config
    m = c.model
    ids = prompt_ids(self.text, pair['tags'], pair['lyrics'],
                     c.data.max_text_tokens)
    ex = {}
    for side in SIDES:
      # At most max_frames frames (the END only if the candidate fits whole).
      codes = pair[side][:c.data.max_frames]
      n = len(codes)
      end = pair[f'{side}_end'] and n == len(pair[side])
      # One more than the frames: the slot that predicts END carries the
      # melody of the frame after the song, as the sampler gave it.
      mel = melody_ids(pair['melody'], n + 1, c.cond.melody)
      part = audio_slots(c, codes, mel[:n], end)
      if m.variant == 'global_local':
        part.next_melody = int(mel[n])
      seq = sequence.assemble([sequence.TextPart(ids), part],
                              layout.seq_len(c), m.num_codebooks,
                              m.codebook_size)
      ex.update({f'{side}/{k}': seq[k] for k in SEQ_KEYS})
    r = c.data.reference_frames
    if r:
      ex['ref_codes'] = np.full((r, m.num_codebooks), layout.EMPTY, np.int32)
      ex['ref_valid'] = np.asarray(False)
    return ex


class _Subset:
  """Records `indices` of `source`, as a grain data source."""

  def __init__(self, source, indices: list[int]):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[self._indices[i % len(self._indices)]]


class _PairMap(grain.transforms.Map):

  def __init__(self, example: PairExample):
    self._example = example

  def map(self, pair):
    return self._example(pair)


def check_examples(config: ConfigDict, source) -> None:
  """Builds every example once: prompt text errors surface before training."""
  ex = PairExample(config)
  too_long = 0
  for i in range(len(source)):
    pair = source[i]
    try:
      ex(pair)
    except UserError as e:
      raise UserError(f'{source.where(i)}: {e}') from None
    too_long += sum(len(pair[s]) > config.data.max_frames for s in SIDES)
  if too_long:
    _say(f'{too_long} of {2 * len(source)} candidates are longer than '
         f'config.data.max_frames={config.data.max_frames}: their first '
         f'{config.data.max_frames} frames are used (no END)')


def pair_dataset(config: ConfigDict, split: str, shard_index: int,
                 shard_count: int, source=None):
  """Batches of pairs for `split` (Grain; the iterator state is checkpointed)."""
  if source is None:
    source = load_pairs(config)
    check_examples(config, source)
  idx = split_indices(len(source), config.dpo.eval_fraction)[split]
  if not idx:
    raise UserError(f'config.dpo.pairs={config.dpo.pairs!r}: no {split} pairs '
                    f'among {len(source)} (config.dpo.eval_fraction='
                    f'{config.dpo.eval_fraction}); add pairs')
  ds = grain.MapDataset.source(_Subset(source, idx))
  if split == 'train':
    ds = ds.shuffle(seed=config.data.shuffle_seed)
  ds = ds.repeat().map(_PairMap(PairExample(config)))
  ds = ds[shard_index::shard_count]
  return ds.to_iter_dataset().batch(local_batch(config, split, shard_count),
                                    drop_remainder=True)
