"""HeartCodec's flow-matching velocity estimator: two modulated stacks.

  x [B, T, in] --conv proj--> stack 1 (D wide) --norm, modulate-->
  concat(x, .) --conv proj--> stack 2 (2D wide, heads twice as wide)
  --norm, modulate--> conv proj --> velocity [B, T, out]

Each stack has its own timestep conditioning (timestep.py). The input holds
the noisy latent, the in-context latent and the code features, stacked on
channels (flow_matching.py builds it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.codec.heartcodec.ada_block import AdaStack, stack_config
from musicjax.codec.heartcodec.timestep import Linear, TimestepConditioner


class ConvProjection(nnx.Module):
  """Centred conv over time (scaled by kernel^-1/2), then a linear layer."""

  def __init__(self, fan_in: int, fan_out: int, kernel: int, std: float, *,
               rngs: nnx.Rngs):
    self.kernel = kernel
    self.conv_w = nnx.Param(
        std * jax.random.normal(rngs.params(), (kernel, fan_in, fan_out)),
        out_sharding=(None, 'embed', None))
    self.conv_b = nnx.Param(jnp.zeros((fan_out,)), out_sharding=(None,))
    self.linear = Linear(fan_out, fan_out, std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pad = self.kernel // 2
    y = jax.lax.conv_general_dilated(
        x, self.conv_w[...].astype(x.dtype), window_strides=(1,),
        padding=((pad, pad),), dimension_numbers=('NWC', 'WIO', 'NWC'))
    y = (y + self.conv_b[...].astype(x.dtype)) * self.kernel ** -0.5
    return self.linear(y)


def modulated_norm(x: jax.Array, table: jax.Array, emb: jax.Array,
                   eps: float) -> jax.Array:
  """LayerNorm (no affine) shifted by table[0] + emb, scaled by 1 + table[1] + emb."""
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  shift = (table[0] + emb)[:, None]
  scale = (table[1] + emb)[:, None]
  return y * (1 + scale) + shift


class FlowEstimator(nnx.Module):
  """Velocity [B, T, out_channels] of x [B, T, in_channels] at times t [B]."""

  def __init__(self, e: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d = int(e.num_heads) * int(e.head_dim)
    k, std, eps = int(e.proj_kernel), float(e.init_std), float(e.norm_eps)
    self.eps = eps
    time = dict(feature_dim=int(e.timestep_dim),
                max_period=float(e.timestep_max_period),
                scale=float(e.timestep_scale), std=std)
    self.proj_in = ConvProjection(int(e.in_channels), d, k, std, rngs=rngs)
    self.time_1 = TimestepConditioner(d, **time, rngs=rngs)
    self.stack_1 = AdaStack(stack_config(int(e.num_layers), int(e.num_heads),
                                         int(e.head_dim), int(e.mlp_dim), e),
                            rngs)
    self.table_1 = nnx.Param(d ** -0.5 * jax.random.normal(rngs.params(), (2, d)))
    self.connect = ConvProjection(int(e.in_channels) + d, 2 * d, k, std, rngs=rngs)
    self.time_2 = TimestepConditioner(2 * d, **time, rngs=rngs)
    self.stack_2 = AdaStack(stack_config(int(e.num_layers_2), int(e.num_heads),
                                         2 * int(e.head_dim), int(e.mlp_dim_2), e),
                            rngs)
    self.table_2 = nnx.Param(
        (2 * d) ** -0.5 * jax.random.normal(rngs.params(), (2, 2 * d)))
    self.proj_out = ConvProjection(2 * d, int(e.out_channels), k, std, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    mod_1, emb_1 = self.time_1(t)
    s = self.stack_1(self.proj_in(x), mod_1)
    s = modulated_norm(s, self.table_1[...], emb_1, self.eps)
    h = self.connect(jnp.concatenate([x, s], axis=-1))
    mod_2, emb_2 = self.time_2(t)
    h = self.stack_2(h, mod_2)
    h = modulated_norm(h, self.table_2[...], emb_2, self.eps)
    return self.proj_out(h)
