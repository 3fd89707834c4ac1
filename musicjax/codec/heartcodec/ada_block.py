"""Transformer blocks modulated by the flow time (adaptive norm, single).

A block is the shared Llama block (RMSNorm, rotary attention, SwiGLU from
musicjax/nn/transformer.py) with each norm's output scaled and shifted and
each branch gated by the timestep modulation plus a learned per-block table:

  h = x + gate_a * attn(norm(x) * (1 + scale_a) + shift_a)
  y = h + gate_m * mlp(norm(h) * (1 + scale_m) + shift_m)

Attention is bidirectional over the window. Layers are stacked with
`nnx.vmap` and run with `lax.scan`, as the shared stack.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.nn import transformer as T


@dataclasses.dataclass(frozen=True)
class InverseRotary(T.Rotary):
  """Rotary phases with frequencies 1 / theta^(2i / d), rounded as heartlib
  rounds them (theta^(-i / half) differs in the last bit, which positions in
  the hundreds turn into 1e-5 phase errors)."""

  def frequencies(self, half: int) -> jax.Array:
    expo = jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)
    return 1.0 / (self.theta ** expo)


def stack_config(num_layers: int, num_heads: int, head_dim: int, mlp_dim: int,
                 e: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The shared transformer config of one estimator stack."""
  c = T.default_config()
  c.num_layers = num_layers
  c.dim = num_heads * head_dim
  c.num_heads = num_heads
  c.num_kv_heads = num_heads
  c.head_dim = head_dim
  c.mlp_dim = mlp_dim
  c.rope_theta = float(e.rope_theta)
  c.norm_eps = float(e.norm_eps)
  c.init_std = float(e.init_std)
  c.dtype = e.dtype
  c.attention_chunk = int(e.attention_chunk)
  return c


class AdaBlock(nnx.Module):

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    d = int(c.dim)
    self.attn_norm = T.RMSNorm(d, float(c.norm_eps))
    self.attn = T.Attention(c, rngs)
    self.attn.rotary = InverseRotary(float(c.rope_theta))
    self.mlp_norm = T.RMSNorm(d, float(c.norm_eps))
    self.mlp = T.MLP(c, rngs)
    self.table = nnx.Param(
        d ** -0.5 * jax.random.normal(rngs.params(), (6, d)),
        out_sharding=(None, 'embed'))

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               mod: jax.Array) -> jax.Array:
    """x [B, T, D]; mod [B, 6, D] (the stack's timestep modulation)."""
    m = (self.table[...][None] + mod)[:, :, None]       # [B, 6, 1, D]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, i] for i in range(6))
    h = self.attn_norm(x) * (1 + scale_a) + shift_a
    a, _ = self.attn(h, positions, mask)
    x = x + gate_a * a.astype(x.dtype)
    h = self.mlp_norm(x) * (1 + scale_m) + shift_m
    return x + gate_m * self.mlp(h).astype(x.dtype)


class AdaStack(nnx.Module):
  """`num_layers` AdaBlocks (scanned); no final norm (the estimator's)."""

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.num_layers = int(c.num_layers)

    @nnx.split_rngs(splits=self.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make(r):
      return AdaBlock(c, r)

    self.layers = make(rngs)

  def __call__(self, x: jax.Array, mod: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.ones((b, 1, t), bool)
    gdef, params = nnx.split(self.layers)

    def body(h, layer_params):
      return nnx.merge(gdef, layer_params)(h, positions, mask, mod), None

    h, _ = jax.lax.scan(body, x, params)
    return h
