"""Speed benchmarks. Each prints what it measured, on what, against what target.

Every result carries `machine(load_start)`: the CPU, its cores and the 1-minute
load average when the bench began and ended, with `busy` set when other jobs
were competing for the cores (such a figure is slower than the machine is).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from musicjax import runtime
from musicjax import tasks

# The target for the base codec on a 2-core CPU: encode + decode >= 100x real time.
CODEC_TARGET_RTF = 100.0
# A bench keeps about one runnable thread per core busy, so on a quiet machine
# the 1-minute load sits at or below the core count (1-2 on 2 cores). Half a
# core's worth of load above that per core (load > 1.5 x cores: 3 on 2 cores)
# means other jobs were taking turns on the cores; the peers' notes saw load
# 6-10 on 2 cores slow a bench several-fold.
BUSY_LOAD_PER_CORE = 1.5


def load_now() -> float | None:
  """The 1-minute load average now (None where the OS has none)."""
  try:
    return float(os.getloadavg()[0])
  except (AttributeError, OSError):
    return None


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine(load_start: float | None = None) -> dict:
  """Where a figure was measured: device, CPU, cores, and the load average at
  the bench's start (`load_start`, from `load_now()`; None: now) and now.

  `busy` is True when either load exceeds BUSY_LOAD_PER_CORE x cores: other
  jobs shared the cores, so the figure understates the machine.
  """
  dev = jax.devices()[0]
  cores = os.cpu_count() or 1
  end = load_now()
  start = end if load_start is None else load_start
  loads = [x for x in (start, end) if x is not None]
  threshold = BUSY_LOAD_PER_CORE * cores
  busy = bool(loads) and max(loads) > threshold
  out = {
      'platform': dev.platform, 'device_kind': dev.device_kind,
      'device_count': jax.device_count(), 'cpu_count': cores,
      'cpu_model': cpu_model(),
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


def _time(fn, repeats: int) -> float:
  return statistics.median(_times(fn, repeats))


def _times(fn, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls after one compile + warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def param_count(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param), as torch's `parameters()` counts them:
  EMA codebooks and other statistics are buffers, not parameters."""
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def codec(config, seconds: float = 10.0, repeats: int = 5) -> dict:
  """Encode and decode speed of a randomly initialised codec, as x real time
  (audio seconds per wall second; the median and the best of the repeats, the
  best being what ../shared/peer-bench/encodec_bench.py reports)."""
  load_start = load_now()
  task = tasks.get(config.task)(config)
  with nnx.use_eager_sharding(False):
    state = task.create_state(nnx.Rngs(config.train.seed))
  model = task.inference_model(state)
  graphdef, params = nnx.split(model)
  sr, ch = int(config.data.sample_rate), int(config.data.channels)
  n = int(round(seconds * sr)) // model.hop_length * model.hop_length
  audio = jax.random.uniform(jax.random.key(0), (1, n, ch), minval=-0.5, maxval=0.5)

  encode = jax.jit(lambda p, a: nnx.merge(graphdef, p).encode(a))
  decode = jax.jit(lambda p, c: nnx.merge(graphdef, p).decode(c))
  codes = encode(params, audio)
  enc = _times(lambda: encode(params, audio), repeats)
  dec = _times(lambda: decode(params, codes), repeats)
  t_enc, t_dec = statistics.median(enc), statistics.median(dec)
  b_enc, b_dec = min(enc), min(dec)
  dur = n / sr
  return {
      'benchmark': 'codec encode/decode, batch 1, jitted, median (and best) '
                   'of %d; x real time = audio seconds / wall seconds' % repeats,
      'audio_seconds': dur, 'sample_rate': sr,
      'frame_rate': float(model.frame_rate), 'codebooks': int(model.num_codebooks),
      'bitrate_kbps': float(model.num_codebooks * np.log2(model.codebook_size)
                            * model.frame_rate / 1000),
      'params': param_count(model),
      'params_and_buffers': int(sum(x.size for x in jax.tree.leaves(params))),
      'encode_seconds': t_enc, 'decode_seconds': t_dec,
      'encode_rtf': dur / t_enc, 'decode_rtf': dur / t_dec,
      'encode_decode_rtf': dur / (t_enc + t_dec),
      'encode_rtf_best': dur / b_enc, 'decode_rtf_best': dur / b_dec,
      'encode_decode_rtf_best': dur / (b_enc + b_dec),
      'target_encode_decode_rtf': CODEC_TARGET_RTF,
      'machine': machine(load_start),
  }
