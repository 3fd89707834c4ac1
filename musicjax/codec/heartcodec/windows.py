"""How HeartCodec cuts a song's codes into overlapping windows, and how the
windows' waveforms are cross-faded back together (host-side integer plans).

Codes shorter than a window are repeated up to one window. The codes are then
repeated on past the end until the windows tile them: the length test reads
the overlap in latent frames where the length formula reads it in codes, as
heartlib's does, so some lengths are not extended and their last codes go
undecoded. Window i starts at i * hop; every window after the first keeps its
predecessor's last `overlap * frames_per_code` latent frames as its known
prefix. Waveforms overlap by `overlap` codes' worth of samples and are
cross-faded linearly (in float64, as heartlib); the result is cut to the
input's duration.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class WindowPlan:
  indices: np.ndarray      # [total_codes] source frame of each padded code
  starts: tuple[int, ...]  # first code of each window
  prefix_frames: int       # known latent frames of windows after the first
  num_samples: int         # samples of the decoded song


def plan(num_codes: int, window: int, hop: int, frames_per_code: int,
         code_rate_hz: float, sample_rate: float) -> WindowPlan:
  if num_codes < 1:
    raise ValueError('no codes to decode')
  overlap = window - hop
  overlap_frames = overlap * frames_per_code
  idx = np.arange(num_codes)
  if len(idx) < window:
    idx = idx[np.arange(window) % len(idx)]
  n = len(idx)
  if (n - overlap_frames) % hop > 0:
    total = math.ceil((n - overlap) / float(hop)) * hop + overlap
    idx = idx[np.arange(total) % n]
  starts = tuple(range(0, len(idx) - hop + 1, hop))
  return WindowPlan(indices=idx, starts=starts, prefix_frames=overlap_frames,
                    num_samples=int(num_codes / code_rate_hz * sample_rate))


def cross_fade(windows: list[np.ndarray], overlap: int) -> np.ndarray:
  """Waveforms [..., window_samples] -> one [..., samples] (float32)."""
  out = windows[0].astype(np.float64)
  if overlap:
    fade_in = np.linspace(0, 1, overlap)
    fade_out = 1 - fade_in
  for w in windows[1:]:
    w = w.astype(np.float64)
    if overlap == 0:
      out = np.concatenate([out, w], -1)
      continue
    head = out[..., -overlap:] * fade_out + w[..., :overlap] * fade_in
    # Each window's sum is rounded to float32, as heartlib writes it back
    # into its float32 output.
    out = np.concatenate([out[..., :-overlap],
                          head.astype(np.float32).astype(np.float64),
                          w[..., overlap:]], -1)
  return out.astype(np.float32)
