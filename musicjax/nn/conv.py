"""Channels-last weight-normalised convolutions and the Snake activation.

All layers take and return [batch, time, channels] (or [batch, h, w, channels]
for the 2-D conv). Weight normalisation uses the (g, v) parametrisation:
kernel = g * v / ||v||, with the norm taken over everything but the output
channel axis. Parameters carry logical axis names (config.sharding.rules).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from musicjax.parallel import rules

# Fan-in scaled truncated normal: keeps activations O(1) through deep stacks.
_kernel_init = jax.nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal')

PADDINGS = ('same', 'causal')
# What padding fills with: zeros, or the signal mirrored at its ends
# (torch's 'reflect', as EnCodec's convs).
PAD_MODES = ('zeros', 'reflect')


def _init(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  """std > 0: truncated normal with that std (DAC); 0: fan-in scaled."""
  if std > 0:
    return jax.nn.initializers.truncated_normal(std)(key, shape)
  return _kernel_init(key, shape)


def _check_padding(padding: str) -> None:
  if padding not in PADDINGS:
    raise ValueError(f'conv padding must be one of {PADDINGS}, got {padding!r}')


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a != axis % ndim)


def _weight_norm(v: jax.Array, g: jax.Array, eps: float,
                 axis: int = -1) -> jax.Array:
  """g * v / |v|, one norm (and one g) per index of v's `axis`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=_other_axes(v.ndim, axis),
                          keepdims=True) + eps)
  shape = [1] * v.ndim
  shape[axis] = -1
  return v * (g.reshape(shape) / norm)


def _weight_norm_params(module: nnx.Module, v: jax.Array,
                        v_axes: tuple[str | None, ...], use_bias: bool,
                        axis: int = -1) -> None:
  """Sets module.v, module.g (= |v| per index of v's `axis`, by default the
  output channel, so the initial weight is v) and module.bias (per output
  channel, v's last axis)."""
  module.v = nnx.Param(v, out_sharding=v_axes)
  g = jnp.sqrt(jnp.sum(jnp.square(v), axis=_other_axes(v.ndim, axis)))
  module.g = nnx.Param(g, out_sharding=(v_axes[axis],))
  module.bias = nnx.Param(jnp.zeros((v.shape[-1],)),
                          out_sharding=('conv_out',)) if use_bias else None


class Snake(nnx.Module):
  """x + sin(alpha x)^2 / alpha with a learned per-channel alpha (BigVGAN/DAC)."""

  def __init__(self, channels: int, *, eps: float = 1e-9):
    self.alpha = nnx.Param(jnp.ones((channels,), jnp.float32),
                           out_sharding=('conv_out',))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.alpha[...].astype(x.dtype)
    return x + jnp.square(jnp.sin(alpha * x)) / (alpha + self.eps)


class Elu(nnx.Module):
  """ELU (alpha 1): SEANet's / EnCodec's activation; no parameters."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.elu(x)


def reflect_pad(x: jax.Array, left: int, right: int) -> jax.Array:
  """[B, T, C] mirrored by `left` / `right` samples along time (edge not
  repeated). Inputs no longer than the padding are first zero-extended on the
  right and the extension cut off the end again, as EnCodec's _pad1d does,
  so short inputs pad as EnCodec's do instead of failing."""
  length, extra = x.shape[1], 0
  if length <= max(left, right):
    extra = max(left, right) - length + 1
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
  y = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode='reflect')
  return y[:, :y.shape[1] - extra]


class WNConv1d(nnx.Module):
  """Weight-normalised 1-D conv; 'same' (centred) or 'causal' padding, of
  zeros or reflected signal (`pad_mode`).

  With padding, the output has ceil(T / stride) frames; exactly T / stride when
  T is a multiple of the stride.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
               stride: int = 1, dilation: int = 1, padding: str = 'same',
               pad_mode: str = 'zeros', use_bias: bool = True,
               norm_eps: float = 1e-12, init_std: float = 0.0,
               rngs: nnx.Rngs):
    _check_padding(padding)
    if pad_mode not in PAD_MODES:
      raise ValueError(f'conv pad_mode must be one of {PAD_MODES}, got '
                       f'{pad_mode!r}')
    v = _init(rngs.params(), (kernel_size, in_channels, out_channels), init_std)
    _weight_norm_params(self, v, (None, 'conv_in', 'conv_out'), use_bias)
    self.kernel_size = kernel_size
    self.stride = stride
    self.dilation = dilation
    self.padding = padding
    self.pad_mode = pad_mode
    self.norm_eps = norm_eps

  def _pads(self, length: int) -> tuple[int, int]:
    eff = (self.kernel_size - 1) * self.dilation + 1
    out = -(-length // self.stride)
    total = max((out - 1) * self.stride + eff - length, 0)
    if self.padding == 'causal':
      return total, 0
    return total // 2, total - total // 2

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _weight_norm(self.v[...], self.g[...], self.norm_eps).astype(x.dtype)
    pads = self._pads(x.shape[1])
    if self.pad_mode == 'reflect':
      x, pads = reflect_pad(x, *pads), (0, 0)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.stride,),
        padding=(pads,), rhs_dilation=(self.dilation,),
        dimension_numbers=('NWC', 'WIO', 'NWC'))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


# A transposed conv's weight-norm axis by name -> the axis of its polyphase
# v [m, in, stride, out].
NORM_AXES = {'out': 3, 'in': 1}


class WNConvTranspose1d(nnx.Module):
  """Weight-normalised transposed conv, upsampling T frames to exactly T*stride.

  The kernel length is `kernel_multiple * stride`; it is run polyphase (a
  stride-1 conv of `kernel_multiple` taps emitting `stride` samples per
  frame), which is the same linear map as a zero-stuffed transposed conv but
  never multiplies the inserted zeros.

  `norm_axis` 'in' keeps one weight-norm g per input channel instead of per
  output channel: what torch's weight_norm (dim 0) does to a ConvTranspose1d
  weight [in, out, k], as in EnCodec's decoder.
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int, *,
               kernel_multiple: int = 2, padding: str = 'same',
               norm_axis: str = 'out', use_bias: bool = True,
               norm_eps: float = 1e-12, init_std: float = 0.0,
               rngs: nnx.Rngs):
    _check_padding(padding)
    if kernel_multiple < 1:
      raise ValueError(f'kernel_multiple must be >= 1, got {kernel_multiple}')
    shape = (kernel_multiple, in_channels, stride, out_channels)
    # Fan-in of a transposed conv: each output sample sees m taps of Cin.
    v = _init(rngs.params(), (kernel_multiple * in_channels, stride * out_channels),
              init_std)
    v = v.reshape(shape)
    if norm_axis not in NORM_AXES:
      raise ValueError(f'norm_axis must be one of {tuple(NORM_AXES)}, got '
                       f'{norm_axis!r}')
    self.norm_axis = NORM_AXES[norm_axis]
    _weight_norm_params(self, v, (None, 'conv_in', None, 'conv_out'), use_bias,
                        self.norm_axis)
    self.stride = stride
    self.kernel_multiple = kernel_multiple
    self.out_channels = out_channels
    self.padding = padding
    self.norm_eps = norm_eps

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    m, s = self.kernel_multiple, self.stride
    v = self.v[...]
    kernel = _weight_norm(v, self.g[...], self.norm_eps,
                          self.norm_axis).astype(x.dtype)
    kernel = kernel.reshape(m, v.shape[1], s * self.out_channels)
    # Full transposed output has (t + m - 1) * s samples; keep t * s of them.
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding=((m - 1, m - 1),),
        dimension_numbers=('NWC', 'WIO', 'NWC'))
    y = rules.reshape(y, (b, (t + m - 1) * s, self.out_channels))
    extra = (m - 1) * s
    start = extra // 2 if self.padding == 'same' else 0
    y = jax.lax.dynamic_slice_in_dim(y, start, t * s, axis=1)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class WNConv2d(nnx.Module):
  """Weight-normalised 2-D conv over [batch, h, w, channels], 'same' padding."""

  def __init__(self, in_channels: int, out_channels: int,
               kernel_size: Sequence[int], *, stride: Sequence[int] = (1, 1),
               use_bias: bool = True, norm_eps: float = 1e-12,
               init_std: float = 0.0, rngs: nnx.Rngs):
    kh, kw = kernel_size
    v = _init(rngs.params(), (kh, kw, in_channels, out_channels), init_std)
    _weight_norm_params(self, v, (None, None, 'conv_in', 'conv_out'), use_bias)
    self.stride = tuple(stride)
    self.kernel_size = (kh, kw)
    self.norm_eps = norm_eps

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _weight_norm(self.v[...], self.g[...], self.norm_eps).astype(x.dtype)
    pads = []
    for size, k, s in zip(x.shape[1:3], self.kernel_size, self.stride):
      out = -(-size // s)
      total = max((out - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=self.stride, padding=pads,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y
