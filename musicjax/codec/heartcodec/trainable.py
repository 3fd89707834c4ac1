"""HeartCodec as one trainable module: waveform autoencoder, code encoder and
the flow-matching decoder.

  audio --ScalarEncoder--> tanh --round to 1/levels--> 25 Hz latent x1
        (per audio channel; channels stacked on the latent's channels)
  x1 --ScalarDecoder--> audio                                  (autoencoder)
  stop_gradient(x1) --CodeEncoder (stride frames_per_code)--> 12.5 Hz
        --ResidualVQ--> codes [B, F, K]
  codes --CodeEmbedding--> features --FlowEstimator (flow matching)--> x1

The decode side is a `HeartCodecDecoder` (`self.decoder`), so a trained model
decodes with its `detokenize` (windows, in-context prefix, cross-fade) and its
weights have the released model's layout. The residual VQ is the codec's
(musicjax/codec/rvq.py, Euclidean, learned codebooks) with its codebook
variable replaced by CodeEmbedding's: one parameter, so codes found here are
the codes CodeEmbedding looks up.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicjax.codec.heartcodec import config as hc_config
from musicjax.codec.heartcodec.decoder import HeartCodecDecoder
from musicjax.codec.heartcodec.scalar_decoder import (PReLU, ResidualUnit,
                                                      round_to_levels)
from musicjax.codec.rvq import ResidualVQ
from musicjax.nn.conv import WNConv1d
from musicjax.parallel import rules

ConfigDict = ml_collections.ConfigDict


def decoder_config(m: ConfigDict) -> ConfigDict:
  """The HeartCodecDecoder keys of a training config's `model` section."""
  return ConfigDict({k: m[k].to_dict() if isinstance(m[k], ConfigDict) else m[k]
                     for k in hc_config.default_config().keys()})


class DownBlock(nnx.Module):
  """Residual units, then a causal strided conv (kernel 2 x stride) that
  doubles the channels: the mirror of the decoder's UpBlock."""

  def __init__(self, channels: int, stride: int, e: ConfigDict, std: float,
               prelu: float, *, rngs: nnx.Rngs):
    self.units = nnx.List([
        ResidualUnit(channels, int(d), int(e.res_kernel_size), std, prelu,
                     rngs=rngs) for d in e.res_dilations])
    self.down = WNConv1d(channels, 2 * channels, 2 * stride, stride=stride,
                         padding='causal', norm_eps=0.0, init_std=std, rngs=rngs)
    self.act = PReLU(prelu)

  def __call__(self, x: jax.Array) -> jax.Array:
    for unit in self.units:
      x = unit(x)
    return self.act(self.down(x))


class ScalarEncoder(nnx.Module):
  """waveform [N, S, 1] -> latent [N, S / samples_per_frame, latent_dim] in
  (-1, 1), not yet rounded.

  Mirrors ScalarDecoder: a causal input conv, a strided conv undoing the
  decoder's sample repeat (num_samples), one DownBlock per upsampling factor
  in reverse order, and a centred output conv.
  """

  def __init__(self, s: ConfigDict, e: ConfigDict, *, rngs: nnx.Rngs):
    std, prelu, k = float(e.init_std), float(s.prelu_init), int(e.kernel_size)
    ch = int(e.init_channel)
    ns = int(s.num_samples)
    self.stem = WNConv1d(int(s.num_bands), ch, k, padding='causal', norm_eps=0.0,
                         init_std=std, rngs=rngs)
    self.stem_act = PReLU(prelu)
    self.unrepeat = WNConv1d(ch, ch, 2 * ns, stride=ns, padding='causal',
                             norm_eps=0.0, init_std=std, rngs=rngs)
    self.unrepeat_act = PReLU(prelu)
    blocks = []
    for r in reversed(tuple(s.upsample_factors)):
      blocks.append(DownBlock(ch, int(r), e, std, prelu, rngs=rngs))
      ch *= 2
    self.blocks = nnx.List(blocks)
    self.out = WNConv1d(ch, int(s.latent_dim), int(e.out_kernel_size),
                        norm_eps=0.0, init_std=std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.unrepeat_act(self.unrepeat(self.stem_act(self.stem(x))))
    for block in self.blocks:
      x = block(x)
    return jnp.tanh(self.out(x))


class CodeEncoder(nnx.Module):
  """25 Hz latent [B, T, C] -> 12.5 Hz vectors [B, T / frames_per_code,
  codebook_dim] for the residual VQ: a strided conv, PReLU, a linear map."""

  def __init__(self, channels: int, frames_per_code: int, q: ConfigDict,
               codebook_dim: int, prelu: float, *, rngs: nnx.Rngs):
    std, h = float(q.init_std), int(q.hidden_dim)
    self.down = WNConv1d(channels, h, int(q.kernel_multiple) * frames_per_code,
                         stride=frames_per_code, norm_eps=0.0, init_std=std,
                         rngs=rngs)
    self.act = PReLU(prelu)
    self.project = WNConv1d(h, codebook_dim, 1, norm_eps=0.0, init_std=std,
                            rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    return self.project(self.act(self.down(z)))


def rvq_config(m: ConfigDict) -> ConfigDict:
  """The codec RVQ's settings for HeartCodec's codes: Euclidean lookup in
  codebook_dim, learned codebooks (they are CodeEmbedding's parameters)."""
  q, v = m.codes, m.quantizer
  return ConfigDict(dict(
      num_codebooks=int(q.num_quantizers), codebook_size=int(q.codebook_size),
      codebook_dim=int(q.codebook_dim), factorized=False,
      codebook_type='learned', ema_decay=float(v.ema_decay), ema_eps=1e-5,
      kmeans_init=bool(v.kmeans_init), kmeans_iters=int(v.kmeans_iters),
      dead_code_threshold=float(v.dead_code_threshold),
      quantizer_dropout=float(v.quantizer_dropout), norm_eps=1e-12))


class TrainableHeartCodec(nnx.Module):
  """Encoder, code encoder, residual VQ and a HeartCodecDecoder (`decoder`)."""

  def __init__(self, m: ConfigDict, *, rngs: nnx.Rngs):
    self.decoder = HeartCodecDecoder(decoder_config(m), rngs=rngs)
    s, f, q = m.scalar, m.flow, m.codes
    self.channels = int(s.channels)
    self.frames_per_code = int(f.frames_per_code)
    self.samples_per_code = hc_config.samples_per_code(m)
    self.levels = float(s.levels)
    self.encoder = ScalarEncoder(s, m.encoder, rngs=rngs)
    self.code_encoder = CodeEncoder(
        int(m.estimator.out_channels), self.frames_per_code, m.quantizer,
        int(q.codebook_dim), float(s.prelu_init), rngs=rngs)
    self.quantizer = ResidualVQ(int(q.codebook_dim), rvq_config(m), rngs=rngs)
    # One variable, two users: the VQ finds and learns the codes that the
    # decoder's CodeEmbedding looks up.
    self.quantizer.codebook = self.decoder.codes.codebooks

  # ---- pieces -------------------------------------------------------------
  def latent(self, audio: jax.Array) -> jax.Array:
    """audio [B, S, channels] -> rounded 25 Hz latent [B, T, C], the flow's
    target; each audio channel encodes to its own slice of the C channels, as
    HeartCodecDecoder.waveform splits them."""
    b, n, ch = audio.shape
    x = rules.reshape(audio.transpose(0, 2, 1), (b * ch, n, 1))
    z = round_to_levels(self.encoder(x), self.levels)  # [B * ch, T, D]
    t, d = z.shape[1], z.shape[2]
    return rules.reshape(rules.reshape(z, (b, ch, t, d)).transpose(0, 2, 1, 3),
                         (b, t, ch * d))

  def quantize(self, latent: jax.Array, rng: jax.Array, train: bool
               ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """(code vectors [B, F, codebook_dim] straight-through, codes [B, F, K],
    the VQ's aux) of a latent; no gradient reaches the latent."""
    x = self.code_encoder(jax.lax.stop_gradient(latent))
    return self.quantizer(x, rng, train=train)

  def features(self, code_vectors: jax.Array) -> jax.Array:
    """CodeEmbedding's conditioning frames from summed code vectors (the
    value CodeEmbedding computes from the codes; trainable through them)."""
    ce = self.decoder.codes
    z = ce.features(ce.project(code_vectors))
    return jnp.repeat(z, ce.frames_per_code, axis=1)

  # ---- inference ------------------------------------------------------------
  def encode(self, audio) -> np.ndarray:
    """Codes int32 [B, F, K] of audio [B, samples, channels] (zero-padded at
    the end to whole codes)."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 3 or audio.shape[-1] != self.channels:
      raise ValueError(f'audio must be [batch, samples, {self.channels}], got '
                       f'{audio.shape}')
    pad = -audio.shape[1] % self.samples_per_code
    audio = np.pad(audio, ((0, 0), (0, pad), (0, 0)))
    gdef, state = nnx.split(self)
    return np.asarray(_encode(gdef, state, jnp.asarray(audio)))

  def detokenize(self, codes, rng: jax.Array | None = None, **kwargs):
    """Audio [B, samples, channels] of codes [B, F, K]: the decoder's windows."""
    return self.decoder.detokenize(codes, rng, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, audio):
  model = nnx.merge(graphdef, state)
  return model.quantizer.encode(model.code_encoder(model.latent(audio)))
