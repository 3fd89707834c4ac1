"""Where a bench figure was measured, and what the machine can do.

Every result carries `describe(load_start)` as out['machine']: the CPU, its
cores and the 1-minute load average when the bench began and ended, with
`busy` set when other jobs were competing for the cores (such a figure is
slower than the machine is).
`gemm_peak` measures the machine's f32 matmul FLOP/s: the MFU denominator.
"""
from __future__ import annotations

import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from musicjax import runtime
from musicjax.bench import measure

# A bench keeps about one runnable thread per core busy, so on a quiet machine
# the 1-minute load sits at or below the core count (1-2 on 2 cores). Half a
# core's worth of load above that per core (load > 1.5 x cores: 3 on 2 cores)
# means other jobs were taking turns on the cores; the peers' notes saw load
# 6-10 on 2 cores slow a bench several-fold.
BUSY_LOAD_PER_CORE = 1.5


def describe(load_start: float | None = None) -> dict:
  """Where a figure was measured: device, CPU, cores, and the load average at
  the bench's start (`load_start`, from `runtime.load_now()`; None: now) and now.

  `busy` is True when either load exceeds BUSY_LOAD_PER_CORE x cores: other
  jobs shared the cores, so the figure understates the machine.
  """
  dev = jax.devices()[0]
  cores = os.cpu_count() or 1
  end = runtime.load_now()
  start = end if load_start is None else load_start
  loads = [x for x in (start, end) if x is not None]
  threshold = BUSY_LOAD_PER_CORE * cores
  busy = bool(loads) and max(loads) > threshold
  out = {
      'platform': dev.platform, 'device_kind': dev.device_kind,
      'device_count': jax.device_count(), 'cpu_count': cores,
      'cpu_model': runtime.cpu_model(),
      'processor': platform.processor() or platform.machine(),
      'jax': jax.__version__,
      'load_1min_start': start, 'load_1min_end': end,
      'busy_load_threshold': threshold, 'busy': busy,
      # glibc may return freed buffers to the kernel and fault them in again
      # (musicjax/runtime.py).
      'malloc_env': {k: os.environ[k] for k in runtime.USER_ENV
                     if k in os.environ},
      # What the CLI set with mallopt (musicjax/runtime.py), if anything.
      'malloc': runtime.malloc_status(),
  }
  if busy:
    out['busy_note'] = (
        f'1-minute load {max(loads):.1f} > {threshold:g} '
        f'({BUSY_LOAD_PER_CORE:g} x {cores} cores): other jobs were running, '
        'so these figures are slower than the machine; rerun when it is quiet')
    print(f'[bench] warning: {out["busy_note"]}', file=sys.stderr, flush=True)
  return out


# The GEMM peak: [GEMM_SIZE, GEMM_SIZE] f32 matrices, best of GEMM_REPEATS calls.
GEMM_SIZE = 2048
GEMM_REPEATS = 5


def gemm_timers(size: int) -> dict:
  """{library: a call running one [size, size] f32 matmul to completion}."""
  rng = np.random.default_rng(0)
  a_np = rng.standard_normal((size, size), dtype=np.float32)
  a_jax = jnp.asarray(a_np)
  matmul = jax.jit(lambda x: x @ x)
  timers = {'jax': lambda: jax.block_until_ready(matmul(a_jax)),
            'numpy': lambda: a_np @ a_np}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return timers
  a_torch = torch.from_numpy(a_np)
  timers['torch'] = lambda: a_torch @ a_torch
  return timers


def gemm_peak(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> dict:
  """The machine's f32 GEMM FLOP/s, measured now with each library on the
  same [size, size] matrices (jax jitted, numpy, torch when importable); the
  best of them is the MFU denominator."""
  flops = 2 * size ** 3
  by_lib = {name: flops / measure.best_time(fn, repeats)
            for name, fn in gemm_timers(size).items()}
  best = max(by_lib, key=by_lib.get)
  return {'size': size, 'flops_per_s': by_lib, 'best': by_lib[best],
          'best_library': best}
