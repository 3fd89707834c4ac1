"""Metrics for vocal-to-accompaniment generation (numpy, CPU, no weights).

Each metric compares a generated accompaniment `est` with the true
accompaniment `ref`: mono float waveforms at sample rate `sr`.

  * onset_f1: librosa onsets (spectral flux) on both signals, scored by
    `mir_eval.onset.f_measure` within +-`window` seconds.
  * beat_f1: librosa `beat_track` beats on both signals, scored by
    `mir_eval.beat.f_measure` (70 ms window). Beats before `min_beat_time` are
    dropped with `mir_eval.beat.trim_beats`; the default is 0 s, i.e. no trim
    (mir_eval's usual 5 s would discard half of a 10 s clip, and both beat
    lists come from the same tracker, so there is no annotator warm-up to hide).
  * chroma_sim: mean frame-wise Pearson correlation of 12-d CQT chroma.

Empty event lists are decided here, not by mir_eval (which warns and returns
0): neither signal has events -> 1.0 (they agree); only one has -> 0.0.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import librosa
import mir_eval
import numpy as np

METRIC_KEYS = ('onset_f1', 'beat_f1', 'chroma_sim')
BASELINE_KEYS = ('other_song', 'silence', 'vocal_copy')

ONSET_WINDOW = 0.05  # seconds, mir_eval's default
BEAT_WINDOW = 0.07  # seconds, mir_eval.beat.f_measure's default
MIN_BEAT_TIME = 0.0  # seconds; see module docstring for why not 5 s
# Onset/beat analysis hop in seconds (10 ms at any sr): librosa's default of
# 512 samples is 32 ms at 16 kHz, too coarse next to a 50 ms onset window.
EVENT_HOP_SECONDS = 0.01
CHROMA_HOP_LENGTH = 512  # samples; chroma_cqt needs a multiple of 2**6
CHROMA_FMIN_NOTE = 'C1'   # librosa's chroma_cqt default
CHROMA_MAX_OCTAVES = 7    # librosa's default range
CHROMA_NYQUIST_HEADROOM = 0.95
# Frames quieter than this RMS (-80 dBFS) have no pitch content; librosa's
# per-frame max normalisation would otherwise blow their noise up to full
# scale chroma.
SILENCE_RMS = 1e-4
RMS_FRAME_LENGTH = 2048  # samples, librosa's default
FLAT_EPS = 1e-6  # centred chroma norms below this count as flat
TABLE_DECIMALS = 3


def _as_mono(x, name: str) -> np.ndarray:
  """Validates one waveform; returns it as 1-D float32."""
  x = np.asarray(x)
  if x.ndim == 2 and x.shape[-1] == 1:  # [T, 1] -> [T]
    x = x[:, 0]
  if x.ndim != 1:
    raise ValueError(f'{name}: expected mono audio of shape [T] or [T, 1], '
                     f'got shape {x.shape}')
  if x.size == 0:
    raise ValueError(f'{name}: audio is empty')
  if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
    raise ValueError(f'{name}: expected real numbers, got dtype {x.dtype}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name}: audio contains non-finite values (NaN/inf)')
  return x.astype(np.float32)


def _check_sr(sr) -> None:
  if not sr > 0:
    raise ValueError(f'sr must be positive, got {sr}')


def _inputs(ref, est, sr) -> tuple[np.ndarray, np.ndarray]:
  """Validates a (ref, est, sr) triple."""
  _check_sr(sr)
  return _as_mono(ref, 'ref'), _as_mono(est, 'est')


def _event_hop(sr) -> int:
  return max(1, int(round(sr * EVENT_HOP_SECONDS)))


def _event_f1(ref_times: np.ndarray, est_times: np.ndarray, score) -> float:
  """Applies the empty-list rules, else `score(ref_times, est_times)`."""
  if ref_times.size == 0 or est_times.size == 0:
    return 1.0 if ref_times.size == est_times.size else 0.0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # mir_eval's validation warnings
    return float(score(ref_times, est_times))


def _onsets(y: np.ndarray, sr) -> np.ndarray:
  return librosa.onset.onset_detect(y=y, sr=sr, hop_length=_event_hop(sr),
                                    units='time')


def _beats(y: np.ndarray, sr, min_beat_time: float) -> np.ndarray:
  _, beats = librosa.beat.beat_track(y=y, sr=sr, hop_length=_event_hop(sr),
                                     units='time')
  return mir_eval.beat.trim_beats(np.asarray(beats), min_beat_time)


def onset_f1(ref, est, sr, window: float = ONSET_WINDOW) -> float:
  """Onset F-measure of `est` against `ref` within +-`window` seconds.

  1.0 when neither signal has onsets; 0.0 when exactly one has none.
  """
  ref, est = _inputs(ref, est, sr)
  return _event_f1(
      _onsets(ref, sr), _onsets(est, sr),
      lambda r, e: mir_eval.onset.f_measure(r, e, window=window)[0])


def beat_f1(ref, est, sr, window: float = BEAT_WINDOW,
            min_beat_time: float = MIN_BEAT_TIME) -> float:
  """Beat F-measure of `est`'s tracked beats against `ref`'s.

  No 5 s trim by default (see module docstring). 1.0 when neither signal has
  beats; 0.0 when exactly one has none.
  """
  ref, est = _inputs(ref, est, sr)
  return _event_f1(
      _beats(ref, sr, min_beat_time), _beats(est, sr, min_beat_time),
      lambda r, e: mir_eval.beat.f_measure(r, e, f_measure_threshold=window))


def _chroma_octaves(sr) -> int:
  """librosa's default 7 octaves from C1, fewer when they would pass the
  Nyquist frequency (the top bins' filters need some headroom) at low rates."""
  fmin = librosa.note_to_hz(CHROMA_FMIN_NOTE)
  top = CHROMA_NYQUIST_HEADROOM * 0.5 * float(sr) / fmin
  return int(max(1, min(CHROMA_MAX_OCTAVES, np.floor(np.log2(top)))))


def _chroma(y: np.ndarray, sr, hop_length: int) -> np.ndarray:
  """[frames, 12] CQT chroma with silent frames set to zero."""
  with warnings.catch_warnings():
    # Tuning estimation on silent audio warns; those frames are zeroed below.
    warnings.filterwarnings('ignore', message='Trying to estimate tuning')
    chroma = librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=hop_length,
                                        n_octaves=_chroma_octaves(sr))
  rms = librosa.feature.rms(y=y, frame_length=RMS_FRAME_LENGTH,
                            hop_length=hop_length)[0]
  n = min(chroma.shape[1], rms.shape[0])
  chroma = chroma[:, :n].T
  return np.where((rms[:n] < SILENCE_RMS)[:, None], 0.0, chroma)


def chroma_similarity(ref, est, sr,
                      hop_length: int = CHROMA_HOP_LENGTH) -> float:
  """Mean over frames of the Pearson correlation of the two chroma vectors.

  Chroma is `librosa.feature.chroma_cqt` (log-spaced bins resolve bass notes,
  which an STFT chroma smears across pitch classes at 16 kHz), both at
  `hop_length`, trimmed to the shorter signal's frame count. Each 12-d vector
  is centred on its own mean before the cosine: plain chroma cosine rewards
  flat chroma (all-positive vectors are always similar), so near-silence would
  beat another song's accompaniment. A frame where either centred vector is
  (near) zero -- flat chroma, or RMS below SILENCE_RMS -- scores 0, so silence
  never looks similar.
  """
  ref, est = _inputs(ref, est, sr)
  a, b = _chroma(ref, sr, hop_length), _chroma(est, sr, hop_length)
  n = min(len(a), len(b))
  a = a[:n] - a[:n].mean(axis=1, keepdims=True)
  b = b[:n] - b[:n].mean(axis=1, keepdims=True)
  na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
  ok = (na > FLAT_EPS) & (nb > FLAT_EPS)
  corr = np.zeros(n)
  corr[ok] = np.sum(a[ok] * b[ok], axis=1) / (na[ok] * nb[ok])
  return float(np.mean(corr))


def compare(ref, est, sr) -> dict[str, float]:
  """All metrics for one (true, generated) accompaniment pair.

  Raises ValueError for audio that is not 1-D (after squeezing a trailing
  channel axis of size 1), empty, or non-finite, and for sr <= 0.
  """
  ref, est = _inputs(ref, est, sr)
  return {'onset_f1': onset_f1(ref, est, sr),
          'beat_f1': beat_f1(ref, est, sr),
          'chroma_sim': chroma_similarity(ref, est, sr)}


def _fit_length(x: np.ndarray, length: int) -> np.ndarray:
  """Trims or zero-pads `x` at the end to `length` samples."""
  return librosa.util.fix_length(x, size=length)


def baseline_rows(vocal, true_accomp, other_accomp,
                  sr) -> dict[str, dict[str, float]]:
  """`compare` rows for the reference-free baselines against `true_accomp`.

  'other_song': another song's accompaniment; 'silence': zeros; 'vocal_copy':
  the vocal itself. Baselines are trimmed / zero-padded to the true
  accompaniment's length so every row covers the same span.
  """
  _check_sr(sr)
  ref = _as_mono(true_accomp, 'true_accomp')
  n = len(ref)
  systems = {
      'other_song': _fit_length(_as_mono(other_accomp, 'other_accomp'), n),
      'silence': np.zeros(n, np.float32),
      'vocal_copy': _fit_length(_as_mono(vocal, 'vocal'), n),
  }
  return {name: compare(ref, est, sr) for name, est in systems.items()}


def mean_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Per-metric mean over a list of metric dicts (e.g. one per clip)."""
  if not rows:
    raise ValueError('mean_rows: no rows to average')
  keys = set(rows[0])
  for i, row in enumerate(rows):
    if set(row) != keys:
      raise ValueError(f'mean_rows: row {i} has keys {sorted(row)}, '
                       f'expected {sorted(keys)}')
  return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
  """Markdown table: one line per system, columns METRIC_KEYS."""
  lines = ['| system | ' + ' | '.join(METRIC_KEYS) + ' |',
           '|---|' + '---:|' * len(METRIC_KEYS)]
  for name, row in rows.items():
    missing = [k for k in METRIC_KEYS if k not in row]
    if missing:
      raise ValueError(f'format_table: row {name!r} lacks {missing}')
    cells = [f'{row[k]:.{TABLE_DECIMALS}f}' for k in METRIC_KEYS]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
