"""MusicGen-Melody's melody condition: a recording -> chroma one-hots
[frames, num_chroma], as transformers' `MusicgenMelodyFeatureExtractor`
computes them from raw audio at its rate.

The numbers come from the release's preprocessor_config.json (kept in
RUN/released/ by import-musicgen): the recording is cut to chunk_length
seconds, zero-padded evenly to n_fft samples if shorter, then a centred
(reflect-padded) STFT with a periodic Hann window of n_fft samples every
hop_length, power |X|^2 over the window's energy, librosa's chroma filter
bank (tuning 0, classes from C) summed per class, and in every frame the
strongest class as a one-hot (the first on a tie; a silent frame gives class
0, which is also MusicGen-Melody's 'no melody'). Only the one-hot reaches
the model, so the power's scale never matters; a frame whose two strongest
classes are within float32 rounding of each other may pick either.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from musicjax.errors import UserError

PREPROCESSOR = 'preprocessor_config.json'


@dataclasses.dataclass(frozen=True)
class ChromaSettings:
  """The feature extractor's numbers (transformers' defaults: MusicGen-Melody's
  32 kHz, n_fft 16384, hop 4096, 30 s, 12 classes)."""
  sampling_rate: int = 32000
  n_fft: int = 16384
  hop_length: int = 4096
  chunk_length: int = 30
  num_chroma: int = 12

  @property
  def max_samples(self) -> int:
    return self.chunk_length * self.sampling_rate

  @classmethod
  def from_dict(cls, d: dict[str, Any], where: str) -> 'ChromaSettings':
    kw = {}
    for f in dataclasses.fields(cls):
      value = d.get(f.name, f.default)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f'{where}: {f.name} must be a positive integer, got '
                        f'{value!r}')
      kw[f.name] = value
    if d.get('feature_size', kw['num_chroma']) != kw['num_chroma']:
      raise UserError(f'{where}: feature_size {d["feature_size"]!r} is not '
                      f'num_chroma {kw["num_chroma"]}')
    return cls(**kw)

  @classmethod
  def from_file(cls, path: str) -> 'ChromaSettings':
    """The settings of a preprocessor_config.json; its defaults if absent."""
    if not os.path.isfile(path):
      return cls()
    try:
      with open(path, encoding='utf-8') as f:
        d = json.load(f)
    except (OSError, ValueError) as err:
      raise UserError(f'{path}: cannot read it ({err})') from None
    if not isinstance(d, dict):
      raise UserError(f'{path}: not a JSON object')
    return cls.from_dict(d, path)


def filter_bank(s: ChromaSettings) -> np.ndarray:
  """[num_chroma, n_fft // 2 + 1] float32 (librosa's, tuning 0; in float32
  the same as transformers' `chroma_filter_bank`)."""
  return librosa.filters.chroma(sr=s.sampling_rate, n_fft=s.n_fft,
                                n_chroma=s.num_chroma, tuning=0.0,
                                dtype=np.float32)


def _framed(wave: np.ndarray, s: ChromaSettings,
            cut: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The cut / padded recording [T'] and its frame starts."""
  x = np.asarray(wave, np.float32)
  if cut:
    x = x[:s.max_samples]
  if len(x) < s.n_fft:
    pad = s.n_fft - len(x)
    x = np.pad(x, (pad // 2, pad - pad // 2))
  half = s.n_fft // 2
  x = np.pad(x, (half, half), mode='reflect')     # center=True
  starts = np.arange(1 + (len(x) - s.n_fft) // s.hop_length) * s.hop_length
  return x, starts


# Frames per jitted call: one compile serves recordings of any length.
_CHUNK_FRAMES = 128


@jax.jit
def _classes(frames: jax.Array, bank: jax.Array) -> jax.Array:
  """Windowed-to-be frames [F, n_fft] -> the strongest chroma class [F]."""
  n = frames.shape[-1]
  i = jnp.arange(n)
  window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * i / n)          # periodic Hann
  spec = jnp.fft.rfft(frames * window, axis=-1)
  power = (spec.real ** 2 + spec.imag ** 2) / jnp.sum(window ** 2)
  raw = power @ bank.T                                       # [F, chroma]
  return jnp.argmax(raw, axis=-1).astype(jnp.int8)


def classes(wave: np.ndarray, s: ChromaSettings, *,
            cut: bool = True) -> np.ndarray:
  """Mono audio [T] at `s.sampling_rate` -> the strongest chroma class of
  every frame, int8 [1 + T' // hop_length] (T' the padded length; with
  `cut`, as the extractor does, T is first cut to chunk_length seconds)."""
  x, starts = _framed(wave, s, cut)
  bank = jnp.asarray(filter_bank(s))
  offsets = np.arange(s.n_fft)
  out = []
  for a in range(0, len(starts), _CHUNK_FRAMES):
    st = starts[a:a + _CHUNK_FRAMES]
    padded = np.pad(st, (0, _CHUNK_FRAMES - len(st)), mode='edge')
    got = _classes(jnp.asarray(x[padded[:, None] + offsets]), bank)
    out.append(np.asarray(got)[:len(st)])
  return np.concatenate(out)


def chroma(wave: np.ndarray, s: ChromaSettings) -> np.ndarray:
  """Mono audio [T] at `s.sampling_rate` -> one-hot chroma [frames, num_chroma]
  float32 (transformers' `input_features`), frames = 1 + T' // hop_length (T'
  the cut / padded length)."""
  return one_hot(classes(wave, s), s.num_chroma)


def one_hot(ids: np.ndarray, num_chroma: int) -> np.ndarray:
  return np.eye(num_chroma, dtype=np.float32)[np.asarray(ids, np.int64)]


def window(ids: np.ndarray, start_seconds: float, seconds: float,
           s: ChromaSettings, length: int) -> np.ndarray:
  """The classes of a training window, from a whole song's `ids` (`classes`
  with cut=False): the frames the extractor would give the window's audio
  (centred from the frame nearest its start, as many as its cut / padded
  length gives), then repeated and cut to `length`, as the model's prefix
  does. Away from the window's edges these are the window's own frames
  exactly; at them, the song's real neighbouring audio stands where the
  extractor would reflect-pad."""
  ids = np.asarray(ids)
  samples = min(int(round(seconds * s.sampling_rate)), s.max_samples)
  count = 1 + max(samples, s.n_fft) // s.hop_length
  first = min(int(round(start_seconds * s.sampling_rate / s.hop_length)),
              len(ids) - 1)
  w = ids[first:first + count]
  return np.tile(w, -(-length // len(w)))[:length]
