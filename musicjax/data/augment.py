"""Audio augmentation applied at prepare time: frequency balance, tempo, pitch.

Models train on codec tokens, so audio can only be augmented before the codec
runs (`musicjax prepare --codec-workdir ... --stems`, see `musicjax.prepare.token_augment`).

Frequency balance (LaDA-Band, seed 003 appendix A.2): three biquads in
sequence, each with independently drawn parameters (`FREQUENCY_BALANCE`):
  bass   low-shelf  gain U(-5, -2) dB, f U(80, 180) Hz,    Q U(0.6, 1.1)
  mid    peaking    gain U(1, 3) dB,   f U(1200, 2600) Hz, Q U(0.6, 1.2)
  treble high-shelf gain U(1, 3.5) dB, f U(3200, 5800) Hz, Q U(0.6, 1.0)
then the result is scaled to an RMS of -16 dBFS; if that would put the peak
above -1 dBFS, the peak cap wins (the RMS ends lower). Biquads are those of
the Audio EQ Cookbook (R. Bristow-Johnson), with alpha = sin(w0) / (2 Q) for
every type. At low sample rates a center frequency above
`MAX_CENTER_FRACTION` x the sample rate is lowered to that limit.

Levels: dBFS of the plain RMS, 20 log10(rms), so a full-scale square wave is
0 dBFS and a full-scale sine -3 dBFS.

Tempo and pitch (`time_stretch`, `pitch_shift`) use librosa's phase vocoder
and resampler; a caller applies the same transform to every stem of a song.
`stretch_meta` / `shift_meta` adjust the metadata to match.

`random_loudness` is the codec's training-time gain augmentation (applied
per segment by musicjax/data/pipeline.py, see `data.gain_augment_dbfs`).

Every random choice comes from a numpy Generator; `song_rng` seeds one from
(seed, song id, purpose...) with a stable hash, so reruns are identical.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any, Mapping

import librosa
import numpy as np

# Level of digital silence in dB reports: log10(0) has no value.
SILENCE_DBFS = -120.0
# Biquad center frequencies are kept below this fraction of the sample rate
# (0.45 = 90% of Nyquist): above Nyquist the cookbook formulas fold over.
MAX_CENTER_FRACTION = 0.45
# Bytes of the SHA-256 digest turned into one seed / hash integer.
_HASH_BYTES = 8
_HASH_SCALE = float(1 << (8 * _HASH_BYTES))
_SEMITONES_PER_OCTAVE = 12
_DB_AMPLITUDE = 20.0     # dB = 20 log10(amplitude ratio)
_DB_SHELF_AMPLITUDE = 40.0  # the cookbook's A = 10^(gain / 40)

LOW_SHELF, PEAKING, HIGH_SHELF = 'low_shelf', 'peaking', 'high_shelf'
FILTER_KINDS = (LOW_SHELF, PEAKING, HIGH_SHELF)


@dataclasses.dataclass(frozen=True)
class BandRange:
  """Uniform ranges of one biquad's parameters."""
  kind: str
  gain_db: tuple[float, float]
  freq_hz: tuple[float, float]
  q: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class FrequencyBalance:
  """The frequency-balance augmentation: bands in order, then loudness."""
  bands: tuple[BandRange, ...]
  target_rms_dbfs: float
  peak_cap_dbfs: float


# Seed 003 appendix A.2.
FREQUENCY_BALANCE = FrequencyBalance(
    bands=(BandRange(LOW_SHELF, (-5.0, -2.0), (80.0, 180.0), (0.6, 1.1)),
           BandRange(PEAKING, (1.0, 3.0), (1200.0, 2600.0), (0.6, 1.2)),
           BandRange(HIGH_SHELF, (1.0, 3.5), (3200.0, 5800.0), (0.6, 1.0))),
    target_rms_dbfs=-16.0,
    peak_cap_dbfs=-1.0)


@dataclasses.dataclass(frozen=True)
class Biquad:
  """One drawn filter."""
  kind: str
  gain_db: float
  freq_hz: float
  q: float


# -------------------------------------------------------------------- seeds


def stable_int(*keys: Any) -> int:
  """A 64-bit integer from `keys` (str/int), the same in every process."""
  h = hashlib.sha256('\0'.join(str(k) for k in keys).encode('utf-8'))
  return int.from_bytes(h.digest()[:_HASH_BYTES], 'little')


def song_rng(seed: int, song_id: str, *purpose: Any) -> np.random.Generator:
  """A Generator that depends only on (seed, song id, purpose...)."""
  return np.random.default_rng([int(seed), stable_int(song_id, *purpose)])


def unit_hash(seed: int, song_id: str, purpose: str) -> float:
  """A deterministic number in [0, 1) per (seed, song id, purpose)."""
  return stable_int(seed, song_id, purpose) / _HASH_SCALE


# ------------------------------------------------------------------- levels


def rms(wave: np.ndarray) -> float:
  """Root mean square over every sample and channel (0 for no samples)."""
  x = np.asarray(wave, np.float64)
  return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def to_dbfs(amplitude: float) -> float:
  """20 log10(amplitude), floored at SILENCE_DBFS."""
  floor = 10.0 ** (SILENCE_DBFS / _DB_AMPLITUDE)
  return _DB_AMPLITUDE * math.log10(max(float(amplitude), floor))


def from_dbfs(db: float) -> float:
  return 10.0 ** (db / _DB_AMPLITUDE)


def frame_dbfs(wave: np.ndarray, hop: int) -> np.ndarray:
  """RMS level (dBFS) of each hop-sized frame; the last one zero-padded.

  There are ceil(T / hop) frames, as many as the codec makes from T samples.
  """
  x = np.asarray(wave, np.float64).reshape(len(wave), -1)
  frames = math.ceil(len(x) / hop)
  x = np.pad(x, ((0, frames * hop - len(x)), (0, 0)))
  power = np.mean(np.square(x.reshape(frames, hop * x.shape[1])), axis=1)
  floor = from_dbfs(SILENCE_DBFS) ** 2
  return _DB_AMPLITUDE / 2 * np.log10(np.maximum(power, floor))


def active_fraction(wave: np.ndarray, hop: int, threshold_dbfs: float) -> float:
  """Share of hop-sized frames whose RMS level is above `threshold_dbfs`."""
  if len(wave) == 0:
    return 0.0
  return float(np.mean(frame_dbfs(wave, hop) > threshold_dbfs))


def normalize_loudness(wave: np.ndarray, target_rms_dbfs: float,
                       peak_cap_dbfs: float) -> np.ndarray:
  """Scales to the target RMS, less if the peak would pass the cap.

  Silence is returned unchanged (there is no gain that reaches the target).
  """
  level = rms(wave)
  if to_dbfs(level) <= SILENCE_DBFS:
    return np.asarray(wave, np.float32)
  gain = from_dbfs(target_rms_dbfs) / level
  peak = float(np.max(np.abs(wave)))
  gain = min(gain, from_dbfs(peak_cap_dbfs) / peak)
  return (np.asarray(wave, np.float64) * gain).astype(np.float32)


def random_loudness(wave: np.ndarray, rng: np.random.Generator,
                    target_rms_dbfs: tuple[float, float], peak_cap_dbfs: float,
                    floor_dbfs: float) -> np.ndarray:
  """Gain augmentation: `wave` at an RMS drawn uniformly from the range.

  Args:
    wave: [T] or [T, C]; one gain for every channel.
    rng: the draw's generator (one number is drawn, whatever the wave, so
      the stream after it does not depend on the audio).
    target_rms_dbfs: (low, high) range of the target RMS level.
    peak_cap_dbfs: the peak never ends above this (normalize_loudness).
    floor_dbfs: waves at or below this RMS level keep their level, so
      silence stays silence and near-silence is not raised into loud noise.

  Returns:
    float32, the shape of `wave`.
  """
  target = _uniform(rng, target_rms_dbfs)
  if to_dbfs(rms(wave)) <= floor_dbfs:
    return np.asarray(wave, np.float32)
  return normalize_loudness(wave, target, peak_cap_dbfs)


# ------------------------------------------------------------------ biquads


def biquad_coefficients(kind: str, gain_db: float, freq_hz: float, q: float,
                        sample_rate: float) -> tuple[np.ndarray, np.ndarray]:
  """(b, a) of an Audio EQ Cookbook biquad, normalised so a[0] = 1.

  Args:
    kind: LOW_SHELF, PEAKING or HIGH_SHELF.
    gain_db: the shelf gain (shelves) or the gain at `freq_hz` (peaking).
    freq_hz: the shelf midpoint or the peak's center, below Nyquist.
    q: quality factor (> 0).
    sample_rate: Hz.
  """
  if kind not in FILTER_KINDS:
    raise ValueError(f'biquad kind must be one of {FILTER_KINDS}, got {kind!r}')
  if not 0 < freq_hz < sample_rate / 2 or q <= 0:
    raise ValueError(f'biquad needs 0 < freq_hz ({freq_hz}) < Nyquist '
                     f'({sample_rate / 2}) and q ({q}) > 0')
  a_gain = 10.0 ** (gain_db / _DB_SHELF_AMPLITUDE)
  w0 = 2.0 * math.pi * freq_hz / sample_rate
  cos_w0, alpha = math.cos(w0), math.sin(w0) / (2.0 * q)
  if kind == PEAKING:
    b = [1 + alpha * a_gain, -2 * cos_w0, 1 - alpha * a_gain]
    a = [1 + alpha / a_gain, -2 * cos_w0, 1 - alpha / a_gain]
  else:
    # The high shelf is the low shelf with cos(w0) and b1/a1 signs flipped.
    s = 1.0 if kind == LOW_SHELF else -1.0
    ap, am, root = a_gain + 1, a_gain - 1, 2 * math.sqrt(a_gain) * alpha
    b = [a_gain * (ap - s * am * cos_w0 + root),
         s * 2 * a_gain * (am - s * ap * cos_w0),
         a_gain * (ap - s * am * cos_w0 - root)]
    a = [ap + s * am * cos_w0 + root,
         -s * 2 * (am + s * ap * cos_w0),
         ap + s * am * cos_w0 - root]
  b, a = np.asarray(b, np.float64), np.asarray(a, np.float64)
  return b / a[0], a / a[0]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  return float(rng.uniform(bounds[0], bounds[1]))


def sample_biquads(rng: np.random.Generator, sample_rate: float,
                   spec: FrequencyBalance = FREQUENCY_BALANCE) -> tuple[Biquad, ...]:
  """One draw of every band's parameters (gain, frequency, Q in that order)."""
  top = MAX_CENTER_FRACTION * sample_rate
  out = []
  for band in spec.bands:
    gain, freq, q = (_uniform(rng, band.gain_db), _uniform(rng, band.freq_hz),
                     _uniform(rng, band.q))
    out.append(Biquad(band.kind, gain, min(freq, top), q))
  return tuple(out)


def apply_biquads(wave: np.ndarray, sample_rate: float,
                  filters: tuple[Biquad, ...]) -> np.ndarray:
  """The filters in sequence along time (axis 0 of [T] or [T, C])."""
  # Deferred: scipy.signal takes ~0.5 s to import, and only EQ copies need it.
  from scipy import signal  # pylint: disable=g-import-not-at-top
  y = np.asarray(wave, np.float64)
  for f in filters:
    b, a = biquad_coefficients(f.kind, f.gain_db, f.freq_hz, f.q, sample_rate)
    y = signal.lfilter(b, a, y, axis=0)
  return y


def frequency_balance(wave: np.ndarray, sample_rate: float,
                      rng: np.random.Generator,
                      spec: FrequencyBalance = FREQUENCY_BALANCE) -> np.ndarray:
  """Seed 003's frequency-balance augmentation of `wave` ([T] or [T, C]).

  Returns float32 of the same shape: filtered, then loudness-normalised.
  """
  filters = sample_biquads(rng, sample_rate, spec)
  y = apply_biquads(wave, sample_rate, filters)
  return normalize_loudness(y, spec.target_rms_dbfs, spec.peak_cap_dbfs)


# ------------------------------------------------------------ tempo / pitch


def _channels_first(wave: np.ndarray) -> np.ndarray:
  x = np.asarray(wave, np.float32)
  return x.T if x.ndim == 2 else x


def time_stretch(wave: np.ndarray, sample_rate: int, rate: float) -> np.ndarray:
  """Plays `rate` times as fast at the same pitch: round(T / rate) samples.

  Args:
    wave: [T] or [T, C] audio.
    sample_rate: Hz (unused by the phase vocoder; kept for a uniform API).
    rate: > 1 is faster (shorter), < 1 slower.
  """
  del sample_rate
  if rate <= 0:
    raise ValueError(f'time_stretch rate must be > 0, got {rate}')
  y = librosa.effects.time_stretch(_channels_first(wave), rate=float(rate))
  return np.ascontiguousarray(_channels_first(y), np.float32)


def pitch_shift(wave: np.ndarray, sample_rate: int,
                semitones: float) -> np.ndarray:
  """Moves the pitch by `semitones` at the same tempo; the length is kept."""
  y = librosa.effects.pitch_shift(_channels_first(wave), sr=int(sample_rate),
                                  n_steps=float(semitones))
  return np.ascontiguousarray(_channels_first(y), np.float32)


# ---------------------------------------------------------------- metadata

# Metadata lists of timed entries {'start', 'end', ...} in seconds.
TIMED_META_KEYS = ('sections', 'phrases')
# Pitch classes: the spelling a transposed key gets, by the input's accidental.
_SHARP_NAMES = ('C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#', 'B')
_NATURALS = {'C': 0, 'D': 2, 'E': 4, 'F': 5, 'G': 7, 'A': 9, 'B': 11}
_ACCIDENTALS = {'#': 1, 'b': -1, '-': -1}  # '-' is music21's flat
_KEY_RE = re.compile(r'^\s*([A-Ga-g])([#b-]*)\s+(\w+)\s*$')


def _flat_names(flat: str) -> tuple[str, ...]:
  return tuple(n if '#' not in n else _SHARP_NAMES[i + 1] + flat
               for i, n in enumerate(_SHARP_NAMES))


def transpose_key(key: str, semitones: float) -> str | None:
  """'D major' + 2 -> 'E major'; None when the key cannot be transposed.

  Black keys keep the input's accidental style ('#', 'b' or music21's '-').
  """
  m = _KEY_RE.match(key) if isinstance(key, str) else None
  if m is None or float(semitones) != int(semitones):
    return None
  letter, accidentals, mode = m.groups()
  pc = _NATURALS[letter.upper()] + sum(_ACCIDENTALS[a] for a in accidentals)
  pc = (pc + int(semitones)) % _SEMITONES_PER_OCTAVE
  flat = next((a for a in accidentals if _ACCIDENTALS[a] < 0), None)
  names = _flat_names(flat) if flat else _SHARP_NAMES
  return f'{names[pc]} {mode}'


def _scaled_entry(entry: Any, factor: float) -> Any:
  if not isinstance(entry, dict):
    return entry  # song_text reports malformed entries with their position
  out = dict(entry)
  for k in ('start', 'end'):
    if isinstance(out.get(k), (int, float)) and not isinstance(out[k], bool):
      out[k] = out[k] * factor
  return out


def _with_augment(meta: Mapping[str, Any], **what: float) -> dict[str, Any]:
  out = dict(meta)
  out['augment'] = dict(meta.get('augment') or {}, **what)
  return out


def stretch_meta(meta: Mapping[str, Any], rate: float) -> dict[str, Any]:
  """Metadata of a `time_stretch(rate)` copy: times / rate, tempo x rate."""
  out = _with_augment(meta, time_stretch=float(rate))
  for key in TIMED_META_KEYS:
    if isinstance(out.get(key), list):
      out[key] = [_scaled_entry(e, 1.0 / rate) for e in out[key]]
  for key, factor in (('tempo_bpm', rate), ('duration_seconds', 1.0 / rate)):
    if isinstance(out.get(key), (int, float)) and not isinstance(out[key], bool):
      out[key] = out[key] * factor
  return out


def shift_meta(meta: Mapping[str, Any], semitones: float) -> dict[str, Any]:
  """Metadata of a `pitch_shift(semitones)` copy: the key moves along.

  A key that cannot be transposed is dropped: a wrong key tag is worse than
  none.
  """
  out = _with_augment(meta, pitch_shift=float(semitones))
  if out.get('key'):
    moved = transpose_key(out['key'], semitones)
    if moved is None:
      del out['key']
    else:
      out['key'] = moved
  midi = out.get('first_soprano_midi')
  if isinstance(midi, int) and not isinstance(midi, bool):
    out['first_soprano_midi'] = midi + int(round(semitones))
  return out
