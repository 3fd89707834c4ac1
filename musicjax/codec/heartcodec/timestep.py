"""Timestep conditioning of the flow estimator ("ada_norm_single").

The flow time t in [0, 1] becomes sinusoidal features, an MLP embeds them
(`emb`, which also shifts and scales the stack's final norm), and one linear
layer turns silu(emb) into the six per-block modulations (shift, scale and
gate for attention and for the MLP), shared by every block of the stack.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax.parallel import rules


def timestep_features(t: jax.Array, dim: int, max_period: float,
                      scale: float) -> jax.Array:
  """[cos | sin] of t * scale at `dim // 2` geometric frequencies, [B, dim].

  The frequencies are float32 constants: exponents in float32 as heartlib
  computes them, each exponential rounded correctly (via float64; numpy's
  float32 exp is 1 ulp off for ~40% of them, and t * 1000 reaches 1000 rad,
  where one ulp of a frequency moves the phase by 6e-5).
  """
  half = dim // 2
  expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  expo = expo / np.float32(half)
  freqs = np.exp(expo.astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None] * np.float32(scale)
  out = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    out = jnp.pad(out, ((0, 0), (0, 1)))
  return out


class Linear(nnx.Module):
  """y = x @ w + b (w [in, out])."""

  def __init__(self, fan_in: int, fan_out: int, std: float, *, rngs: nnx.Rngs,
               names=(None, None)):
    self.w = nnx.Param(std * jax.random.normal(rngs.params(), (fan_in, fan_out)),
                       out_sharding=names)
    self.b = nnx.Param(jnp.zeros((fan_out,)), out_sharding=(names[1],))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.w[...].astype(x.dtype) + self.b[...].astype(x.dtype)


class TimestepConditioner(nnx.Module):
  """t [B] -> (block modulations [B, 6, D], embedding [B, D])."""

  def __init__(self, dim: int, feature_dim: int, max_period: float,
               scale: float, std: float, *, rngs: nnx.Rngs):
    self.feature_dim, self.max_period, self.scale = feature_dim, max_period, scale
    self.embed_in = Linear(feature_dim, dim, std, rngs=rngs)
    self.embed_out = Linear(dim, dim, std, rngs=rngs)
    self.modulation = Linear(dim, 6 * dim, std, rngs=rngs)

  def __call__(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    f = timestep_features(t, self.feature_dim, self.max_period, self.scale)
    emb = self.embed_out(jax.nn.silu(self.embed_in(f)))
    mod = self.modulation(jax.nn.silu(emb))
    return rules.reshape(mod, (mod.shape[0], 6, mod.shape[-1] // 6)), emb
