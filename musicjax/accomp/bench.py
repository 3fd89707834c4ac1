"""`musicjax bench accomp`: real-time factor of the full-song sampler.

RTF = sampler wall time / seconds of audio (below 1 = faster than real time),
for `sample.steps` steps over a whole song in one pass, batch 1, with and
without classifier-free guidance (which doubles the batch). Codec encoding
and decoding are not included (see `bench codec`). Random weights and random
vocal codes: the sampler's speed does not depend on what the model learned.
Compilation is timed separately (ahead-of-time `lower().compile()`).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax import bench as bench_lib
from musicjax.accomp import sample as sample_lib
from musicjax.accomp import task as task_lib

SECONDS = (30.0, 240.0)
# Long songs take minutes per call: repeat the short one only.
REPEATS_LONG = 1
GUIDANCE_SCALE = 3.0   # any value != 1 turns guidance on (the cost is the same)


def _compiled(model, config, frames: int, cfg: bool, s: sample_lib.Sampling):
  k = config.model.num_codebooks
  r = max(config.data.reference_frames, 1)

  def run(vocal, valid, text, ref, ref_valid, rng):
    b = vocal.shape[0]
    yes = jnp.ones((b,), bool)
    batch = {'text': text, 'ref': ref, 'ref_valid': ref_valid}
    prefix = task_lib.prefix_of(model, batch, yes, yes)
    null = task_lib.prefix_of(model, batch, ~yes, ~yes) if cfg else None
    return sample_lib.accompany(model, vocal, valid, prefix, rng, s, null)

  rng = np.random.default_rng(0)
  args = (jnp.asarray(rng.integers(0, config.model.codebook_size, (1, frames, k)),
                      jnp.int32),
          jnp.ones((1, frames), bool),
          jnp.asarray(rng.integers(0, config.model.text_vocab_size,
                                   (1, config.data.max_text_tokens)), jnp.int32),
          jnp.asarray(rng.integers(0, config.model.codebook_size, (1, r, k)),
                      jnp.int32),
          jnp.ones((1,), bool), jax.random.key(0))
  t0 = time.perf_counter()
  fn = jax.jit(run).lower(*args).compile()
  return fn, args, time.perf_counter() - t0


def run(config, repeats: int = 3) -> dict:
  with nnx.use_eager_sharding(False):
    model = task_lib.AccompState(config, nnx.Rngs(config.train.seed)).model
  s = task_lib.sampling(config)
  rate = float(config.model.frame_rate)
  out = {'benchmark': f'accomp sampler, {s.steps} steps, batch 1, whole song '
                      'in one pass, RTF = wall / audio seconds (codec excluded)',
         'frame_rate': rate, 'steps': s.steps,
         'attention_chunk': int(config.model.backbone.attention_chunk),
         'machine': bench_lib.machine()}
  for seconds in SECONDS:
    frames = int(round(seconds * rate))
    for name, scale in (('nocfg', 1.0), ('cfg', GUIDANCE_SCALE)):
      sc = dataclasses.replace(s, cfg_scale=scale)
      fn, args, t_compile = _compiled(model, config, frames, scale != 1.0, sc)
      n = repeats if seconds == SECONDS[0] else REPEATS_LONG
      times = []
      for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
      t = statistics.median(times)
      key = f'{int(seconds)}s_{name}'
      out[f'rtf_{key}'] = round(t / seconds, 4)
      out[f'wall_s_{key}'] = round(t, 2)
      out[f'compile_s_{key}'] = round(t_compile, 1)
      print(f'[bench accomp] {seconds:g} s {name}: RTF {t / seconds:.3f} '
            f'({t:.1f} s, compile {t_compile:.0f} s)', flush=True)
  return out
