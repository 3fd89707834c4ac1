"""PyTorch mirror of the musicjax RVQ codec (musicjax/codec/model.py, rvq.py,
musicjax/nn/conv.py): Encoder -> ResidualVQ -> Decoder.

The public API is channels-last like JAX (audio [B, T, C], codes [B, F, K]);
inside, activations are channels-first [B, C, T] as torch convs expect.

Tensor names and layouts match musicjax/export/mapping.py (CODEC):
  * weight-normalised convs keep `weight_v` (nn.Conv1d layout [out, in, k];
    nn.ConvTranspose1d layout [in, out, m*s] for the upsampling convs) and
    `weight_g` [out]; the norm runs over every axis but `out`, with the JAX
    eps inside the square root. torch's own weight_norm is not used: it
    normalises a ConvTranspose1d over the wrong axis for this layout;
  * per-codebook projections are `quantizer.codebooks.{i}.{in,out}_proj`
    (nn.Linear layout [out, in]) and the codebook statistics are buffers, so a
    load/save round trip is lossless.

With config "model.output_highpass_hz" > 0 the decoder ends in JAX's fixed
DC blocker (an FIR from the config, not a tensor); exports without the key
decode without it, as they did when made.

Compute runs in the parameters' dtype; weight normalisation and the codebook
search run in float32 (JAX keeps float32 parameters, so its normalised
kernels are float32 before the cast to the activation dtype).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

PADDINGS = ('same', 'causal')
CODEBOOK_TYPES = ('ema', 'learned')
# Fixed constants of the JAX layers (not in the config).
CONV_NORM_EPS = 1e-12   # WNConv1d / WNConvTranspose1d norm_eps default
SNAKE_EPS = 1e-9        # Snake eps default


# ------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=None)
def dc_blocker_taps(cutoff_hz: float, sample_rate: float,
                    tolerance: float) -> np.ndarray:
  """The output DC blocker's causal FIR (musicjax/nn/dc_block.py): the
  impulse response of (1 - z^-1) / (1 - R z^-1), R = exp(-2 pi f_c / sr),
  cut where R^k < tolerance, its tail rescaled to sum to -1 (DC gain 0).
  float64, computed exactly as in JAX."""
  if not 0.0 < cutoff_hz < sample_rate / 2:
    raise ValueError(f'high-pass cutoff must be in (0, {sample_rate / 2:g}) Hz, '
                     f'got {cutoff_hz}')
  if not 0.0 < tolerance < 1.0:
    raise ValueError(f'high-pass tolerance must be in (0, 1), got {tolerance}')
  r = math.exp(-2.0 * math.pi * cutoff_hz / sample_rate)
  n_tail = max(1, int(math.floor(math.log(tolerance) / math.log(r))))
  tail = (r - 1.0) * r ** np.arange(n_tail, dtype=np.float64)
  tail = tail / math.fsum(-tail)
  taps = np.concatenate([[-math.fsum(tail)], tail])
  taps.setflags(write=False)
  return taps


@functools.lru_cache(maxsize=None)
def _taps_spectrum(cutoff_hz: float, sample_rate: float, tolerance: float,
                   n: int) -> np.ndarray:
  """rfft of the taps at length n: in float64, then complex64, as in JAX."""
  spec = np.fft.rfft(dc_blocker_taps(cutoff_hz, sample_rate, tolerance), n)
  return spec.astype(np.complex64)


@functools.lru_cache(maxsize=None)
def _held_start(cutoff_hz: float, sample_rate: float, tolerance: float,
                length: int) -> np.ndarray:
  """float32 [length]: the sum of taps k > n, output n's response to the
  first sample held before the start (as in JAX)."""
  taps = dc_blocker_taps(cutoff_hz, sample_rate, tolerance)
  after = np.concatenate([np.cumsum(taps[::-1])[::-1][1:], [0.0]])
  return np.pad(after, (0, max(0, length - len(after))))[:length].astype(
      np.float32)


def dc_block(x: torch.Tensor, cutoff_hz: float, sample_rate: float,
             tolerance: float) -> torch.Tensor:
  """x [B, C, T] through the DC blocker, the input held at its first value
  before the start; an FFT convolution in float32, returned in x's dtype."""
  n_taps = len(dc_blocker_taps(cutoff_hz, sample_rate, tolerance))
  t = x.shape[-1]
  x32 = x.float()
  n = 1 << max(0, (t + n_taps - 2).bit_length())   # power of two >= t + taps - 1
  spec = torch.from_numpy(_taps_spectrum(cutoff_hz, sample_rate, tolerance, n))
  y = torch.fft.irfft(torch.fft.rfft(x32, n=n) * spec.to(x.device), n=n)[..., :t]
  held = torch.from_numpy(_held_start(cutoff_hz, sample_rate, tolerance, t))
  return (y + x32[..., :1] * held.to(x.device)).to(x.dtype)


def weight_norm(v: torch.Tensor, g: torch.Tensor, out_dim: int,
                eps: float) -> torch.Tensor:
  """g * v / sqrt(sum v^2 + eps), the sum over every axis but `out_dim`, in
  float32 and in JAX's operation order (v * (g / norm))."""
  v32 = v.float()
  dims = tuple(d for d in range(v.ndim) if d != out_dim)
  norm = torch.sqrt(torch.sum(v32 * v32, dim=dims, keepdim=True) + eps)
  shape = [1] * v.ndim
  shape[out_dim] = -1
  return v32 * (g.float().reshape(shape) / norm)


def _init_v(shape: Sequence[int], fan_in: int, std: float) -> torch.Tensor:
  """Untrained weights like JAX's init (truncated normal; std 0 = fan-in)."""
  std = std if std > 0 else 1.0 / math.sqrt(fan_in)
  return nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-2 * std,
                               b=2 * std)


def _l2n(x: torch.Tensor, eps: float) -> torch.Tensor:
  return x * torch.rsqrt(torch.sum(x * x, dim=-1, keepdim=True) + eps)


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
  """argmax over the last axis, first index on ties, n-1 for all-NaN rows
  (JAX rvq._first_argmax, so near-ties resolve the same way)."""
  n = scores.shape[-1]
  best = torch.amax(scores, dim=-1, keepdim=True)
  index = torch.arange(n, device=scores.device).expand_as(scores)
  idx = torch.where(scores == best, index, torch.full_like(index, n))
  return torch.clamp(torch.amin(idx, dim=-1), max=n - 1)


# ------------------------------------------------------------------- layers
class Snake(nn.Module):
  """x + sin(alpha x)^2 / (alpha + eps), per-channel alpha; x is [B, C, T]."""

  def __init__(self, channels: int):
    super().__init__()
    self.alpha = nn.Parameter(torch.ones(channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    alpha = self.alpha.to(x.dtype)[:, None]
    return x + torch.square(torch.sin(alpha * x)) / (alpha + SNAKE_EPS)


class WNConv1d(nn.Module):
  """Weight-normalised conv, [B, Cin, T] -> [B, Cout, ceil(T / stride)].

  Padding follows JAX's WNConv1d: the total padding that gives
  ceil(T / stride) frames, split centred ('same', extra on the right) or all
  on the left ('causal').
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
               stride: int = 1, dilation: int = 1, padding: str = 'same',
               init_std: float = 0.0):
    super().__init__()
    if padding not in PADDINGS:
      raise ValueError(f'conv padding must be one of {PADDINGS}, got {padding!r}')
    v = _init_v((out_channels, in_channels, kernel_size),
                in_channels * kernel_size, init_std)
    self.weight_v = nn.Parameter(v)
    self.weight_g = nn.Parameter(torch.sqrt(torch.sum(v * v, dim=(1, 2))))
    self.bias = nn.Parameter(torch.zeros(out_channels))
    self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
    self.padding = padding

  def pads(self, length: int) -> tuple[int, int]:
    eff = (self.kernel_size - 1) * self.dilation + 1
    out = -(-length // self.stride)
    total = max((out - 1) * self.stride + eff - length, 0)
    if self.padding == 'causal':
      return total, 0
    return total // 2, total - total // 2

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    w = weight_norm(self.weight_v, self.weight_g, 0, CONV_NORM_EPS).to(x.dtype)
    x = F.pad(x, self.pads(x.shape[-1]))
    return F.conv1d(x, w, self.bias.to(x.dtype), stride=self.stride,
                    dilation=self.dilation)


class WNConvTranspose1d(nn.Module):
  """Weight-normalised transposed conv, [B, Cin, T] -> [B, Cout, T * stride].

  The kernel is `kernel_multiple * stride` long (exported from JAX's
  polyphase kernel). The full transposed output has (T + m - 1) * s samples;
  like JAX, keep T * s of them starting at (m - 1) * s // 2 ('same') or 0
  ('causal').
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int, *,
               kernel_multiple: int = 2, padding: str = 'same',
               init_std: float = 0.0):
    super().__init__()
    if padding not in PADDINGS:
      raise ValueError(f'conv padding must be one of {PADDINGS}, got {padding!r}')
    if kernel_multiple < 1:
      raise ValueError(f'kernel_multiple must be >= 1, got {kernel_multiple}')
    v = _init_v((in_channels, out_channels, kernel_multiple * stride),
                kernel_multiple * in_channels, init_std)
    self.weight_v = nn.Parameter(v)
    self.weight_g = nn.Parameter(torch.sqrt(torch.sum(v * v, dim=(0, 2))))
    self.bias = nn.Parameter(torch.zeros(out_channels))
    self.stride, self.kernel_multiple = stride, kernel_multiple
    self.padding = padding

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    t = x.shape[-1]
    s, m = self.stride, self.kernel_multiple
    w = weight_norm(self.weight_v, self.weight_g, 1, CONV_NORM_EPS).to(x.dtype)
    y = F.conv_transpose1d(x, w, stride=s)
    start = (m - 1) * s // 2 if self.padding == 'same' else 0
    y = y[..., start:start + t * s]
    return y + self.bias.to(y.dtype)[:, None]


class WNLinear(nn.Module):
  """Weight-normalised linear map on the last axis (rvq._wn_dense)."""

  def __init__(self, in_features: int, out_features: int, eps: float):
    super().__init__()
    v = _init_v((out_features, in_features), in_features, 0.0)
    self.weight_v = nn.Parameter(v)
    self.weight_g = nn.Parameter(torch.sqrt(torch.sum(v * v, dim=1)))
    self.bias = nn.Parameter(torch.zeros(out_features))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    w = weight_norm(self.weight_v, self.weight_g, 0, self.eps).to(x.dtype)
    return F.linear(x, w, self.bias.to(x.dtype))


# ------------------------------------------------------------------- blocks
class ResidualUnit(nn.Module):
  """Snake -> dilated conv -> Snake -> 1x1 conv, plus the skip."""

  def __init__(self, channels: int, dilation: int, cfg: Mapping[str, Any]):
    super().__init__()
    self.act1 = Snake(channels)
    self.conv1 = WNConv1d(channels, channels, int(cfg['residual_kernel']),
                          dilation=dilation, padding=cfg['padding'],
                          init_std=float(cfg['init_std']))
    self.act2 = Snake(channels)
    self.conv2 = WNConv1d(channels, channels, 1, init_std=float(cfg['init_std']))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.conv2(self.act2(self.conv1(self.act1(x))))


def _units(channels: int, cfg: Mapping[str, Any]) -> nn.ModuleList:
  return nn.ModuleList(ResidualUnit(channels, int(d), cfg)
                       for d in cfg['dilations'])


class EncoderBlock(nn.Module):

  def __init__(self, channels: int, out_channels: int, stride: int,
               cfg: Mapping[str, Any]):
    super().__init__()
    self.units = _units(channels, cfg)
    self.act = Snake(channels)
    self.down = WNConv1d(channels, out_channels,
                         int(cfg['down_kernel_multiple']) * stride,
                         stride=stride, padding=cfg['padding'],
                         init_std=float(cfg['init_std']))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for unit in self.units:
      x = unit(x)
    return self.down(self.act(x))


class DecoderBlock(nn.Module):

  def __init__(self, channels: int, out_channels: int, stride: int,
               cfg: Mapping[str, Any]):
    super().__init__()
    self.act = Snake(channels)
    self.up = WNConvTranspose1d(channels, out_channels, stride,
                                kernel_multiple=int(cfg['up_kernel_multiple']),
                                padding=cfg['padding'],
                                init_std=float(cfg['init_std']))
    self.units = _units(out_channels, cfg)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.up(self.act(x))
    for unit in self.units:
      x = unit(x)
    return x


class Encoder(nn.Module):
  """[B, C, T] audio -> [B, latent_dim, T / hop] latents."""

  def __init__(self, audio_channels: int, cfg: Mapping[str, Any]):
    super().__init__()
    ch = int(cfg['encoder_dim'])
    std = float(cfg['init_std'])
    # The stems use the fan-in init in JAX too (no init_std passed).
    self.stem = WNConv1d(audio_channels, ch, int(cfg['stem_kernel']),
                         padding=cfg['padding'])
    blocks = []
    for s in cfg['strides']:
      blocks.append(EncoderBlock(ch, 2 * ch, int(s), cfg))
      ch *= 2
    self.blocks = nn.ModuleList(blocks)
    self.act = Snake(ch)
    self.proj = WNConv1d(ch, int(cfg['latent_dim']), int(cfg['latent_kernel']),
                         padding=cfg['padding'], init_std=std)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.proj(self.act(x))


class Decoder(nn.Module):
  """[B, latent_dim, F] latents -> [B, C, F * hop] audio."""

  def __init__(self, audio_channels: int, cfg: Mapping[str, Any],
               sample_rate: int):
    super().__init__()
    ch = int(cfg['decoder_dim'])
    self.stem = WNConv1d(int(cfg['latent_dim']), ch, int(cfg['stem_kernel']),
                         padding=cfg['padding'])
    blocks = []
    for s in reversed(tuple(cfg['strides'])):
      blocks.append(DecoderBlock(ch, ch // 2, int(s), cfg))
      ch //= 2
    self.blocks = nn.ModuleList(blocks)
    self.act = Snake(ch)
    self.out = WNConv1d(ch, audio_channels, int(cfg['stem_kernel']),
                        padding=cfg['padding'])
    self.output_tanh = bool(cfg['output_tanh'])
    # Fixed, not trained and not in the state_dict: rebuilt from config.json.
    # Exports from before the key existed decode without it.
    self.highpass_hz = float(cfg.get('output_highpass_hz', 0.0))
    self.highpass_tolerance = float(cfg.get('output_highpass_tolerance', 0.0))
    self.sample_rate = int(sample_rate)
    if self.highpass_hz > 0:
      dc_blocker_taps(self.highpass_hz, self.sample_rate,
                      self.highpass_tolerance)  # bad settings fail here

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    x = self.stem(z)
    for block in self.blocks:
      x = block(x)
    x = self.out(self.act(x))
    if self.highpass_hz > 0:
      x = dc_block(x, self.highpass_hz, self.sample_rate, self.highpass_tolerance)
    return torch.tanh(x) if self.output_tanh else x


# ---------------------------------------------------------------- quantizer
class Codebook(nn.Module):
  """One RVQ stage: optional weight-normalised projections and the codes.

  A 'learned' codebook is a Parameter (trained in JAX); an 'ema' one is a
  buffer like the EMA statistics. Both are in the state_dict.
  """

  def __init__(self, latent_dim: int, q: Mapping[str, Any]):
    super().__init__()
    self.factorized = bool(q['factorized'])
    self.eps = float(q['norm_eps'])
    dim = int(q['codebook_dim']) if self.factorized else latent_dim
    size = int(q['codebook_size'])
    if self.factorized:
      self.in_proj = WNLinear(latent_dim, dim, self.eps)
      self.out_proj = WNLinear(dim, latent_dim, self.eps)
    codes = torch.randn(size, dim)
    if self.factorized:
      codes = _l2n(codes, self.eps)
    if q['codebook_type'] == 'learned':
      self.codebook = nn.Parameter(codes)
    else:
      self.register_buffer('codebook', codes)
    self.register_buffer('cluster_size', torch.ones(size))
    self.register_buffer('embed_sum', codes.clone())

  def project_in(self, r: torch.Tensor) -> torch.Tensor:
    return self.in_proj(r) if self.factorized else r

  def project_out(self, z: torch.Tensor) -> torch.Tensor:
    return self.out_proj(z) if self.factorized else z

  def nearest(self, x: torch.Tensor) -> torch.Tensor:
    """Index of the closest code per row of x [M, d]: cosine similarity when
    factorized, else squared Euclidean distance up to a per-row constant."""
    cb = self.codebook.float()
    x = x.float()
    if self.factorized:
      return first_argmax(_l2n(x, self.eps) @ _l2n(cb, self.eps).T)
    dist = torch.sum(cb * cb, dim=-1)[None, :] - 2.0 * x @ cb.T
    return first_argmax(-dist)

  def lookup(self, codes: torch.Tensor) -> torch.Tensor:
    return self.codebook[codes]


class ResidualVQ(nn.Module):
  """K-stage residual VQ over [B, F, latent_dim] latents (inference)."""

  def __init__(self, latent_dim: int, q: Mapping[str, Any]):
    super().__init__()
    if q['codebook_type'] not in CODEBOOK_TYPES:
      raise ValueError(f'config "model.rvq.codebook_type" must be one of '
                       f'{CODEBOOK_TYPES}, got {q["codebook_type"]!r}')
    self.codebooks = nn.ModuleList(
        Codebook(latent_dim, q) for _ in range(int(q['num_codebooks'])))
    self.register_buffer('initialized', torch.tensor(True))
    self.codebook_size = int(q['codebook_size'])

  @property
  def num_codebooks(self) -> int:
    return len(self.codebooks)

  def check_nq(self, n_q: int | None) -> int:
    if n_q is None:
      return self.num_codebooks
    if not 1 <= n_q <= self.num_codebooks:
      raise ValueError(f'n_q must be in [1, {self.num_codebooks}] (the '
                       f'codebooks in config "model.rvq.num_codebooks"), got {n_q}')
    return int(n_q)

  def encode(self, z: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
    """int64 codes [B, F, n_q] of latents z [B, F, D]."""
    n_q = self.check_nq(n_q)
    residual, codes = z, []
    for book in self.codebooks[:n_q]:
      x = book.project_in(residual)
      c = book.nearest(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
      residual = residual - book.project_out(book.lookup(c).to(x.dtype))
      codes.append(c)
    return torch.stack(codes, dim=-1)

  def decode(self, codes: torch.Tensor) -> torch.Tensor:
    """Latents [B, F, D] from codes [B, F, n_q]: the sum of each stage's
    projected code."""
    if codes.ndim != 3:
      raise ValueError('codes must be [batch, frames, n_q], got '
                       f'{tuple(codes.shape)}')
    n_q = self.check_nq(codes.shape[-1])
    if codes.is_floating_point():
      raise ValueError(f'codes must be integers, got {codes.dtype}')
    if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f'codes must be in [0, {self.codebook_size}), got '
                       f'[{int(codes.min())}, {int(codes.max())}]')
    outs = [book.project_out(book.lookup(codes[..., k].long()))
            for k, book in enumerate(self.codebooks[:n_q])]
    return torch.stack(outs).sum(dim=0)

  def forward(self, z: torch.Tensor, n_q: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_q [B, F, D] with straight-through gradients, codes [B, F, n_q]),
    as in the JAX training forward without its statistics updates."""
    n_q = self.check_nq(n_q)
    residual, codes, z_q = z, [], torch.zeros_like(z)
    for book in self.codebooks[:n_q]:
      x = book.project_in(residual)
      c = book.nearest(x.detach().reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
      zq = book.lookup(c).to(x.dtype)
      out = book.project_out(x + (zq - x).detach())
      residual = residual - out
      z_q = z_q + out
      codes.append(c)
    return z_q, torch.stack(codes, dim=-1)


# -------------------------------------------------------------------- codec
def validate_model_config(cfg: Mapping[str, Any]) -> None:
  """Clear errors for settings the layers cannot build (as in JAX)."""
  strides = tuple(cfg['strides'])
  if not strides or any(int(s) < 1 for s in strides):
    raise ValueError(f'config "model.strides" must be positive ints, got {strides}')
  if cfg['padding'] not in PADDINGS:
    raise ValueError(f'config "model.padding" must be one of {PADDINGS}, got '
                     f'{cfg["padding"]!r}')
  if (cfg.get('pad_extra', 'right') != 'right'
      and any(int(s) % 2 for s in strides)):
    # DAC's alignment of odd paddings (musicjax/codec/model.py) is not built
    # here; with even strides every padding is even and it changes nothing.
    raise ValueError(
        f'config "model.pad_extra" = {cfg["pad_extra"]!r} with odd strides '
        f'{strides} is not mirrored in musicjax_torch; export an imported DAC '
        'with `musicjax export-dac` and load it with transformers\' DacModel')
  if int(cfg['decoder_dim']) % (2 ** len(strides)):
    raise ValueError(f'config "model.decoder_dim" ({cfg["decoder_dim"]}) must be '
                     f'divisible by 2**len(strides) = {2 ** len(strides)}')


class Codec(nn.Module):
  """audio [B, T, C] -> codes [B, F, K] -> audio [B, F * hop, C]."""

  def __init__(self, cfg: Mapping[str, Any], sample_rate: int,
               audio_channels: int):
    super().__init__()
    validate_model_config(cfg)
    self.encoder = Encoder(audio_channels, cfg)
    self.quantizer = ResidualVQ(int(cfg['latent_dim']), cfg['rvq'])
    self.decoder = Decoder(audio_channels, cfg, sample_rate)
    self.hop_length = int(math.prod(int(s) for s in cfg['strides']))
    self.sample_rate = int(sample_rate)
    self.audio_channels = int(audio_channels)
    # Input normalisation as in JAX (exports before it existed: off).
    self.normalize = bool(cfg.get('normalize', False))
    self.normalize_rms = 10.0 ** (float(cfg.get('normalize_rms_dbfs', 0.0)) / 20.0)
    self.normalize_eps = float(cfg.get('normalize_eps', 0.0))

  @classmethod
  def from_config(cls, meta: Mapping[str, Any]) -> 'Codec':
    """From an export's config.json (its `model` plus the loader facts)."""
    for key, ours in (('conv_norm_eps', CONV_NORM_EPS), ('snake_eps', SNAKE_EPS)):
      if key in meta and float(meta[key]) != ours:
        raise ValueError(f'config.json {key}={meta[key]}, but musicjax_torch '
                         f'computes with {ours}: update musicjax_torch')
    return cls(meta['model'], meta['sample_rate'], meta['audio_channels'])

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self.hop_length

  @property
  def num_codebooks(self) -> int:
    return self.quantizer.num_codebooks

  @property
  def codebook_size(self) -> int:
    return self.quantizer.codebook_size

  @property
  def dtype(self) -> torch.dtype:
    return self.encoder.stem.weight_v.dtype

  def _pad(self, audio: torch.Tensor) -> torch.Tensor:
    """[B, C, T'] in the model dtype, zero-padded to a hop multiple."""
    if audio.ndim != 3 or audio.shape[-1] != self.audio_channels:
      raise ValueError(f'audio must be [batch, time, {self.audio_channels}], '
                       f'got {tuple(audio.shape)}')
    x = audio.to(self.dtype).transpose(1, 2)
    return F.pad(x, (0, (-x.shape[-1]) % self.hop_length))

  def encode_latents(self, audio: torch.Tensor) -> torch.Tensor:
    """Latents before quantization [B, ceil(T / hop), latent_dim]."""
    return self.encoder(self._pad(audio)).transpose(1, 2)

  def quantize(self, latents: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
    """int64 codes [B, F, n_q] of latents [B, F, latent_dim]."""
    return self.quantizer.encode(latents, n_q)

  def input_scale(self, audio: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1]: each input's RMS over the normalize level, plus eps (ones
    without normalize), as in JAX."""
    if not self.normalize:
      return torch.ones(audio.shape[0], 1, 1, dtype=audio.dtype, device=audio.device)
    rms = audio.float().square().mean(dim=(1, 2), keepdim=True).sqrt()
    return (rms / self.normalize_rms + self.normalize_eps).to(audio.dtype)

  def encode(self, audio: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
    """int64 codes [B, ceil(T / hop), n_q]; audio is zero-padded to a hop
    multiple as in JAX (and divided by `input_scale` with normalize)."""
    if self.normalize:
      audio = audio / self.input_scale(audio)
    return self.quantize(self.encode_latents(audio), n_q)

  def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
    """Latents [B, F, latent_dim] from codes [B, F, n_q] (n_q <= K)."""
    return self.quantizer.decode(codes)

  def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
    """Audio [B, F * hop, C] from (quantized) latents [B, F, latent_dim]."""
    return self.decoder(latents.to(self.dtype).transpose(1, 2)).transpose(1, 2)

  def decode(self, codes: torch.Tensor,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """Audio [B, F * hop, C] (model dtype) from codes [B, F, n_q], times
    `scale` (from `input_scale`) when given."""
    audio = self.decode_latents(self.dequantize(codes))
    return audio if scale is None else audio * scale.to(audio.dtype)

  def forward(self, audio: torch.Tensor, n_q: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction [B, T, C], codes [B, F, n_q]); gradients pass the
    quantizer straight through (for fine-tuning)."""
    scale = self.input_scale(audio) if self.normalize else None
    z_q, codes = self.quantizer(
        self.encode_latents(audio / scale if self.normalize else audio), n_q)
    recon = self.decode_latents(z_q)[:, :audio.shape[1]]
    return (recon * scale.to(recon.dtype) if self.normalize else recon), codes
