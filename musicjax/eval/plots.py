"""Pictures of audio: log-mel spectrograms stacked one above another.

One implementation for the demo's PNGs, TensorBoard image summaries and the
notebooks. It builds `matplotlib.figure.Figure` objects directly (no pyplot),
so it works with any backend and leaks no global figures.
"""
from __future__ import annotations

from typing import Mapping

import librosa
import numpy as np


def mel_db(wave: np.ndarray, sample_rate: int, n_mels: int = 80) -> np.ndarray:
  """[T] mono wave -> [n_mels, frames] power in dB relative to its peak.

  The FFT size shrinks for clips shorter than 1024 samples, so a short
  training segment still gives a picture.
  """
  wave = np.asarray(wave, np.float32).reshape(-1)
  n_fft = min(1024, max(16, 1 << (max(len(wave), 2).bit_length() - 2)))
  mel = librosa.feature.melspectrogram(y=wave, sr=sample_rate, n_fft=n_fft,
                                       hop_length=n_fft // 4, n_mels=n_mels)
  return librosa.power_to_db(mel + 1e-10, ref=np.max)


def spectrogram_figure(waves: Mapping[str, np.ndarray], sample_rate: int,
                       title: str = '', row_height: float = 2.2,
                       width: float = 10.0, axes_labels: bool = True):
  """One row per named mono wave, on a shared time axis in seconds."""
  # Deferred here and below: matplotlib is slow to import, and only runs that
  # write pictures need it.
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, row_height * len(waves) + (0.4 if title else 0)))
  axes = fig.subplots(len(waves), 1, sharex=True, squeeze=False)[:, 0]
  for ax, (name, wave) in zip(axes, waves.items()):
    wave = np.asarray(wave).reshape(-1)
    img = mel_db(wave, sample_rate)
    ax.imshow(img, origin='lower', aspect='auto', cmap='magma',
              extent=(0, len(wave) / sample_rate, 0, img.shape[0]))
    ax.set_title(name, fontsize=9)
    if axes_labels:
      ax.set_ylabel('mel bin')
    else:
      ax.set_xticks([])
      ax.set_yticks([])
  # Waves of different lengths: the longest sets the shared axis (imshow
  # would leave it at the last one's).
  longest = max(np.asarray(w).size for w in waves.values())
  axes[-1].set_xlim(0, max(longest, 1) / sample_rate)
  if axes_labels:
    axes[-1].set_xlabel('seconds')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def token_figure(grids: Mapping[str, np.ndarray], codebook_size: int,
                 row_height: float = 1.2, width: float = 6.0):
  """One row per named token grid [frames, codebooks]: codebook 0 at the
  bottom, colour = code id; negative ids (no token) are black. For tokens
  without a codec to hear them (synthetic data)."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, row_height * len(grids)))
  axes = fig.subplots(len(grids), 1, sharex=True, squeeze=False)[:, 0]
  for ax, (name, grid) in zip(axes, grids.items()):
    grid = np.asarray(grid).reshape(len(grid), -1).T
    img = np.ma.masked_less(grid, 0)
    ax.set_facecolor('black')
    ax.imshow(img, origin='lower', aspect='auto', cmap='viridis',
              interpolation='nearest', vmin=0, vmax=max(codebook_size - 1, 1))
    ax.set_title(name, fontsize=9)
    ax.set_ylabel('codebook', fontsize=8)
    ax.set_yticks([])
  axes[-1].set_xlabel('frame')
  fig.tight_layout()
  return fig


def save_spectrograms(waves: Mapping[str, np.ndarray], sample_rate: int,
                      path: str, title: str = '') -> None:
  spectrogram_figure(waves, sample_rate, title).savefig(path, dpi=100)


def figure_rgb(fig) -> np.ndarray:
  """A figure as an HxWx3 uint8 array (for TensorBoard image summaries)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
