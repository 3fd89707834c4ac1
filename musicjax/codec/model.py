"""SEANet/DAC-style convolutional codec: Encoder -> ResidualVQ -> Decoder.

Audio is channels-last [batch, time, channels]. The hop length is the product
of `model.strides`, so any frame rate (12.5 Hz ... 86 Hz) is a config.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.parallel import rules

from musicjax.codec.rvq import ResidualVQ
from musicjax.nn.conv import Elu, Snake, WNConv1d, WNConvTranspose1d
from musicjax.nn.conv import NORM_AXES, PAD_MODES
from musicjax.nn.dc_block import dc_block
from musicjax.nn.lstm import LSTM

# Where 'same' padding puts the extra sample of an odd padding total: 'right'
# (ours), or 'left' as torch's symmetric padding=ceil(stride/2) does in DAC's
# strided convs. Only odd strides (e.g. DAC 16/24 kHz's 5) give odd totals.
# 'seanet' is EnCodec's rule (SeanetConv1d), 'same' or 'causal'.
PAD_EXTRA = ('right', 'left', 'seanet')
ACTIVATIONS = ('snake', 'elu')   # DAC's learned Snake | SEANet's ELU


class LeftExtraConv1d(WNConv1d):
  """WNConv1d whose 'same' padding puts an odd total's extra sample on the
  left (the same parameters: only the output's alignment moves)."""

  def _pads(self, length: int) -> tuple[int, int]:
    left, right = super()._pads(length)
    return (right, left) if self.padding == 'same' else (left, right)


class LeftExtraConvTranspose1d(WNConvTranspose1d):
  """WNConvTranspose1d keeping the window of its full output that starts
  ceil((m - 1) * stride / 2) samples in ('same' starts at the floor): torch's
  ConvTranspose1d(padding=ceil(stride/2), output_padding=stride % 2) for
  m = 2, as DAC's decoder blocks."""

  def __init__(self, *args, padding: str = 'same', **kwargs):
    # Run causally (the full output's first t * stride samples) on m - 1
    # zero frames more, which keeps the whole full output to cut from.
    super().__init__(*args, padding='causal', **kwargs)
    if padding != 'same':
      raise ValueError(f"pad_extra 'left' needs 'same' padding, got {padding!r}")

  def __call__(self, x: jax.Array) -> jax.Array:
    t, m, s = x.shape[1], self.kernel_multiple, self.stride
    y = super().__call__(jnp.pad(x, ((0, 0), (0, m - 1), (0, 0))))
    extra = (m - 1) * s
    start = extra - extra // 2
    return y[:, start:start + t * s]


class SeanetConv1d(WNConv1d):
  """WNConv1d padded as EnCodec's convs: the kernel's k - stride samples
  split with the odd one on the left ('same') or all on the left ('causal'),
  plus, on the right, the samples that complete the last frame (so T in
  gives ceil(T / stride) frames, as ours)."""

  def _pads(self, length: int) -> tuple[int, int]:
    total = (self.kernel_size - 1) * self.dilation + 1 - self.stride
    extra = -(-length // self.stride) * self.stride - length
    if self.padding == 'causal':
      return total, extra
    return total - total // 2, total // 2 + extra


def _conv(cfg: ml_collections.ConfigDict, *args, **kwargs) -> WNConv1d:
  cls = {'left': LeftExtraConv1d, 'seanet': SeanetConv1d}.get(cfg.pad_extra,
                                                              WNConv1d)
  return cls(*args, pad_mode=cfg.pad_mode, **kwargs)


def _conv_transpose(cfg: ml_collections.ConfigDict, *args, padding: str,
                    **kwargs) -> WNConvTranspose1d:
  # EnCodec trims a transposed conv's k - stride extra samples as 'seanet'
  # pads: the odd one from the left ('same'), all from the right ('causal').
  left = cfg.pad_extra == 'left' or (cfg.pad_extra == 'seanet'
                                     and padding == 'same')
  cls = LeftExtraConvTranspose1d if left else WNConvTranspose1d
  return cls(*args, padding=padding, norm_axis=cfg.up_weight_norm, **kwargs)


def _act(cfg: ml_collections.ConfigDict, channels: int) -> nnx.Module:
  return Snake(channels) if cfg.activation == 'snake' else Elu()


class ResidualUnit(nnx.Module):
  """act -> dilated conv -> act -> 1x1 conv, plus the skip (through a 1x1
  conv with `conv_shortcut`, SEANet). The branch runs at channels //
  compress (SEANet's compress; 1 in DAC)."""

  def __init__(self, channels: int, dilation: int,
               cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    hidden = channels // cfg.compress
    self.act1 = _act(cfg, channels)
    self.conv1 = _conv(cfg, channels, hidden, cfg.residual_kernel,
                       dilation=dilation, padding=cfg.padding,
                       init_std=cfg.init_std, rngs=rngs)
    self.act2 = _act(cfg, hidden)
    self.conv2 = _conv(cfg, hidden, channels, 1, init_std=cfg.init_std,
                       rngs=rngs)
    self.shortcut = _conv(cfg, channels, channels, 1, padding=cfg.padding,
                          init_std=cfg.init_std, rngs=rngs
                          ) if cfg.conv_shortcut else None

  def __call__(self, x: jax.Array) -> jax.Array:
    skip = x if self.shortcut is None else self.shortcut(x)
    return skip + self.conv2(self.act2(self.conv1(self.act1(x))))


class LSTMSkip(nnx.Module):
  """x + LSTM(x): SEANet's sequence model at the bottleneck."""

  def __init__(self, channels: int, layers: int, *, rngs: nnx.Rngs):
    self.lstm = LSTM(channels, layers, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.lstm(x)


def _lstm(cfg: ml_collections.ConfigDict, channels: int, rngs: nnx.Rngs
          ) -> LSTMSkip | None:
  return LSTMSkip(channels, cfg.lstm_layers, rngs=rngs
                  ) if cfg.lstm_layers > 0 else None


class EncoderBlock(nnx.Module):
  """Residual units at `channels`, then a strided conv to `out_channels`."""

  def __init__(self, channels: int, out_channels: int, stride: int,
               cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.units = nnx.List([
        ResidualUnit(channels, d, cfg, rngs=rngs)
        for d in cfg.dilations])
    self.act = _act(cfg, channels)
    self.down = _conv(cfg, channels, out_channels,
                      cfg.down_kernel_multiple * stride, stride=stride,
                      padding=cfg.padding, init_std=cfg.init_std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for unit in self.units:
      x = unit(x)
    return self.down(self.act(x))


class DecoderBlock(nnx.Module):
  """Transposed conv upsampling to `out_channels`, then residual units."""

  def __init__(self, channels: int, out_channels: int, stride: int,
               cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.act = _act(cfg, channels)
    self.up = _conv_transpose(cfg, channels, out_channels, stride,
                              kernel_multiple=cfg.up_kernel_multiple,
                              padding=cfg.padding, init_std=cfg.init_std,
                              rngs=rngs)
    self.units = nnx.List([
        ResidualUnit(out_channels, d, cfg, rngs=rngs)
        for d in cfg.dilations])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.up(self.act(x))
    for unit in self.units:
      x = unit(x)
    return x


class Encoder(nnx.Module):

  def __init__(self, audio_channels: int, cfg: ml_collections.ConfigDict, *,
               rngs: nnx.Rngs):
    ch = cfg.encoder_dim
    self.stem = _conv(cfg, audio_channels, ch, cfg.stem_kernel,
                      padding=cfg.padding, rngs=rngs)
    blocks = []
    for s in cfg.strides:
      blocks.append(EncoderBlock(ch, 2 * ch, s, cfg, rngs=rngs))
      ch *= 2
    self.blocks = nnx.List(blocks)
    self.lstm = _lstm(cfg, ch, rngs)
    self.act = _act(cfg, ch)
    self.proj = _conv(cfg, ch, cfg.latent_dim, cfg.latent_kernel,
                      padding=cfg.padding, init_std=cfg.init_std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    if self.lstm is not None:
      x = self.lstm(x)
    return self.proj(self.act(x))


class Decoder(nnx.Module):
  """Latents [B, F, latent_dim] -> audio [B, F * hop, C].

  With `cfg.output_highpass_hz` > 0 the last conv's output goes through a
  fixed DC blocker (musicjax/nn/dc_block.py) before the optional tanh, so no
  bias or drift inside the decoder can put a DC offset on the audio.
  """

  def __init__(self, audio_channels: int, cfg: ml_collections.ConfigDict,
               sample_rate: int, *, rngs: nnx.Rngs):
    ch = cfg.decoder_dim
    self.stem = _conv(cfg, cfg.latent_dim, ch, cfg.stem_kernel,
                      padding=cfg.padding, rngs=rngs)
    self.lstm = _lstm(cfg, ch, rngs)
    blocks = []
    for s in reversed(tuple(cfg.strides)):
      blocks.append(DecoderBlock(ch, ch // 2, s, cfg, rngs=rngs))
      ch //= 2
    self.blocks = nnx.List(blocks)
    self.act = _act(cfg, ch)
    self.out = _conv(cfg, ch, audio_channels, cfg.stem_kernel,
                     padding=cfg.padding, rngs=rngs)
    self.output_tanh = bool(cfg.output_tanh)
    self.highpass_hz = float(cfg.output_highpass_hz)
    self.highpass_tolerance = float(cfg.output_highpass_tolerance)
    self.sample_rate = int(sample_rate)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.stem(z)
    if self.lstm is not None:
      x = self.lstm(x)
    for block in self.blocks:
      x = block(x)
    x = self.out(self.act(x))
    if self.highpass_hz > 0:
      x = dc_block(x, self.highpass_hz, self.sample_rate, self.highpass_tolerance)
    return jnp.tanh(x) if self.output_tanh else x


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
  """Clear errors for model settings the layers cannot build."""
  if not cfg.strides or any(int(s) < 1 for s in cfg.strides):
    raise ValueError(f'config.model.strides must be positive ints, got {cfg.strides}')
  if cfg.padding not in ('same', 'causal'):
    raise ValueError(f"config.model.padding must be 'same' or 'causal', got {cfg.padding!r}")
  if cfg.pad_extra not in PAD_EXTRA:
    raise ValueError(f'config.model.pad_extra must be one of {PAD_EXTRA}, got '
                     f'{cfg.pad_extra!r}')
  if cfg.pad_extra == 'left' and cfg.padding != 'same':
    raise ValueError("config.model.pad_extra 'left' places 'same' padding; "
                     f'config.model.padding is {cfg.padding!r}')
  for key, allowed in (('activation', ACTIVATIONS), ('pad_mode', PAD_MODES),
                       ('up_weight_norm', tuple(NORM_AXES))):
    if cfg[key] not in allowed:
      raise ValueError(f'config.model.{key} must be one of {allowed}, got '
                       f'{cfg[key]!r}')
  if cfg.lstm_layers < 0:
    raise ValueError(f'config.model.lstm_layers must be >= 0, got '
                     f'{cfg.lstm_layers}')
  if cfg.compress < 1 or any(
      (cfg.encoder_dim << i) % cfg.compress for i in range(len(cfg.strides))) or any(
          (cfg.decoder_dim >> (i + 1)) % cfg.compress
          for i in range(len(cfg.strides))):
    raise ValueError(f'config.model.compress ({cfg.compress}) must divide the '
                     'channels of every residual unit')
  if cfg.decoder_dim % (2 ** len(cfg.strides)):
    raise ValueError(f'config.model.decoder_dim ({cfg.decoder_dim}) must be divisible '
                     f'by 2**len(strides) = {2 ** len(cfg.strides)} (it halves per block)')
  for key in ('encoder_dim', 'latent_dim', 'residual_kernel', 'stem_kernel',
              'latent_kernel', 'down_kernel_multiple', 'up_kernel_multiple'):
    if cfg[key] < 1:
      raise ValueError(f'config.model.{key} must be >= 1, got {cfg[key]}')
  if cfg.output_highpass_hz < 0:
    raise ValueError('config.model.output_highpass_hz must be >= 0 (0 = off), '
                     f'got {cfg.output_highpass_hz}')
  if cfg.output_highpass_hz > 0 and not 0 < cfg.output_highpass_tolerance < 1:
    raise ValueError('config.model.output_highpass_tolerance must be in (0, 1), '
                     f'got {cfg.output_highpass_tolerance}')


class CodecModel(nnx.Module):
  """The generator: audio [B,T,C] -> codes [B,F,K] -> audio [B,T,C]."""

  def __init__(self, cfg: ml_collections.ConfigDict, sample_rate: int,
               audio_channels: int, *, rngs: nnx.Rngs):
    validate_model_config(cfg)
    if cfg.output_highpass_hz >= sample_rate / 2:
      raise ValueError(f'config.model.output_highpass_hz ({cfg.output_highpass_hz}) '
                       f'must be below Nyquist ({sample_rate / 2:g} Hz)')
    self.encoder = Encoder(audio_channels, cfg, rngs=rngs)
    self.quantizer = ResidualVQ(cfg.latent_dim, cfg.rvq, rngs=rngs)
    self.decoder = Decoder(audio_channels, cfg, sample_rate, rngs=rngs)
    self._hop = int(math.prod(cfg.strides))
    self.pad_frames_in_convs = cfg.pad_extra == 'seanet'
    self.sample_rate = int(sample_rate)
    self.audio_channels = int(audio_channels)
    self.normalize = bool(cfg.normalize)
    # Normalised input sits at this RMS (a level with headroom, so codes
    # decoded without their scale, e.g. an LM's, play at a sane loudness).
    self.normalize_rms = 10.0 ** (float(cfg.normalize_rms_dbfs) / 20.0)
    self.normalize_eps = float(cfg.normalize_eps)

  @property
  def hop_length(self) -> int:
    return self._hop

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self._hop

  @property
  def num_codebooks(self) -> int:
    return self.quantizer.num_codebooks

  @property
  def codebook_size(self) -> int:
    return self.quantizer.codebook_size

  def _pad(self, audio: jax.Array) -> jax.Array:
    if audio.ndim != 3 or audio.shape[-1] != self.audio_channels:
      raise ValueError(f'audio must be [batch, time, {self.audio_channels}], '
                       f'got {audio.shape}')
    if self.pad_frames_in_convs:
      return audio   # each conv completes its last frame (SeanetConv1d)
    extra = (-audio.shape[1]) % self._hop
    return jnp.pad(audio, ((0, 0), (0, extra), (0, 0))) if extra else audio

  def input_scale(self, audio: jax.Array) -> jax.Array:
    """[B, 1, 1]: what `normalize` divides each input by (EnCodec's
    normalisation): its RMS over time and channels over normalize_rms, plus
    eps so silence stays finite. Ones when normalize is off."""
    if not self.normalize:
      return jnp.ones((audio.shape[0], 1, 1), audio.dtype)
    rms = jnp.sqrt(jnp.mean(jnp.square(audio.astype(jnp.float32)), axis=(1, 2),
                            keepdims=True))
    return (rms / self.normalize_rms + self.normalize_eps).astype(audio.dtype)

  def encode(self, audio: jax.Array, n_q: int | None = None) -> jax.Array:
    """int32 codes [B, ceil(T/hop), n_q]; audio is zero-padded to a hop
    multiple (and, with normalize, divided by `input_scale`: keep that scale
    to decode at the input's level)."""
    audio = audio / self.input_scale(audio) if self.normalize else audio
    return self.quantizer.encode(self.encoder(self._pad(audio)), n_q)

  def decode(self, codes: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """Audio [B, F*hop, C] from codes [B, F, n_q] (n_q <= K), times `scale`
    ([B, 1, 1] or [B, F*hop, 1]; from `input_scale`) when given."""
    audio = self.decoder(self.quantizer.decode(codes))
    return audio if scale is None else audio * scale

  def __call__(self, audio: jax.Array, rng: jax.Array, train: bool
               ) -> tuple[jax.Array, dict[str, Any]]:
    """(reconstruction [B,T,C], aux) with aux = quantizer aux plus 'codes'."""
    t = audio.shape[1]
    scale = self.input_scale(audio) if self.normalize else None
    z = self.encoder(self._pad(audio / scale if self.normalize else audio))
    z_q, codes, aux = self.quantizer(z, rng, train)
    # Keep the batch split over data-parallel devices through the quantizer's
    # global statistics (a layout hint on Auto meshes, a type on Explicit ones).
    z_q = rules.shard_activation(z_q, ('batch', 'time', None))
    recon = self.decoder(z_q)[:, :t]
    recon = recon * scale if self.normalize else recon
    recon = rules.shard_activation(recon, ('batch', 'time', None))
    aux['codes'] = codes
    return recon, aux
