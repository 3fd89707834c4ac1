"""Codec training losses. Every weight and setting comes from config.loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from musicjax.nn import spectral

ADV_TYPES = ('lsgan', 'hinge')
DiscOut = list[tuple[jax.Array, list[jax.Array]]]


def mel_loss(x: jax.Array, y: jax.Array, cfg: ml_collections.ConfigDict,
             sample_rate: int) -> jax.Array:
  return spectral.multiscale_mel_distance(
      x, y, sample_rate=sample_rate, windows=tuple(cfg.mel_windows),
      n_mels=tuple(cfg.mel_bins), hop_fraction=cfg.hop_fraction,
      clamp=cfg.clamp, power=cfg.mel_power, log_weight=cfg.mel_log_weight,
      mag_weight=cfg.mel_mag_weight, fmin=cfg.mel_fmin, fmax=cfg.mel_fmax)


def stft_loss(x: jax.Array, y: jax.Array, cfg: ml_collections.ConfigDict
              ) -> jax.Array:
  return spectral.multiscale_stft_distance(
      x, y, windows=tuple(cfg.stft_windows), hop_fraction=cfg.hop_fraction,
      clamp=cfg.clamp, power=cfg.stft_power, log_weight=cfg.stft_log_weight,
      mag_weight=cfg.stft_mag_weight)


def waveform_l1(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(x - y))


def _check_adv(adv_type: str) -> None:
  if adv_type not in ADV_TYPES:
    raise ValueError(f'config.loss.adv_type must be one of {ADV_TYPES}, got {adv_type!r}')


def discriminator_loss(real: DiscOut, fake: DiscOut, adv_type: str) -> jax.Array:
  """Sum over sub-discriminators. LSGAN: (1-D(x))^2 + D(G)^2; hinge:
  relu(1-D(x)) + relu(1+D(G))."""
  _check_adv(adv_type)
  total = jnp.zeros((), jnp.float32)
  for (lr, _), (lf, _) in zip(real, fake):
    if adv_type == 'lsgan':
      total += jnp.mean(jnp.square(1.0 - lr)) + jnp.mean(jnp.square(lf))
    else:
      total += jnp.mean(jax.nn.relu(1.0 - lr)) + jnp.mean(jax.nn.relu(1.0 + lf))
  return total


def generator_adv_loss(fake: DiscOut, adv_type: str) -> jax.Array:
  """LSGAN: (1-D(G))^2; hinge: -D(G). Summed over sub-discriminators."""
  _check_adv(adv_type)
  total = jnp.zeros((), jnp.float32)
  for lf, _ in fake:
    total += jnp.mean(jnp.square(1.0 - lf)) if adv_type == 'lsgan' else -jnp.mean(lf)
  return total


def feature_matching_loss(real: DiscOut, fake: DiscOut) -> jax.Array:
  """L1 between real and fake feature maps, every layer but the logits."""
  total = jnp.zeros((), jnp.float32)
  for (_, fr), (_, ff) in zip(real, fake):
    for a, b in zip(fr[:-1], ff[:-1]):
      total += jnp.mean(jnp.abs(jax.lax.stop_gradient(a) - b))
  return total


def reconstruction_losses(audio: jax.Array, recon: jax.Array,
                          cfg: ml_collections.ConfigDict, sample_rate: int
                          ) -> dict[str, jax.Array]:
  """Unweighted mel / stft / waveform terms. Terms with weight 0 are skipped
  at trace time (reported as 0) to save compute."""
  zero = jnp.zeros((), jnp.float32)
  return {
      'mel': mel_loss(audio, recon, cfg, sample_rate) if cfg.mel_weight else zero,
      'stft': stft_loss(audio, recon, cfg) if cfg.stft_weight else zero,
      'wave': waveform_l1(audio, recon) if cfg.wave_weight else zero,
  }
