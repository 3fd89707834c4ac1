"""A fixed first-order DC blocker, run as a causal FIR along time.

H(z) = (1 - z^-1) / (1 - R z^-1) with R = exp(-2 pi f_c / sr): a zero at DC
and a pole just inside it, so |H| is -3 dB at f_c and within 0.1 dB of 1 from
about 7 f_c up (first order: |H|^2 ~ f^2 / (f^2 + f_c^2)). Its impulse
response is h[0] = 1, h[k] = (R - 1) R^(k-1) for k >= 1. The FIR keeps the
taps while R^k >= `tolerance`, then rescales the (negative) tail so it sums to
exactly -1: the taps sum to 0, so the DC gain is zero by construction,
whatever the truncation.

Before the first sample the input is held at its first value (edge padding),
so a constant at any level is removed at every output sample, the first ones
included (zero padding would leave a decaying step at the start of every
segment). The filter has no parameters; nothing about it is trained or saved.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def dc_blocker_taps(cutoff_hz: float, sample_rate: float,
                    tolerance: float) -> np.ndarray:
  """The FIR taps (float64, read-only), h[0] = 1 and a tail summing to -1.

  Args:
    cutoff_hz: the -3 dB frequency f_c (> 0, below Nyquist).
    sample_rate: samples per second.
    tolerance: taps h[k], k >= 1, are kept while R^k >= tolerance (in (0, 1)).

  Raises:
    ValueError: for a cutoff or tolerance out of range.
  """
  if not 0.0 < cutoff_hz < sample_rate / 2:
    raise ValueError(f'high-pass cutoff must be in (0, {sample_rate / 2:g}) Hz '
                     f'(below Nyquist at {sample_rate:g} Hz), got {cutoff_hz}')
  if not 0.0 < tolerance < 1.0:
    raise ValueError(f'high-pass tolerance must be in (0, 1), got {tolerance}')
  r = math.exp(-2.0 * math.pi * cutoff_hz / sample_rate)
  # R^k >= tolerance  <=>  k <= log(tolerance) / log(R); at least one tail tap.
  n_tail = max(1, int(math.floor(math.log(tolerance) / math.log(r))))
  tail = (r - 1.0) * r ** np.arange(n_tail, dtype=np.float64)
  tail = tail / math.fsum(-tail)   # the dropped part of the tail goes back in
  taps = np.concatenate([[-math.fsum(tail)], tail])  # = 1, up to rounding
  taps.setflags(write=False)
  return taps


def _fft_length(n: int) -> int:
  """The power of two >= n (a fast FFT size on every backend)."""
  return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _taps_spectrum(cutoff_hz: float, sample_rate: float, tolerance: float,
                   n: int) -> np.ndarray:
  """rfft of the taps at length n, complex64 (a constant of the program)."""
  spec = np.fft.rfft(dc_blocker_taps(cutoff_hz, sample_rate, tolerance), n)
  return spec.astype(np.complex64)


@functools.lru_cache(maxsize=None)
def held_start(cutoff_hz: float, sample_rate: float, tolerance: float,
               length: int) -> np.ndarray:
  """float32 [length]: output n's response to the held first sample, the sum
  of taps k > n (those reaching before the start); 0 from n = len(taps) - 1."""
  taps = dc_blocker_taps(cutoff_hz, sample_rate, tolerance)
  after = np.concatenate([np.cumsum(taps[::-1])[::-1][1:], [0.0]])
  return np.pad(after, (0, max(0, length - len(after))))[:length].astype(
      np.float32)


def dc_block(x: jax.Array, cutoff_hz: float, sample_rate: float,
             tolerance: float) -> jax.Array:
  """x [batch, time, channels] through the DC blocker, per channel.

  An FFT convolution: a direct one costs time x taps (thousands of taps at
  audio rates), this costs (time + taps) log(time + taps). The held first
  sample is added as first sample x `held_start` rather than padded in (an
  edge pad slices the batch axis, which Explicit meshes refuse when it is
  sharded). Computed in float32, returned in x's dtype.
  """
  n_taps, t = len(dc_blocker_taps(cutoff_hz, sample_rate, tolerance)), x.shape[1]
  x32 = x.astype(jnp.float32)
  # A circular convolution this long has no wrap-around in the first t outputs.
  n = _fft_length(t + n_taps - 1)
  spec = jnp.fft.rfft(x32, n=n, axis=1)
  spec = spec * _taps_spectrum(cutoff_hz, sample_rate, tolerance, n)[:, None]
  y = jnp.fft.irfft(spec, n=n, axis=1)[:, :t]
  y = y + x32[:, :1] * held_start(cutoff_hz, sample_rate, tolerance, t)[:, None]
  return y.astype(x.dtype)
