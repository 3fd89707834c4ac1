"""Speed benchmarks. Each prints what it measured, on what, against what target."""
from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx

from musicjax import tasks

# The target for the base codec on a 2-core CPU: encode + decode >= 100x real time.
CODEC_TARGET_RTF = 100.0


def machine() -> dict:
  dev = jax.devices()[0]
  return {
      'platform': dev.platform, 'device_kind': dev.device_kind,
      'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
      'processor': platform.processor() or platform.machine(),
      'jax': jax.__version__,
      # glibc may return freed buffers to the kernel and fault them in again (notes/README).
      'malloc_env': {k: os.environ[k] for k in ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_')
                     if k in os.environ},
  }


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def codec(config, seconds: float = 10.0, repeats: int = 5) -> dict:
  """Encode and decode real-time factors of a randomly initialised codec."""
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
  t_enc = _time(lambda: encode(params, audio), repeats)
  t_dec = _time(lambda: decode(params, codes), repeats)
  dur = n / sr
  return {
      'benchmark': 'codec encode/decode, batch 1, jitted, median of %d' % repeats,
      'audio_seconds': dur, 'sample_rate': sr,
      'frame_rate': float(model.frame_rate), 'codebooks': int(model.num_codebooks),
      'bitrate_kbps': float(model.num_codebooks * np.log2(model.codebook_size)
                            * model.frame_rate / 1000),
      'params': int(sum(x.size for x in jax.tree.leaves(params))),
      'encode_seconds': t_enc, 'decode_seconds': t_dec,
      'encode_rtf': dur / t_enc, 'decode_rtf': dur / t_dec,
      'encode_decode_rtf': dur / (t_enc + t_dec),
      'target_encode_decode_rtf': CODEC_TARGET_RTF,
      'machine': machine(),
  }
