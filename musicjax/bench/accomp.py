"""`musicjax bench accomp`: real-time factor of the full-song sampler.

RTF = sampler wall time / seconds of audio (below 1 = faster than real time),
over a whole song in one pass, batch 1, with and without classifier-free
guidance (which doubles the batch). Codec encoding and decoding are not
included (see `bench codec`). Random weights and random vocal codes: the
sampler's speed does not depend on what the model learned. Compilation is
timed separately (ahead-of-time `lower().compile()`).

Songs: `frames` (default SECONDS at the config's frame rate) with `steps`
sampler steps each (default `sample.steps`). Given steps are run and timed
in full; by default a song after the first times LONG_TIMED_STEPS steps once
and scales them to `sample.steps` (reported as `timed_steps`).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax import runtime
from musicjax.accomp import sample as sample_lib
from musicjax.accomp import task as task_lib
from musicjax.bench import machine
from musicjax.bench import measure
from musicjax.errors import UserError

SECONDS = (30.0, 240.0)
# A 240 s one-pass step takes ~20 s here: the long song times this many steps
# and scales to sample.steps (every step of the loop has the same shapes and
# cost; the 30 s case runs all steps and checks that).
LONG_TIMED_STEPS = 3
GUIDANCE_SCALE = 3.0   # any value != 1 turns guidance on (the cost is the same)


def compile_sampler(model, config, frames: int, cfg: bool,
                    s: sample_lib.Sampling):
  """The whole-song sampler compiled ahead of time for `frames` frames, its
  random inputs, and the compile seconds."""
  k = config.model.num_codebooks
  r = max(config.data.reference_frames, 1)

  def run(vocal, valid, text, ref, ref_valid, rng):
    b = vocal.shape[0]
    yes = jnp.ones((b,), bool)
    batch = {'text': text, 'ref': ref, 'ref_valid': ref_valid}
    prefix = sample_lib.prefix_of(model, batch, yes, yes)
    null = sample_lib.prefix_of(model, batch, ~yes, ~yes) if cfg else None
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


def songs(config, frames=None, steps=None) -> list[tuple[int, int, int]]:
  """(frames, steps, timed steps) of each song to time; errors name the flag."""
  default_steps = int(config.sample.steps)
  if frames is None:
    rate = float(config.model.frame_rate)
    frames = tuple(int(round(sec * rate)) for sec in SECONDS)
  if not frames or min(frames) < 1:
    raise UserError(f'--frames wants positive frame counts (e.g. 750,3000), '
                    f'got {frames}')
  if steps is None:
    # Default: every song runs sample.steps; songs after the first time a few
    # and scale (each step of the loop has the same shapes and cost).
    return [(f, default_steps,
             default_steps if i == 0 else min(LONG_TIMED_STEPS, default_steps))
            for i, f in enumerate(frames)]
  if len(steps) == 1:
    steps = tuple(steps) * len(frames)
  if len(steps) != len(frames) or min(steps) < 1:
    raise UserError(f'--steps wants one positive step count per --frames entry '
                    f'({len(frames)}: {",".join(map(str, frames))}) or a single '
                    f'one for all, got {",".join(map(str, steps))}')
  return [(f, st, st) for f, st in zip(frames, steps)]


def run(config, repeats: int = 3, frames=None, steps=None) -> dict:
  """RTF of each song (frames, steps) with and without guidance; one entry
  per song in out['songs'], in the order given."""
  load_start = runtime.load_now()
  plan = songs(config, frames, steps)
  with nnx.use_eager_sharding(False):
    model = task_lib.AccompState(config, nnx.Rngs(config.train.seed)).model
  s = sample_lib.sampling_from_config(config.sample)
  rate = float(config.model.frame_rate)
  b = config.model.backbone
  out = {'benchmark': 'accomp sampler, batch 1, whole song in one pass, '
                      'RTF = wall / audio seconds (codec excluded)',
         'frame_rate': rate, 'sample_steps': s.steps,
         'params': measure.param_count(model),
         'model': {'layers': int(b.num_layers), 'dim': int(b.dim),
                   'heads': int(b.num_heads), 'kv_heads': int(b.num_kv_heads),
                   'mlp_dim': int(b.mlp_dim),
                   'codebooks': int(config.model.num_codebooks),
                   'codebook_size': int(config.model.codebook_size)},
         'attention_chunk': int(b.attention_chunk), 'songs': []}
  for n, total, timed in plan:
    seconds = n / rate
    song = {'frames': n, 'seconds': seconds, 'steps': total,
            'timed_steps': timed}
    for name, scale in (('nocfg', 1.0), ('cfg', GUIDANCE_SCALE)):
      sc = dataclasses.replace(s, cfg_scale=scale, steps=timed)
      fn, args, t_compile = compile_sampler(model, config, n, scale != 1.0, sc)
      times = []
      for _ in range(repeats if timed == total else 1):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
      t = statistics.median(times) * total / timed
      song[f'rtf_{name}'] = round(t / seconds, 4)
      song[f'wall_s_{name}'] = round(t, 4)
      song[f'ms_per_step_{name}'] = round(1e3 * t / total, 3)
      song[f'compile_s_{name}'] = round(t_compile, 1)
      how = f', {timed} of {total} steps timed' if timed != total else ''
      print(f'[bench accomp] {n} frames ({seconds:g} s), {total} steps, '
            f'{name}: RTF {t / seconds:.3f} ({t:.1f} s{how}, compile '
            f'{t_compile:.0f} s)', flush=True)
    out['songs'].append(song)
  out['machine'] = machine.describe(load_start)
  return out
