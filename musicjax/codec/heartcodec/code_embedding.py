"""Codes -> the estimator's conditioning frames.

HeartCodec's residual VQ decodes by summing the K codebook vectors in the
small codebook space and projecting the sum once (one shared projection, plain
linear). musicjax/codec/rvq.py projects each codebook's vector with its own
weight-normalised projection before summing, a different map, hence this
module. A linear layer follows, and each 12.5 Hz frame is repeated to the
25 Hz latent rate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.codec.heartcodec.timestep import Linear


class CodeEmbedding(nnx.Module):
  """codes int [B, F, K] -> features [B, F * frames_per_code, dim]."""

  def __init__(self, q: ml_collections.ConfigDict, frames_per_code: int,
               std: float, *, rngs: nnx.Rngs):
    k, n, cd, d = (int(q.num_quantizers), int(q.codebook_size),
                   int(q.codebook_dim), int(q.dim))
    self.codebooks = nnx.Param(
        float(q.init_std) * jax.random.normal(rngs.params(), (k, n, cd)),
        out_sharding=(None, 'codebook', None))
    self.project = Linear(cd, d, std, rngs=rngs)
    self.features = Linear(d, d, std, rngs=rngs)
    self.frames_per_code = frames_per_code

  def __call__(self, codes: jax.Array) -> jax.Array:
    k = self.codebooks.shape[0]
    if codes.ndim != 3 or codes.shape[-1] != k:
      raise ValueError(f'codes must be [batch, frames, {k}], got {codes.shape}')
    vectors = jax.vmap(lambda cb, c: cb[c], in_axes=(0, -1))(
        self.codebooks[...], codes)                     # [K, B, F, cd]
    z = self.features(self.project(jnp.sum(vectors, axis=0)))
    return jnp.repeat(z, self.frames_per_code, axis=1)
