"""Timing jitted calls and counting a model's parameters, for every bench."""
from __future__ import annotations

import statistics
import time

import jax
from flax import nnx


def times(fn, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls after one compile + warm-up call."""
  jax.block_until_ready(fn())
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def median_time(fn, repeats: int) -> float:
  """Median wall seconds of `repeats` calls after a warm-up call."""
  return statistics.median(times(fn, repeats))


def best_time(fn, repeats: int) -> float:
  """Fastest of `repeats` calls after a warm-up: a peak is what the machine
  can do, and on a shared machine the median moves with the neighbours."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def param_count(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param), as torch's `parameters()` counts them:
  EMA codebooks and other statistics are buffers, not parameters."""
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
