"""Jittable STFT and log-mel helpers shared by codec losses, discriminators and
audio metrics. Inputs are [batch, time] float waveforms."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np


@functools.lru_cache(maxsize=None)
def hann_window(n_fft: int) -> np.ndarray:
  """Periodic Hann window (as torch.hann_window / librosa 'hann')."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                   fmax: float) -> np.ndarray:
  """librosa (Slaney) mel filterbank as a [n_fft//2+1, n_mels] constant."""
  fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels,
                           fmin=fmin, fmax=fmax if fmax > 0 else None)
  return np.ascontiguousarray(fb.T.astype(np.float32))


def stft(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
  """Centred (reflect-padded) Hann STFT: [B, T] -> complex [B, frames, bins]."""
  if x.ndim != 2:
    raise ValueError(f'stft expects [batch, time], got shape {x.shape}')
  pad = n_fft // 2
  mode = 'reflect' if x.shape[1] > pad else 'constant'
  x = jnp.pad(x, ((0, 0), (pad, pad)), mode=mode)
  frames = frame(x, n_fft, hop) * jnp.asarray(hann_window(n_fft))
  return jnp.fft.rfft(frames, axis=-1)


def frame(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
  """[B, T] -> [B, frames, n_fft] windows every `hop` samples.

  When hop divides n_fft (the usual win/4), frames are built from
  non-overlapping hop-sized blocks by slicing and concatenation: no gather,
  whose backward pass (a scatter-add) is several times slower on CPU.
  """
  n_frames = 1 + (x.shape[1] - n_fft) // hop
  if n_fft % hop:
    idx = jnp.arange(n_fft)[None, :] + hop * jnp.arange(n_frames)[:, None]
    return x[:, idx]
  r = n_fft // hop
  blocks = x[:, :(n_frames + r - 1) * hop].reshape(x.shape[0], n_frames + r - 1, hop)
  return jnp.concatenate([blocks[:, i:i + n_frames] for i in range(r)], axis=-1)


def magnitude(spec: jax.Array) -> jax.Array:
  return jnp.abs(spec)


def mel_magnitude(x: jax.Array, sample_rate: int, n_fft: int, hop: int,
                  n_mels: int, fmin: float = 0.0, fmax: float = 0.0) -> jax.Array:
  """Mel-scaled STFT magnitude [B, frames, n_mels]."""
  mag = jnp.abs(stft(x, n_fft, hop))
  return mag @ jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax))


def _fold(x: jax.Array) -> jax.Array:
  """[B, T, C] or [B, T] -> [B*C, T]."""
  if x.ndim == 3:
    return jnp.moveaxis(x, -1, 1).reshape(-1, x.shape[1])
  return x


def _log_l1(a: jax.Array, b: jax.Array, clamp: float, power: float) -> jax.Array:
  la = jnp.log10(jnp.maximum(a, clamp) ** power)
  lb = jnp.log10(jnp.maximum(b, clamp) ** power)
  return jnp.mean(jnp.abs(la - lb))


def multiscale_mel_distance(x: jax.Array, y: jax.Array, *, sample_rate: int,
                            windows: tuple[int, ...], n_mels: tuple[int, ...],
                            hop_fraction: float, clamp: float, power: float,
                            log_weight: float, mag_weight: float,
                            fmin: float = 0.0, fmax: float = 0.0) -> jax.Array:
  """Sum over scales of log_weight * L1(log10(clamp(mel)^power)) +
  mag_weight * L1(mel), hop = win * hop_fraction (DAC MelSpectrogramLoss)."""
  if len(windows) != len(n_mels):
    raise ValueError(f'mel windows {windows} and n_mels {n_mels} differ in length')
  x, y = _fold(x), _fold(y)
  total = jnp.zeros((), jnp.float32)
  for win, mels in zip(windows, n_mels):
    hop = max(int(win * hop_fraction), 1)
    mx = mel_magnitude(x, sample_rate, win, hop, mels, fmin, fmax)
    my = mel_magnitude(y, sample_rate, win, hop, mels, fmin, fmax)
    total += log_weight * _log_l1(mx, my, clamp, power)
    if mag_weight:
      total += mag_weight * jnp.mean(jnp.abs(mx - my))
  return total


def multiscale_stft_distance(x: jax.Array, y: jax.Array, *,
                             windows: tuple[int, ...], hop_fraction: float,
                             clamp: float, power: float, log_weight: float,
                             mag_weight: float) -> jax.Array:
  """Sum over windows of log_weight * L1(log10(clamp(|X|)^power)) +
  mag_weight * L1(|X|) (DAC MultiScaleSTFTLoss)."""
  x, y = _fold(x), _fold(y)
  total = jnp.zeros((), jnp.float32)
  for win in windows:
    hop = max(int(win * hop_fraction), 1)
    mx, my = jnp.abs(stft(x, win, hop)), jnp.abs(stft(y, win, hop))
    total += log_weight * _log_l1(mx, my, clamp, power)
    if mag_weight:
      total += mag_weight * jnp.mean(jnp.abs(mx - my))
  return total
