"""One song (or an augmented copy) as a token record, by a trained codec.

Every song is encoded whole (in fixed-size chunks, `codec.chunked.encode_array`)
at the codec's sample rate and channels; the records are described in
`token_records`. Stems whose lengths differ by more than
`STEM_LENGTH_TOLERANCE_FRAMES` codec frames are reported and skipped; stems
within the tolerance are cut to the shortest.

Melody: chroma classes of the vocal stem whenever the source has one (chorales
always do, with or without --stems), else of the mix. With chroma settings
(`prepare --chroma`, MusicGen-Melody), the same recording's chroma classes
at the feature extractor's own rate and window (`lm.musicgen_chroma`), of the
whole song (training windows take their frames from it).

Bad items (unreadable audio, bad stems, metadata the LM cannot turn into text,
see `song_text.BadSongMetadata`) raise `audio.BadAudio`.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from musicjax.codec import chunked
from musicjax.data import audio
from musicjax.data import melody as melody_lib
from musicjax.data import song_text
from musicjax.data import text
from musicjax.data import token_records
from musicjax.lm import musicgen_chroma
from musicjax.prepare import token_augment
from musicjax.prepare import token_items

# Songs are encoded in windows of this many seconds (+ context on each side),
# so memory stays flat however long a song is.
DEFAULT_CHUNK_SECONDS = 10.0
DEFAULT_CONTEXT_SECONDS = 1.0
# Stems may differ in length by this many codec frames (encoder padding, a
# resampler's edge); beyond it they are not the same song.
STEM_LENGTH_TOLERANCE_FRAMES = 2


class Encoder:
  """Audio -> codes and melody at the codec's rate."""

  def __init__(self, model, sample_rate: int, channels: int, chunk_seconds: float,
               context_seconds: float, batch: int,
               chroma: musicgen_chroma.ChromaSettings | None = None):
    self.model = model
    self.chroma_settings = chroma
    self.sample_rate, self.channels = sample_rate, channels
    self.hop = int(model.hop_length)
    self._chunking = dict(chunk_seconds=chunk_seconds,
                          context_seconds=context_seconds, batch=batch)

  def codes(self, wave: np.ndarray) -> np.ndarray:
    """[T, C] -> [ceil(T / hop), K] (`chunked.encode_array`)."""
    return chunked.encode_array(self.model, wave, **self._chunking,
                                progress=False)  # per-song bar above

  def melody(self, wave: np.ndarray) -> np.ndarray:
    return np.asarray(melody_lib.chroma_tokens(wave, self.sample_rate, self.hop))

  def chroma(self, wave: np.ndarray) -> np.ndarray | None:
    """[T, C] -> MusicGen-Melody's chroma classes of the whole song, or None
    without chroma settings."""
    s = self.chroma_settings
    if s is None:
      return None
    mono = audio.resample(wave.mean(axis=1), self.sample_rate, s.sampling_rate)
    return musicgen_chroma.classes(mono, s, cut=False)


def _load_waves(item: dict[str, Any], enc: Encoder, want_stems: bool,
                max_seconds: float) -> dict[str, np.ndarray]:
  """{'mix'[, 'vocal'][, 'accompaniment']}: [T, C] at the codec rate, equal T.

  Raises:
    audio.BadAudio: an unreadable stem, or stems of different lengths.
  """
  def load(source, name):
    return audio.load_audio(source, enc.sample_rate, enc.channels, max_seconds,
                            name=name)

  stems = item.get('stems') or {}
  wanted = (token_items.REQUIRED_STEMS if want_stems else ('vocal',)) if stems else ()
  waves = {s: load(stems[s], stems[s]) for s in wanted}
  source = item['source']
  if source is not None:
    waves['mix'] = load(source, source if isinstance(source, str) else item['name'])
  lengths = {s: w.shape[0] for s, w in waves.items()}
  tolerance = STEM_LENGTH_TOLERANCE_FRAMES * enc.hop
  if max(lengths.values()) - min(lengths.values()) > tolerance:
    raise audio.BadAudio(item['name'], (
        'stem lengths differ by more than '
        f'{STEM_LENGTH_TOLERANCE_FRAMES} codec frames ({tolerance} samples at '
        f'{enc.sample_rate} Hz): ' +
        ', '.join(f'{s} {n}' for s, n in sorted(lengths.items()))))
  shortest = min(lengths.values())
  waves = {s: w[:shortest] for s, w in waves.items()}
  if 'mix' not in waves:
    waves['mix'] = waves['vocal'] + waves['accompaniment']
  return waves


def _check_text_metadata(item: dict[str, Any], num_frames: int,
                         frame_rate: float) -> None:
  """Raises BadAudio if the LM could not turn the item's metadata into text."""
  try:
    text.piece_texts(item['meta'])
    song_text.sections(item['meta'], frame_rate, num_frames)
  except song_text.BadSongMetadata as e:
    raise audio.BadAudio(item['name'], f'unusable metadata ({e})') from None


def encode_item(item: dict[str, Any], enc: Encoder, config: ml_collections.ConfigDict,
                want_stems: bool, codebook_size: int) -> bytes:
  """One item (or a tempo / pitch variant of one) as record bytes.

  Raises:
    audio.BadAudio: the item cannot be used (named by path, with the reason).
  """
  if 'error' in item:  # a damaged input record (data.kind=array_record)
    raise audio.BadAudio(item['name'], item['error'])
  settings = token_augment.augment_settings(config, want_stems)
  origin, song_id = token_items.item_identity(item, config)
  waves = _load_waves(item, enc, want_stems, config.data.max_file_seconds)
  if item.get('variant'):
    waves = token_augment.transformed(waves, item['variant'], enc.sample_rate, want_stems)
    item = dict(item, meta=token_augment.variant_meta(item['meta'], item['variant']))
  _check_text_metadata(item, math.ceil(waves['mix'].shape[0] / enc.hop),
                       float(enc.model.frame_rate))
  codes = enc.codes(waves['mix'])
  melody_source = waves.get('vocal', waves['mix'])
  melody = enc.melody(melody_source)
  chroma = enc.chroma(melody_source)
  if melody.shape != (codes.shape[0],):
    raise RuntimeError(f'melody.chroma_tokens gave {melody.shape[0]} frames for '
                       f'{codes.shape[0]} codec frames (hop {enc.hop})')
  meta = dict(item['meta'])
  stem_codes = None
  if want_stems:
    stem_codes = {'vocal_codes': enc.codes(waves['vocal']),
                  'accompaniment_codes': enc.codes(waves['accompaniment'])}
    if settings['eq_copies']:
      stem_codes[token_records.ACCOMPANIMENT_EQ_KEY] = token_augment.eq_codes(
          enc, waves['accompaniment'], song_id, settings)
    meta['stem_stats'] = token_augment.stem_stats(
        waves['vocal'], waves['accompaniment'], enc.hop)
  meta['origin'], meta['id'] = origin, song_id
  if item.get('stems'):
    meta['stem_origins'] = dict(item['stems'])
  meta.update(num_frames=int(codes.shape[0]), frame_rate=float(enc.model.frame_rate),
              sample_rate=enc.sample_rate)
  return token_records.encode_record(codes, melody, meta, codebook_size,
                                     stem_codes, chroma=chroma)
