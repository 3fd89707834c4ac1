"""Objective codec metrics (jittable, [B, T, C] or [B, T] float audio).

Settings follow the class defaults of DAC's `dac/nn/loss.py`, computed at the
model's own sample rate (DAC's evaluate.py additionally resamples to 22.05 and
44.1 kHz; we do not):
  * mel distance: 2 scales, Hann windows 2048 / 512 with 150 / 80 Slaney mel
    bins (librosa filterbank, 0 Hz .. Nyquist), hop = window / 4, centred
    reflect-padded STFT; per scale L1 of log10(clamp(mel, 1e-5)^2) plus L1 of
    the mel magnitude; summed over scales.
  * multi-scale STFT distance: windows 2048 / 512, hop = window / 4; per scale
    L1 of log10(clamp(|X|, 1e-5)^2) plus L1 of |X|; summed.
  * SI-SDR (dB): zero-mean signals, optimal scaling of the reference,
    10 log10(|s|^2 / |s - est|^2), mean over batch items and channels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from musicjax.nn import spectral

MEL_WINDOWS = (2048, 512)
MEL_BINS = (150, 80)
STFT_WINDOWS = (2048, 512)
HOP_FRACTION = 0.25
CLAMP = 1e-5
POWER = 2.0
SISDR_EPS = 1e-8


def mel_distance(reference: jax.Array, estimate: jax.Array,
                 sample_rate: int) -> jax.Array:
  return spectral.multiscale_mel_distance(
      reference, estimate, sample_rate=sample_rate, windows=MEL_WINDOWS,
      n_mels=MEL_BINS, hop_fraction=HOP_FRACTION, clamp=CLAMP, power=POWER,
      log_weight=1.0, mag_weight=1.0)


def stft_distance(reference: jax.Array, estimate: jax.Array) -> jax.Array:
  return spectral.multiscale_stft_distance(
      reference, estimate, windows=STFT_WINDOWS, hop_fraction=HOP_FRACTION,
      clamp=CLAMP, power=POWER, log_weight=1.0, mag_weight=1.0)


def si_sdr(reference: jax.Array, estimate: jax.Array,
           eps: float = SISDR_EPS) -> jax.Array:
  """Scale-invariant SDR in dB, averaged over batch (and channels)."""
  if reference.shape != estimate.shape:
    raise ValueError(f'si_sdr: reference {reference.shape} and estimate '
                     f'{estimate.shape} shapes differ')
  axis = 1  # time is axis 1 in [B, T] and [B, T, C]
  ref = reference - jnp.mean(reference, axis=axis, keepdims=True)
  est = estimate - jnp.mean(estimate, axis=axis, keepdims=True)
  alpha = (jnp.sum(ref * est, axis) + eps) / (jnp.sum(ref * ref, axis) + eps)
  target = jnp.expand_dims(alpha, axis) * ref
  noise = est - target
  ratio = (jnp.sum(target**2, axis) + eps) / (jnp.sum(noise**2, axis) + eps)
  return jnp.mean(10.0 * jnp.log10(ratio))


def bitrate(num_codebooks: int, codebook_size: int, frame_rate: float) -> float:
  """Bits per second: K * log2(codebook_size) * frame_rate."""
  return float(num_codebooks * math.log2(codebook_size) * frame_rate)


def codebook_perplexity(codes: jax.Array, codebook_size: int) -> jax.Array:
  """exp(entropy) of each codebook's code histogram: codes [..., K] -> [K].
  Equals codebook_size for uniform use, 1 when a single code is used."""
  flat = codes.reshape(-1, codes.shape[-1])
  counts = jax.vmap(lambda c: jnp.bincount(c, length=codebook_size),
                    in_axes=1)(flat).astype(jnp.float32)
  p = counts / jnp.sum(counts, axis=1, keepdims=True)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), 1)
  return jnp.exp(ent)
