"""HeartCodec's scalar-quantized waveform decoder (the SQ codec's decode side).

latent [N, T, latent_dim] -> rounded to multiples of 1 / levels -> centred
conv -> per block: causal transposed conv (x factor), 5 causal residual units
(PReLU) -> each sample repeated num_samples times, causal conv, PReLU ->
causal conv to the waveform [N, T * prod(factors) * num_samples, 1].

Channels-last throughout. The convs are weight-normalised except the one
after the repeat; the transposed convs normalise per input channel (torch's
weight_norm default on ConvTranspose1d), the plain convs per output channel
(musicjax/nn/conv.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.nn.conv import WNConv1d
from musicjax.parallel import rules


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def round_to_levels(z: jax.Array, levels: float) -> jax.Array:
  """z rounded to multiples of 1 / levels; its gradient passes straight
  through (identity), so the waveform encoder trains through the rounding.
  The value is exactly round(z * levels) / levels."""
  return jnp.round(z * levels) / levels


@round_to_levels.defjvp
def _round_to_levels_jvp(levels, primals, tangents):
  (z,), (dz,) = primals, tangents
  return round_to_levels(z, levels), dz


class PReLU(nnx.Module):
  """max(x, 0) + a * min(x, 0) with one learned slope a."""

  def __init__(self, init: float):
    self.slope = nnx.Param(jnp.full((1,), init, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, x, self.slope[...].astype(x.dtype) * x)


class CausalConvTranspose1d(nnx.Module):
  """Transposed conv, kernel 2 * stride, T frames -> T * stride (the last
  stride samples of the full output dropped), weight-normalised per input
  channel. Run polyphase: a 2-tap conv emitting `stride` samples per frame.

  v is [tap, in, stride, out]: tap j of output phase r is torch's kernel
  position (1 - j) * stride + r.
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int,
               std: float, *, rngs: nnx.Rngs):
    v = std * jax.random.normal(rngs.params(),
                                (2, in_channels, stride, out_channels))
    self.v = nnx.Param(v, out_sharding=(None, 'conv_in', None, 'conv_out'))
    self.g = nnx.Param(jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 2, 3))),
                       out_sharding=('conv_in',))
    self.bias = nnx.Param(jnp.zeros((out_channels,)), out_sharding=('conv_out',))
    self.stride, self.out_channels = stride, out_channels

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    s = self.stride
    v = self.v[...]
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 2, 3), keepdims=True))
    kernel = (v * (self.g[...][None, :, None, None] / norm)).astype(x.dtype)
    kernel = kernel.reshape(2, v.shape[1], s * self.out_channels)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding=((1, 0),),
        dimension_numbers=('NWC', 'WIO', 'NWC'))
    y = rules.reshape(y, (b, t * s, self.out_channels))
    return y + self.bias[...].astype(x.dtype)


class ResidualUnit(nnx.Module):
  """x + PReLU(1x1 conv(PReLU(dilated causal conv(x))))."""

  def __init__(self, channels: int, dilation: int, kernel: int, std: float,
               prelu: float, *, rngs: nnx.Rngs):
    self.conv1 = WNConv1d(channels, channels, kernel, dilation=dilation,
                          padding='causal', norm_eps=0.0, init_std=std, rngs=rngs)
    self.act1 = PReLU(prelu)
    self.conv2 = WNConv1d(channels, channels, 1, norm_eps=0.0, init_std=std,
                          rngs=rngs)
    self.act2 = PReLU(prelu)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.act2(self.conv2(self.act1(self.conv1(x))))


class UpBlock(nnx.Module):

  def __init__(self, channels: int, out_channels: int, stride: int,
               s: ml_collections.ConfigDict, std: float, *, rngs: nnx.Rngs):
    self.up = CausalConvTranspose1d(channels, out_channels, stride, std,
                                    rngs=rngs)
    self.units = nnx.List([
        ResidualUnit(out_channels, int(d), int(s.res_kernel_size), std,
                     float(s.prelu_init), rngs=rngs)
        for d in s.res_dilations])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.up(x)
    for unit in self.units:
      x = unit(x)
    return x


class ScalarDecoder(nnx.Module):
  """latent [N, T, latent_dim] -> waveform [N, T * upsampling, num_bands]."""

  def __init__(self, s: ml_collections.ConfigDict, std: float, *,
               rngs: nnx.Rngs):
    n_up = len(s.upsample_factors)
    ch = int(s.init_channel) * 2 ** n_up
    self.levels = float(s.levels)
    self.num_samples = int(s.num_samples)
    self.delay = WNConv1d(int(s.latent_dim), ch, int(s.delay_kernel_size),
                          norm_eps=0.0, init_std=std, rngs=rngs)
    blocks = []
    for r in s.upsample_factors:
      blocks.append(UpBlock(ch, ch // 2, int(r), s, std, rngs=rngs))
      ch //= 2
    self.blocks = nnx.List(blocks)
    k = int(s.kernel_size)
    self.repeat_w = nnx.Param(std * jax.random.normal(rngs.params(), (k, ch, ch)),
                              out_sharding=(None, 'conv_in', 'conv_out'))
    self.repeat_b = nnx.Param(jnp.zeros((ch,)), out_sharding=('conv_out',))
    self.repeat_act = PReLU(float(s.prelu_init))
    self.out = WNConv1d(ch, int(s.num_bands), k, padding='causal', norm_eps=0.0,
                        init_std=std, rngs=rngs)

  def quantize(self, z: jax.Array) -> jax.Array:
    return round_to_levels(z, self.levels)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.delay(self.quantize(z))
    for block in self.blocks:
      x = block(x)
    x = jnp.repeat(x, self.num_samples, axis=1)
    k = self.repeat_w.shape[0]
    x = jax.lax.conv_general_dilated(
        x, self.repeat_w[...].astype(x.dtype), window_strides=(1,),
        padding=((k - 1, 0),), dimension_numbers=('NWC', 'WIO', 'NWC'))
    x = self.repeat_act(x + self.repeat_b[...].astype(x.dtype))
    return self.out(x)
