"""A stacked LSTM over [batch, time, dim], channels-last (SEANet / EnCodec's
encoder and decoder end in one: `model.lstm_layers`).

The gates follow torch.nn.LSTM (input, forget, cell, output; two biases),
so released weights map one to one: w_ih / w_hh are torch's weight_ih_lK /
weight_hh_lK transposed, stacked over layers. The state starts at zero for
each call (no streaming state is kept).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LSTM(nnx.Module):
  """`layers` LSTMs of `dim` hidden units, each fed the previous one's output
  (the first the input, also of `dim` channels)."""

  def __init__(self, dim: int, layers: int, *, rngs: nnx.Rngs):
    if dim < 1 or layers < 1:
      raise ValueError(f'LSTM needs dim and layers >= 1, got {dim}, {layers}')
    # torch's init: uniform in +-1/sqrt(hidden) for every weight and bias.
    bound = dim ** -0.5

    def draw(shape):
      return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound,
                                bound)

    self.w_ih = nnx.Param(draw((layers, dim, 4 * dim)),
                          out_sharding=(None, None, None))
    self.w_hh = nnx.Param(draw((layers, dim, 4 * dim)),
                          out_sharding=(None, None, None))
    self.b_ih = nnx.Param(draw((layers, 4 * dim)), out_sharding=(None, None))
    self.b_hh = nnx.Param(draw((layers, 4 * dim)), out_sharding=(None, None))
    self.layers, self.dim = layers, dim

  def _layer(self, x: jax.Array, layer: int) -> jax.Array:
    w_hh = self.w_hh[...][layer].astype(x.dtype)
    # The input's share of the gates for all steps at once; only h @ w_hh is
    # sequential.
    gx = (x @ self.w_ih[...][layer].astype(x.dtype)
          + (self.b_ih[...][layer] + self.b_hh[...][layer]).astype(x.dtype))

    def step(carry, g_t):
      h, c = carry
      i, f, g, o = jnp.split(g_t + h @ w_hh, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    # Laid out like the input's batch (an Explicit mesh types the carry).
    zeros = jnp.zeros_like(x[:, 0, :self.dim])
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.moveaxis(gx, 1, 0))
    return jnp.moveaxis(hs, 0, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in range(self.layers):
      x = self._layer(x, layer)
    return x
