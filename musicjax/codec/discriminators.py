"""GAN discriminators: multi-period (HiFi-GAN) and multi-band complex STFT (DAC).

Each sub-discriminator returns (logits, feature maps); `Discriminator` returns
a list of those over all sub-discriminators. Audio channels are folded into
the batch, so each channel is judged as a mono signal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.nn.conv import WNConv2d
from musicjax.nn.spectral import stft

Output = tuple[jax.Array, list[jax.Array]]


class PeriodDiscriminator(nnx.Module):
  """Audio [N, T] reshaped to [N, T/p, p, 1], then (k x 1) strided 2-D convs."""

  def __init__(self, period: int, cfg: ml_collections.ConfigDict, *,
               rngs: nnx.Rngs):
    self.period = period
    self.slope = cfg.leaky_slope
    convs, ch = [], 1
    for i, out in enumerate(cfg.period_channels):
      stride = cfg.period_stride if i < len(cfg.period_channels) - 1 else 1
      convs.append(WNConv2d(ch, out, (cfg.period_kernel, 1), stride=(stride, 1),
                            rngs=rngs))
      ch = out
    self.convs = nnx.List(convs)
    self.post = WNConv2d(ch, 1, (cfg.post_kernel, 1), rngs=rngs)

  def __call__(self, x: jax.Array) -> Output:
    n, t = x.shape
    extra = (-t) % self.period
    if extra:
      x = jnp.pad(x, ((0, 0), (0, extra)), mode='reflect' if t > extra else 'constant')
    x = x.reshape(n, -1, self.period, 1)
    feats = []
    for conv in self.convs:
      x = jax.nn.leaky_relu(conv(x), self.slope)
      feats.append(x)
    x = self.post(x)
    feats.append(x)
    return x, feats


class BandSTFTDiscriminator(nnx.Module):
  """Complex STFT (real, imag) split into frequency bands, each with its own
  conv stack; bands concatenated along frequency, then a post conv."""

  def __init__(self, n_fft: int, cfg: ml_collections.ConfigDict, *,
               rngs: nnx.Rngs):
    self.n_fft = n_fft
    self.hop = max(int(n_fft * cfg.stft_hop_fraction), 1)
    self.slope = cfg.leaky_slope
    bins = n_fft // 2 + 1
    edges = [int(round(b * bins)) for b in cfg.stft_bands]
    if any(e1 <= e0 for e0, e1 in zip(edges[:-1], edges[1:])):
      raise ValueError(f'config.disc.stft_bands {cfg.stft_bands} give empty bands '
                       f'for n_fft={n_fft}; use increasing fractions in [0, 1]')
    self.bands = tuple(zip(edges[:-1], edges[1:]))
    ch = cfg.stft_channels
    stacks = []
    for _ in self.bands:
      layers = [WNConv2d(2, ch, tuple(cfg.stft_kernel), rngs=rngs)]
      for _ in range(cfg.stft_layers - 1):
        layers.append(WNConv2d(ch, ch, tuple(cfg.stft_kernel),
                               stride=tuple(cfg.stft_stride), rngs=rngs))
      stacks.append(nnx.List(layers))
    self.stacks = nnx.List(stacks)
    self.post = WNConv2d(ch, 1, (cfg.post_kernel, cfg.post_kernel), rngs=rngs)

  def __call__(self, x: jax.Array) -> Output:
    spec = stft(x, self.n_fft, self.hop)
    spec = jnp.stack([spec.real, spec.imag], axis=-1)  # [N, frames, bins, 2]
    feats, outs = [], []
    for (lo, hi), stack in zip(self.bands, self.stacks):
      h = spec[:, :, lo:hi]
      for conv in stack:
        h = jax.nn.leaky_relu(conv(h), self.slope)
        feats.append(h)
      outs.append(h)
    h = self.post(jnp.concatenate(outs, axis=2))
    feats.append(h)
    return h, feats


class Discriminator(nnx.Module):
  """All sub-discriminators named by config.disc (periods, stft_fft_sizes)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if not cfg.periods and not cfg.stft_fft_sizes:
      raise ValueError('config.disc: both periods and stft_fft_sizes are empty; '
                       'at least one discriminator is needed')
    self.mpd = nnx.List([PeriodDiscriminator(p, cfg, rngs=rngs) for p in cfg.periods])
    self.mrd = nnx.List([BandSTFTDiscriminator(n, cfg, rngs=rngs)
                         for n in cfg.stft_fft_sizes])

  def __call__(self, audio: jax.Array) -> list[Output]:
    b, t, c = audio.shape
    x = jnp.moveaxis(audio, -1, 1).reshape(b * c, t)
    return [d(x) for d in self.mpd] + [d(x) for d in self.mrd]
