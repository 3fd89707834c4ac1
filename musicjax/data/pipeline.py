"""The Grain pipeline: items -> fixed-length audio segments -> local batches.

    source (MapDataset)
      -> train: shuffle(data.shuffle_seed), repeat forever (reshuffled per epoch)
         eval:  corpus order, repeat forever
      -> read: decode the crop window -> channels -> resample -> exact length
         (train: random crop seeded by data.shuffle_seed and the global index;
          eval: the centre)
      -> train, if data.gain_augment_dbfs is set (the codec's config): scale to
         a random RMS level from the same per-element generator
      -> this process's share: [shard_index::shard_count]
      -> drop unreadable items (reported once each by path)
      -> batch(local batch, drop_remainder) -> optional mp_prefetch workers

Only the crop window is decoded (plus a few frames of resampler margin), so a
1 s crop of a long file is cheap. Every step is a pure function of the element
index, so the iterator's `get_state()` is a small dict and `set_state()`
resumes exactly, bad items included (they are skipped identically).
"""
from __future__ import annotations

import math
from typing import Any

import grain
import ml_collections
import numpy as np
import soundfile as sf
from absl import flags

from musicjax.config import ConfigError
from musicjax.data import audio
from musicjax.data import augment
from musicjax.data import sources

# Extra source frames read past the crop so the resampler's output covers it.
RESAMPLE_MARGIN_FRAMES = 8
# Grain checks the share of skipped items over windows of 1000; above this
# share nothing usable is left (every item fails only when read, e.g. damaged
# records), and we stop with a clear error instead of looping forever.
MAX_SKIPPED_RATIO = 0.999


def segment_frames(config: ml_collections.ConfigDict) -> int:
  return int(round(config.data.segment_seconds * config.data.sample_rate))


def local_batch_size(config: ml_collections.ConfigDict, split: str,
                     shard_count: int) -> int:
  key = 'batch_size' if split == 'train' else 'eval_batch_size'
  global_batch = config.data[key]
  if shard_count < 1 or global_batch % shard_count:
    raise ConfigError(f'config.data.{key}={global_batch} is not divisible by the '
                      f'number of data-loading processes ({shard_count})')
  return global_batch // shard_count


def read_segment(item: dict[str, Any], position: float,
                 config: ml_collections.ConfigDict) -> np.ndarray:
  """A [T, C] float32 segment starting at `position` (0..1) of the free range.

  Raises:
    audio.BadAudio: the item cannot give a full segment.
  """
  d = config.data
  name, source = item['name'], item['source']
  info = audio.audio_info(source, name)
  if d.max_file_seconds and info.seconds > d.max_file_seconds:
    raise audio.BadAudio(name, f'too long: {info.seconds:.1f} s > '
                         f'max_file_seconds {d.max_file_seconds:g} s')
  if info.seconds < d.segment_seconds:
    raise audio.BadAudio(name, f'shorter than a segment: {info.seconds:.3f} s '
                         f'< {d.segment_seconds:g} s')
  need = int(math.ceil(d.segment_seconds * info.sample_rate))
  start = int(position * max(info.frames - need, 0))
  x = audio.load_audio(
      source, d.sample_rate, d.channels, start_seconds=start / info.sample_rate,
      duration_seconds=(need + RESAMPLE_MARGIN_FRAMES) / info.sample_rate,
      name=name)
  tolerance = int(math.ceil((RESAMPLE_MARGIN_FRAMES + 1) * d.sample_rate /
                            info.sample_rate))
  return audio.fit_length(x, segment_frames(config), name, tolerance)


def _safe_read(item, position, config) -> dict[str, np.ndarray] | None:
  if 'error' in item:  # a damaged record, found while decoding the container
    audio.report_bad(item['name'], item['error'])
    return None
  try:
    return {'audio': read_segment(item, position, config)}
  except audio.BadAudio as e:
    audio.report_bad(e.path, e.reason)
  except (sf.LibsndfileError, OSError, RuntimeError, ValueError) as e:
    audio.report_bad(item['name'], f'unreadable ({type(e).__name__}: {e})')
  return None


def gain_augment(config: ml_collections.ConfigDict
                 ) -> tuple[tuple[float, float], float, float] | None:
  """(target range, peak cap, floor) in dBFS of the training gain
  augmentation, or None when off (unset, None or ()).

  Raises:
    ConfigError: a range that is not (low, high) with low <= high.
  """
  d = config.data
  bounds = d.get('gain_augment_dbfs')
  if not bounds:
    return None
  if len(bounds) != 2 or not bounds[0] <= bounds[1]:
    raise ConfigError('config.data.gain_augment_dbfs must be (low, high) target '
                      f'RMS levels in dBFS with low <= high, or () for none; got '
                      f'{bounds!r}')
  return ((float(bounds[0]), float(bounds[1])), float(d.gain_augment_peak_dbfs),
          float(d.gain_augment_floor_dbfs))


class _RandomCrop(grain.transforms.RandomMap):

  def __init__(self, config: ml_collections.ConfigDict):
    self._config = config
    self._gain = gain_augment(config)

  def random_map(self, item, rng: np.random.Generator):
    out = _safe_read(item, float(rng.random()), self._config)
    if out is not None and self._gain is not None:
      out['audio'] = augment.random_loudness(out['audio'], rng, *self._gain)
    return out


class _CentreCrop(grain.transforms.Map):

  def __init__(self, config: ml_collections.ConfigDict):
    self._config = config

  def map(self, item):
    return _safe_read(item, 0.5, self._config)


class _NameTheData(grain.IterDataset):
  """Turns Grain's 'skipped 100% of elements' error into one naming the data."""

  def __init__(self, parent: grain.IterDataset, message: str):
    super().__init__(parent)
    self._message = message

  def __iter__(self) -> grain.DatasetIterator:
    return _NameTheDataIterator(self._parent.__iter__(), self._message)


class _NameTheDataIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, message: str):
    super().__init__(parent)
    self._message = message

  def __next__(self):
    try:
      return next(self._parent)
    except ValueError as e:
      if 'skipped' not in str(e):
        raise
      raise sources.NoUsableAudio(self._message) from e

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def stop_when_nothing_is_usable(ds: grain.MapDataset, where: str, split: str,
                                what: str) -> grain.IterDataset:
  """`ds` (None for an unusable item) without the Nones, as an IterDataset
  that raises NoUsableAudio naming `where` once (almost) every item of a
  window fails, instead of looping forever over a repeated split."""
  it = grain.experimental.WithOptionsIterDataset(
      ds.filter(lambda x: x is not None).to_iter_dataset(),
      grain.experimental.DatasetOptions(
          filter_raise_threshold_ratio=MAX_SKIPPED_RATIO))
  return _NameTheData(it, (
      f'{where}: no usable {what} left in the {split} split: every recent item '
      'failed to read (each is named in a warning above). Fix or remove '
      'those files.'))


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside absl.app (our CLI, pytest,
  notebooks) nothing parsed them, so accept their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def audio_dataset(config: ml_collections.ConfigDict, split: str,
                  shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """This process's batches {'audio': float32 [local_batch, T, C]} of `split`."""
  if split not in sources.SPLITS:
    raise ValueError(f'split must be one of {sources.SPLITS}, got {split!r}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
  if config.data.channels < 1:
    raise ConfigError(f'config.data.channels must be >= 1, got '
                      f'{config.data.channels}')
  batch = local_batch_size(config, split, shard_count)
  ds = sources.source_dataset(config, split)
  if split == 'train':
    ds = ds.shuffle(seed=config.data.shuffle_seed).repeat()
    ds = ds.random_map(_RandomCrop(config), seed=config.data.shuffle_seed)
  else:
    ds = ds.repeat().map(_CentreCrop(config))
  it = stop_when_nothing_is_usable(ds[shard_index::shard_count],
                                   sources.describe(config), split, 'audio')
  it = it.batch(batch, drop_remainder=True)
  if config.data.num_workers > 0:
    _ensure_absl_flags_parsed()
    audio.share_reports_with_workers()  # their bad files count in our metrics
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it
