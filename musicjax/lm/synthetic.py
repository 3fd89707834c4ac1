"""Synthetic token songs whose entropy is known exactly (for tests and sanity runs).

Codebook 0 follows a Markov chain in which every state has `branching`
equally likely successors (a fixed random table); codebook k >= 1 is
`(a_k * c0 + b_k + u_k) mod V` with u_k uniform over `noise_k` values. So the
entropy of a frame given the past is exactly log(branching) for codebook 0
(log V for the first frame, which has no past) and log(noise_k) for codebook k.
A model that learns the tables reaches these cross-entropies and no lower.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class MarkovSpec:
  codebook_size: int
  num_codebooks: int
  branching: int
  noise: tuple[int, ...]        # per codebook 1..K-1
  seed: int = 0

  def __post_init__(self):
    if len(self.noise) != self.num_codebooks - 1:
      raise ValueError(f'noise needs {self.num_codebooks - 1} entries (codebooks '
                       f'1..K-1), got {self.noise}')
    if not 1 <= self.branching <= self.codebook_size:
      raise ValueError(f'branching must be in [1, {self.codebook_size}], got '
                       f'{self.branching}')

  def tables(self):
    rng = np.random.default_rng(self.seed)
    succ = np.stack([rng.choice(self.codebook_size, self.branching, replace=False)
                     for _ in range(self.codebook_size)])
    a = rng.integers(1, self.codebook_size, self.num_codebooks)
    b = rng.integers(0, self.codebook_size, self.num_codebooks)
    return succ, a, b

  def sample(self, frames: int, rng: np.random.Generator) -> np.ndarray:
    """codes [frames, K] int32."""
    succ, a, b = self.tables()
    v, k = self.codebook_size, self.num_codebooks
    out = np.zeros((frames, k), np.int32)
    c0 = int(rng.integers(v))
    for t in range(frames):
      if t:
        c0 = int(succ[c0, rng.integers(self.branching)])
      out[t, 0] = c0
      for i in range(1, k):
        out[t, i] = (a[i] * c0 + b[i] + rng.integers(self.noise[i - 1])) % v
    return out

  def entropies(self, frames: int) -> np.ndarray:
    """Exact mean cross-entropy floor per codebook over a `frames`-long song."""
    h0 = ((frames - 1) * math.log(self.branching)
          + math.log(self.codebook_size)) / frames
    return np.array([h0] + [math.log(n) for n in self.noise])
