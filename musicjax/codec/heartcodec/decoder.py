"""HeartCodec's decoder: codes -> 25 Hz latent (flow matching) -> waveform.

`HeartCodecDecoder.detokenize` decodes a song of any length the way heartlib
does (windows.py): one compiled Euler loop per window (the same program for
every window and song length), the scalar-quantized decoder per window, and a
float64 cross-fade on the host. Codes are [B, F, K] and audio [B, samples,
channels], as elsewhere in musicjax.

Build one with random weights from a config (config.py), or load HeartCodec
weights with musicjax.export.released.heartcodec.load.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicjax.codec.heartcodec import config as config_lib
from musicjax.codec.heartcodec import flow_matching, windows
from musicjax.codec.heartcodec.code_embedding import CodeEmbedding
from musicjax.codec.heartcodec.estimator import FlowEstimator
from musicjax.codec.heartcodec.scalar_decoder import ScalarDecoder
from musicjax.parallel import rules


class HeartCodecDecoder(nnx.Module):

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    config_lib.check_config(c)
    f = c.flow
    self.config = ml_collections.FrozenConfigDict(c)
    self.codes = CodeEmbedding(c.codes, int(f.frames_per_code),
                               float(c.estimator.init_std), rngs=rngs)
    self.estimator = FlowEstimator(c.estimator, rngs=rngs)
    self.scalar = ScalarDecoder(c.scalar, float(c.estimator.init_std),
                                rngs=rngs)

  @property
  def latent_channels(self) -> int:
    return int(self.config.estimator.out_channels)

  def latent_window(self, codes: jax.Array, noise: jax.Array, known: jax.Array,
                    prefix_len: jax.Array) -> jax.Array:
    """One window's latent [B, F * frames_per_code, C] from codes [B, F, K]
    (flow_matching.sample: noise, and the known prefix of `known`)."""
    f = self.config.flow
    return flow_matching.sample(
        self.estimator, self.codes(codes), noise, known, prefix_len,
        num_steps=int(f.num_steps), guidance_scale=float(f.guidance_scale),
        sigma_min=float(f.sigma_min))

  def waveform(self, latent: jax.Array) -> jax.Array:
    """Latent [B, T, C] -> audio [B, T * upsampling, channels]: each channel
    decodes its own slice of the latent channels."""
    b, t, c = latent.shape
    ch = int(self.config.scalar.channels)
    z = rules.reshape(latent, (b, t, ch, c // ch)).transpose(0, 2, 1, 3)
    y = self.scalar(rules.reshape(z, (b * ch, t, c // ch))) # [B*ch, samples, 1]
    return rules.reshape(y, (b, ch, y.shape[1])).transpose(0, 2, 1)

  def window_count(self, num_codes: int) -> int:
    return len(self._plan(num_codes).starts)

  def _plan(self, num_codes: int) -> windows.WindowPlan:
    f = self.config.flow
    return windows.plan(num_codes, int(f.window_codes), int(f.hop_codes),
                        int(f.frames_per_code), float(self.config.code_rate_hz),
                        float(self.config.sample_rate))

  def detokenize(self, codes, rng: jax.Array | None = None,
                 noise=None, return_latents: bool = False,
                 on_window: Callable[[int, int], None] | None = None):
    """Audio [B, samples, channels] float32 (numpy) of codes [B, F, K].

    Args:
      codes: int [B, F, K].
      rng: key the windows' initial noise is drawn from (default key 0).
      noise: or that noise itself, [windows, B, window_frames, C]
        (`window_count(F)` windows).
      return_latents: also return the windows' latents [windows, B, T, C].
      on_window: called as on_window(done, total) after each window (progress).
    """
    codes = np.asarray(codes)
    q = self.config.codes
    if codes.ndim != 3 or codes.shape[-1] != q.num_quantizers:
      raise ValueError(f'codes must be [batch, frames, {q.num_quantizers}], '
                       f'got {codes.shape}')
    if codes.size and not 0 <= codes.min() <= codes.max() < q.codebook_size:
      raise ValueError(f'codes must be in [0, {q.codebook_size}), got '
                       f'{codes.min()} ... {codes.max()}')
    f = self.config.flow
    p = self._plan(codes.shape[1])
    b = codes.shape[0]
    frames = int(f.window_codes) * int(f.frames_per_code)
    shape = (len(p.starts), b, frames, self.latent_channels)
    if noise is None:
      rng = jax.random.key(0) if rng is None else rng
      noise = jax.random.normal(rng, shape, jnp.float32)
    elif tuple(noise.shape) != shape:
      raise ValueError(f'noise must be {shape} (windows, batch, frames, '
                       f'channels), got {tuple(noise.shape)}')
    padded = codes[:, p.indices]
    gdef, state = nnx.split(self)
    known = jnp.zeros(shape[1:], jnp.float32)
    latents, waves = [], []
    for i, start in enumerate(p.starts):
      window = jnp.asarray(padded[:, start:start + int(f.window_codes)])
      if i and p.prefix_frames:
        known = jnp.pad(latents[-1][:, -p.prefix_frames:],
                        ((0, 0), (0, frames - p.prefix_frames), (0, 0)))
      prefix = p.prefix_frames if i else 0
      latent = _latent_window(gdef, state, window, jnp.asarray(noise[i]), known,
                              jnp.int32(prefix))
      latents.append(latent)
      waves.append(np.asarray(_waveform(gdef, state, latent)))
      if on_window is not None:
        on_window(i + 1, len(p.starts))
    spc = config_lib.samples_per_code(self.config)
    overlap = (int(f.window_codes) - int(f.hop_codes)) * spc
    # cross_fade works on the last axis: samples.
    audio = windows.cross_fade([w.transpose(0, 2, 1) for w in waves], overlap)
    audio = audio[..., :p.num_samples].transpose(0, 2, 1)
    if return_latents:
      return audio, np.stack([np.asarray(l) for l in latents])
    return audio


# Module-level jits with the graph static: every window of every song on a
# decoder of the same structure reuses one compiled program.
@functools.partial(jax.jit, static_argnums=0)
def _latent_window(graphdef, state, codes, noise, known, prefix_len):
  return nnx.merge(graphdef, state).latent_window(codes, noise, known, prefix_len)


@functools.partial(jax.jit, static_argnums=0)
def _waveform(graphdef, state, latent):
  return nnx.merge(graphdef, state).waveform(latent)
