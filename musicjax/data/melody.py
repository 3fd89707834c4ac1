"""Melody condition: the dominant pitch class per codec frame (MusicGen §2.3).

MusicGen conditions on the argmax of the chromagram rather than on the
chromagram itself: a bottleneck that keeps the melody line but drops timbre,
so the model cannot copy the reference audio through this condition. Here the
chroma is taken per codec frame, giving one class per audio token: 0..11
(C, C#, ..., B) or NO_MELODY where the frame is silent.

Alignment: codec frame i covers samples [i * hop, (i + 1) * hop). Its STFT
window is centred on that frame's centre, i * hop + hop / 2, rather than on
i * hop as librosa's `center=True` would place it, so with a long window the
label does not lag half a frame behind the audio.
"""
from __future__ import annotations

import math

import librosa
import numpy as np

NUM_MELODY_CLASSES = 12
# Label of frames quieter than `silence_db`.
NO_MELODY = -1
# STFT size: 4096 samples (~170 ms at 24 kHz) resolves semitones down to about
# C3, enough for a melody line.
DEFAULT_N_FFT = 4096
# Frames whose RMS is below this (dB relative to full scale, amplitude 1.0)
# are silent.
DEFAULT_SILENCE_DB = -60.0


def _mono(wave: np.ndarray) -> np.ndarray:
  wave = np.asarray(wave)
  if wave.ndim == 2:
    wave = wave.mean(axis=1)
  elif wave.ndim != 1:
    raise ValueError(f'wave must be [T] or [T, C], got shape {wave.shape}')
  wave = wave.astype(np.float32)
  if not np.all(np.isfinite(wave)):
    raise ValueError('wave contains NaN or Inf')
  return wave


def frame_rms_db(wave: np.ndarray, hop_length: int) -> np.ndarray:
  """RMS level in dB re full scale of each codec frame [ceil(T / hop)]."""
  n = math.ceil(len(wave) / hop_length)
  padded = np.zeros(n * hop_length, np.float64)
  padded[:len(wave)] = wave
  # Zero padding would lower the level of a short last frame; average over
  # the samples it really has.
  counts = np.full(n, hop_length)
  if n:
    counts[-1] = len(wave) - (n - 1) * hop_length
  power = (padded.reshape(n, hop_length) ** 2).sum(axis=1) / counts
  return 10.0 * np.log10(np.maximum(power, np.finfo(np.float64).tiny))


def chroma_tokens(wave: np.ndarray, sample_rate: int, hop_length: int, *,
                  n_fft: int = DEFAULT_N_FFT,
                  silence_db: float = DEFAULT_SILENCE_DB) -> np.ndarray:
  """The argmax chroma class of every codec frame.

  Args:
    wave: audio [T] or [T, C] (channels are averaged), nominally in [-1, 1].
    sample_rate: of `wave`.
    hop_length: samples per codec frame.
    n_fft: STFT window length in samples.
    silence_db: frames with RMS below this (dB re full scale) get NO_MELODY.

  Returns:
    int8 [ceil(T / hop_length)]: 0..11 with 0 = C, or NO_MELODY.
  """
  if hop_length < 1 or n_fft < 2:
    raise ValueError(f'need hop_length >= 1 and n_fft >= 2, got {hop_length}, '
                     f'{n_fft}')
  x = _mono(wave)
  n = math.ceil(len(x) / hop_length)
  if n == 0:
    return np.zeros(0, np.int8)
  # Window i must start at i * hop + hop // 2 - n_fft // 2 (centred on frame
  # i). Zero-pad n_fft samples on the left so that start is never negative,
  # then drop the excess; pad the right so all n windows fit (librosa's
  # center=True would instead centre window i on sample i * hop and give
  # 1 + T // hop frames, one too many when hop divides T).
  left = n_fft + hop_length // 2 - n_fft // 2
  need = (n - 1) * hop_length + n_fft
  padded = np.zeros(left + max(need, len(x) + n_fft), np.float32)
  padded[n_fft:n_fft + len(x)] = x
  padded = padded[left:left + need]
  spec = np.abs(librosa.stft(padded, n_fft=n_fft, hop_length=hop_length,
                             center=False)) ** 2
  # tuning=0: A4 = 440 Hz, not estimated (an estimate from a short or sparse
  # clip can shift every class by one).
  chroma = librosa.feature.chroma_stft(S=spec[:, :n], sr=sample_rate,
                                       n_fft=n_fft, tuning=0.0)
  out = np.argmax(chroma, axis=0).astype(np.int8)
  out[frame_rms_db(x, hop_length) < silence_db] = NO_MELODY
  return out
