"""Small audio files written with numpy + soundfile for data tests."""
from __future__ import annotations

import os

import numpy as np
import soundfile as sf

from musicjax.config import base_config


def tone(seconds: float, sample_rate: int, freq: float, channels: int = 1,
         amplitude: float = 0.5) -> np.ndarray:
  """A sine [T, C]; each channel a slightly different level to tell them apart."""
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  x = amplitude * np.sin(2 * np.pi * freq * t).astype(np.float32)
  return np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1)


def write(path: str, x: np.ndarray, sample_rate: int, **kwargs) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sf.write(path, x, sample_rate, **kwargs)
  return path


def good_folder(root: str, n: int, seconds: float = 1.5,
                sample_rate: int = 8000) -> list[str]:
  """`n` good mono wav files, each a distinct frequency, in nested folders."""
  return [write(os.path.join(root, f'd{i % 3}', f'good{i:02d}.wav'),
                tone(seconds, sample_rate, 200.0 + 50 * i), sample_rate)
          for i in range(n)]


def data_config(path: str = '', kind: str = 'folder', **data):
  c = base_config()
  c.data.kind = kind
  c.data.path = path
  c.data.sample_rate = 8000
  c.data.segment_seconds = 0.25
  c.data.batch_size = 2
  c.data.eval_batch_size = 2
  c.data.eval_fraction = 0.0
  for k, v in data.items():
    c.data[k] = v
  return c


def bad_under(root: str) -> dict[str, str]:
  """The bad-file report restricted to paths under `root`: prefetch threads of
  earlier tests' abandoned iterators may still report their own files."""
  from musicjax.data import audio
  return {p: r for p, r in audio.bad_files().items() if p.startswith(str(root))}
