"""Grain pipeline of vocal-to-accompaniment examples over token songs.

The records come from `musicjax prepare --codec-workdir CODEC --out DIR
--stems` (`musicjax.data.token_records`): per song the vocal and
accompaniment codes [F, K] (same codec, same frames), optional EQ'd copies of
the accompaniment [N, F, K], and metadata with `stem_stats`.

    token shards (MapDataset of records)
      -> quality filter (when data.quality.enabled; see below)
      -> train: shuffle, repeat; eval: corpus order, repeat
      -> example (random_map in train: window, EQ copy, reference and tags
         come from the element's seeded rng; eval: fixed choices)
      -> this process's share [shard_index::shard_count]
      -> drop unusable songs (reported once each by name, `audio.report_bad`)
      -> batch

An example (one song), K = config.model.num_codebooks (a record's first K
codebooks), T = data.max_frames, L = data.max_text_tokens, R =
max(data.reference_frames, 1):
  vocal      int32 [T, K]  the vocal codes of a window of the song
  accomp     int32 [T, K]  the accompaniment codes of the SAME frames
  valid      bool  [T]     False past the song's end (vocal/accomp are -1 there)
  text       int32 [L]     the tag text (`song_text.format_tags`) in the data
                           dir's tokenizer, cut to L, -1 padded
  ref        int32 [R, K]  data.reference_frames frames of the accompaniment
                           outside the window, -1 padded
  ref_valid  bool  []      False when no such segment fits (song too short)
Train: the window starts uniformly in [0, F - T] (0 when F <= T); the
reference starts uniformly among the offsets where it does not overlap the
window; with probability data.eq_prob the accompaniment AND the reference come
from one (uniformly chosen) EQ'd copy; each tag category is kept with its
cond.tag_probs probability. Eval: the window at frame 0, the first reference
segment after it, every tag, no EQ. No condition is dropped here: the task
drops prefixes on device.

Unusable songs are reported and skipped, never fatal: a damaged record, no
stem codes (prepared without --stems), no meta['stem_stats'] (prepared by an
older `musicjax prepare`), no frames, a silent vocal (whole-song vocal RMS
below data.min_vocal_db), fewer codebooks than the model, unusable metadata.

Quality filter (data.quality, stage 2). It stands in for the paper's SongEval
>= 3.5 score, artifact check and structure filter (seed 003 appendix A.2),
which need models we do not have offline. A song is kept iff
  * it lasts at least quality.min_seconds,
  * stem_stats['vocal_active'] >= quality.min_vocal_active (the share of
    frames where the singer is audible: no mostly-instrumental songs),
  * stem_stats['accompaniment_active'] >= quality.min_accompaniment_active
    (no a-cappella songs or broken separations),
  * its metadata has at least quality.min_sections sections or phrases
    (`song_text.sections` other than the 'instrumental' gap fillers): the
    structure the paper reads with SongFormer.
The filter reads every record's metadata once when the pipeline is built and
logs one summary per split ("kept X of Y songs"); it is an error when no song
passes. Songs it cannot judge (damaged, no stem_stats, bad metadata) pass it
and are then reported as unusable.
"""
from __future__ import annotations

import collections
import logging
import math
import os
from typing import Any

import ml_collections
import numpy as np

from musicjax.config import ConfigError
from musicjax.data import song_text
from musicjax.data import token_records
from musicjax.errors import UserError
from musicjax.lm import token_data

logger = logging.getLogger('musicjax.data')

# Codes and text ids past the song's end / the text's end.
PAD = -1
# config.model.frame_rate and dataset.json may differ by float rounding only.
FRAME_RATE_RTOL = 1e-6
EQ_KEY = token_records.ACCOMPANIMENT_EQ_KEY
STATS_KEY = 'stem_stats'
QUALITY_RULES = ('min_seconds', 'min_vocal_active', 'min_accompaniment_active',
                 'min_sections')
_RESTEMS = ('re-run `musicjax prepare --codec-workdir CODEC --out NEW_DIR '
            '--stems`')
# Warnings given once per process (e.g. eq_prob without EQ copies).
_warned: set[str] = set()


def default_data_config() -> ml_collections.ConfigDict:
  """The accomp task's data keys (merged over base_config's data section)."""
  d = ml_collections.ConfigDict()
  d.max_frames = 250            # window length T in codec frames
  d.reference_frames = 125      # reference segment length R (0 = no reference)
  d.max_text_tokens = 32        # tag text ids L (cut, -1 padded)
  d.tokenizer = ''              # '' = DATA_DIR/tokenizer.json (from `musicjax prepare`)
  d.min_vocal_db = -50.0        # whole-song vocal RMS (dBFS) below this = silent: skipped
  # Train: probability that the accompaniment and reference come from one of
  # the record's EQ'd copies (`data.augment.eq_copies` at prepare; paper 0.7).
  d.eq_prob = 0.0
  q = d.quality = ml_collections.ConfigDict()  # stage-2 filter (module docstring)
  q.enabled = False
  q.min_seconds = 10.0          # at least this long
  q.min_vocal_active = 0.2      # share of frames with an audible vocal
  q.min_accompaniment_active = 0.5  # share of frames with audible accompaniment
  q.min_sections = 2            # sections/phrases in the metadata (structure)
  return d


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Ranges of the data keys; errors name the key."""
  d = config.data
  if d.max_frames < 1 or d.max_text_tokens < 1 or d.reference_frames < 0:
    raise ConfigError(
        'config.data.max_frames and config.data.max_text_tokens must be >= 1 '
        f'and config.data.reference_frames >= 0; got {d.max_frames}, '
        f'{d.max_text_tokens}, {d.reference_frames}')
  if not 0.0 <= d.eq_prob <= 1.0:
    raise ConfigError(f'config.data.eq_prob must be in [0, 1], got {d.eq_prob}')
  q = d.quality
  for key in ('min_vocal_active', 'min_accompaniment_active'):
    if not 0.0 <= q[key] <= 1.0:
      raise ConfigError(f'config.data.quality.{key} is a share of frames and '
                        f'must be in [0, 1], got {q[key]}')


def _first_record_has_stems(path: str) -> bool:
  for split in ('train', 'eval'):
    try:
      ds = token_records.source(path, split)
    except UserError:
      continue  # no shards of this split: try the other
    for i in range(len(ds)):
      record = ds[i]
      if 'error' not in record:
        return all(k in record for k in token_records.STEM_KEYS)
  return False


def check_dataset(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """dataset.json agrees with the model and was prepared with --stems.

  Returns:
    dataset.json's contents.

  Raises:
    ConfigError: other codebooks or frame rate, or no stems in the data.
  """
  info = token_data.check_dataset(config)
  path = os.path.expanduser(config.data.path)
  stems = info.get('stems')
  if stems is None:  # written before dataset.json recorded it
    stems = _first_record_has_stems(path)
  if not stems:
    raise ConfigError(
        f'the token dataset config.data.path={config.data.path!r} has no vocal/'
        f'accompaniment stems; the accomp task needs them: {_RESTEMS} (with '
        'data.kind chorales, or folder with <song>/vocals.<ext> + '
        'accompaniment.<ext>)')
  rate = config.model.get('frame_rate')
  if rate is not None and not math.isclose(rate, info['frame_rate'],
                                           rel_tol=FRAME_RATE_RTOL):
    raise ConfigError(
        f'config.model.frame_rate={rate} but the tokens in {config.data.path} '
        f'are at {info["frame_rate"]} frames/s; set '
        f'--config.model.frame_rate={info["frame_rate"]}')
  return info


# ------------------------------------------------------------------ quality


def _structure_sections(meta: dict[str, Any], frame_rate: float,
                        num_frames: int) -> int:
  secs = song_text.sections(meta, frame_rate, num_frames)
  return sum(s.name != song_text.INSTRUMENTAL_SECTION for s in secs)


def quality_failures(meta: dict[str, Any], quality: ml_collections.ConfigDict,
                     frame_rate: float) -> list[str] | None:
  """The QUALITY_RULES a song fails ([] = keep; module docstring).

  None for a song the rule cannot judge (no stem_stats or num_frames, bad
  metadata): it is kept, and the example reports it as unusable by name.
  """
  stats, frames = meta.get(STATS_KEY), meta.get('num_frames')
  if not isinstance(stats, dict) or not isinstance(frames, int):
    return None
  try:
    sections = _structure_sections(meta, frame_rate, frames)
    measured = {'min_seconds': frames / frame_rate,
                'min_vocal_active': float(stats['vocal_active']),
                'min_accompaniment_active': float(stats['accompaniment_active']),
                'min_sections': sections}
  except (song_text.BadSongMetadata, KeyError, TypeError, ValueError):
    return None
  return [rule for rule in QUALITY_RULES if measured[rule] < quality[rule]]


def quality_keep(config: ml_collections.ConfigDict, split: str,
                 frame_rate: float) -> list[int]:
  """Record numbers of `split` that pass the quality rule; logs a summary.

  Raises:
    ConfigError: no song of `split` that the rule can judge passes it.
  """
  q = config.data.quality
  metas = token_records.metas(os.path.expanduser(config.data.path), split)
  keep, passed, failed = [], 0, collections.Counter()
  for i, m in enumerate(metas):
    fails = None if 'error' in m else quality_failures(m['meta'], q, frame_rate)
    failed.update(fails or ())
    if fails == []:  # pylint: disable=g-explicit-bool-comparison
      passed += 1    # judged and passed (None: not judged)
    if not fails:
      keep.append(i)
  reasons = ', '.join(f'{rule} ({q[rule]}): {failed[rule]}'
                      for rule in QUALITY_RULES if failed[rule]) or 'none'
  logger.info('musicjax: %s quality filter (config.data.quality) kept %d of %d '
              'songs (%d not judged: reported when read); failed rules: %s',
              split, len(keep), len(metas), len(keep) - passed, reasons)
  if not passed:
    raise ConfigError(
        f'the quality filter kept none of the {len(metas)} {split} songs in '
        f'{config.data.path} (failed rules: {reasons}); lower those '
        'config.data.quality.* thresholds or set '
        '--config.data.quality.enabled=false')
  return keep


# ------------------------------------------------------------------ examples


def _warn_once(key: str, message: str) -> None:
  """Logs `message` the first time `key` is seen in this process."""
  if key not in _warned:
    _warned.add(key)
    logger.warning('musicjax: %s', message)


def _padded(codes: np.ndarray, length: int, k: int) -> np.ndarray:
  out = np.full((length, k), PAD, np.int32)
  out[:len(codes)] = codes
  return out


def _reference_offset(total: int, start: int, stop: int, r: int,
                      rng: np.random.Generator | None) -> int | None:
  """A start a with [a, a + r) outside [start, stop): uniform among all such
  (rng given) or the first after the window (rng None); None if none fits."""
  before = max(0, start - r + 1)        # a in [0, start - r]
  after = max(0, total - r - stop + 1)  # a in [stop, total - r]
  if before + after == 0:
    return None
  if rng is None:
    return stop if after else 0
  j = int(rng.integers(before + after))
  return j if j < before else stop + (j - before)


class Example:
  """Record -> example dict (module docstring). Pure given (record, rng)."""

  def __init__(self, config: ml_collections.ConfigDict, frame_rate: float,
               train: bool):
    self.config = config
    self.frame_rate = frame_rate
    self.train = train
    self.tokenizer = token_data.load_tokenizer(config)
    cond = config.get('cond')
    self.tag_probs = (dict(cond.tag_probs) if cond is not None and
                      'tag_probs' in cond else None)
    self.extra_tag_prob = (cond.extra_tag_prob if self.tag_probs is not None
                           else song_text.EXTRA_TAG_PROB)

  def _accompaniment(self, record: dict, rng: np.random.Generator,
                     k: int) -> np.ndarray:
    """The plain accompaniment, or (train, prob. eq_prob) one EQ'd copy."""
    plain = record['accompaniment_codes'][:, :k]
    p = self.config.data.eq_prob
    if not self.train or not p or rng.random() >= p:
      return plain
    copies = record.get(EQ_KEY)
    if copies is None or len(copies) == 0:
      _warn_once(EQ_KEY, f'config.data.eq_prob={p} but records such as {record["name"]} '
                 'have no EQ copies: they train on the plain accompaniment; '
                 'prepare with --config.data.augment.eq_copies=N (and --stems)')
      return plain
    return copies[int(rng.integers(len(copies)))][:, :k]

  def _text(self, meta: dict, rng: np.random.Generator) -> np.ndarray:
    tags = song_text.derive_tags(meta)
    if self.train and self.tag_probs is not None:
      tags = song_text.sample_tags(tags, self.tag_probs, rng,
                                   extra_prob=self.extra_tag_prob)
    text = song_text.format_tags(tags)
    ids = self.tokenizer.encode(text)[:self.config.data.max_text_tokens] if text else []
    out = np.full((self.config.data.max_text_tokens,), PAD, np.int32)
    out[:len(ids)] = ids
    return out

  def unusable(self, record: dict) -> str | None:
    return unusable(record, self.config)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    d, k = self.config.data, self.config.model.num_codebooks
    vocal = np.asarray(record['vocal_codes'][:, :k], np.int32)
    total = len(vocal)
    w = min(d.max_frames, total)
    start = int(rng.integers(0, total - w + 1)) if self.train else 0
    stop = start + w
    accomp = np.asarray(self._accompaniment(record, rng, k), np.int32)
    r = d.reference_frames
    ref = np.full((max(r, 1), k), PAD, np.int32)
    a = (_reference_offset(total, start, stop, r, rng if self.train else None)
         if r else None)
    if a is not None:
      ref = accomp[a:a + r].copy()
    valid = np.zeros((d.max_frames,), bool)
    valid[:w] = True
    return {'vocal': _padded(vocal[start:stop], d.max_frames, k),
            'accomp': _padded(accomp[start:stop], d.max_frames, k),
            'valid': valid,
            'text': self._text(record['meta'], rng),
            'ref': ref,
            'ref_valid': np.asarray(a is not None)}


def unusable(record: dict, config: ml_collections.ConfigDict) -> str | None:
  """Why a record cannot give an example (module docstring), or None."""
  if 'error' in record:
    return record['error']
  if not all(key in record for key in token_records.STEM_KEYS):
    return f'no vocal/accompaniment stem codes in the record: {_RESTEMS}'
  if len(record['vocal_codes']) == 0:
    return 'no frames'
  k, have = config.model.num_codebooks, record['vocal_codes'].shape[1]
  if have < k:
    return f'{have} codebooks, config.model.num_codebooks={k}'
  stats = record['meta'].get(STATS_KEY)
  try:
    vocal_db = float(stats['vocal_rms_db'])
  except (KeyError, TypeError, ValueError):
    return (f"no usable meta['{STATS_KEY}'] (prepared by an older `musicjax "
            f'prepare`): {_RESTEMS}')
  if vocal_db < config.data.min_vocal_db:
    return (f'silent vocal: RMS {vocal_db:.1f} dBFS is below '
            f'config.data.min_vocal_db={config.data.min_vocal_db}')
  return None


def accomp_dataset(config: ml_collections.ConfigDict, split: str,
                   shard_index: int, shard_count: int):
  """Batches of examples of `split` for one process (module docstring)."""
  check_data_config(config)
  info = check_dataset(config)
  frame_rate = float(info['frame_rate'])
  keep = (quality_keep(config, split, frame_rate)
          if config.data.quality.enabled else None)
  ds = token_records.source(os.path.expanduser(config.data.path), split, keep)
  return token_data.examples_dataset(config, ds, Example, frame_rate, split,
                                     shard_index, shard_count, 'songs')
