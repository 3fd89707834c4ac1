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
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax import bench as bench_lib
from musicjax import config as config_lib
from musicjax.accomp import diffusion
from musicjax.accomp import sample as sample_lib
from musicjax.accomp import task as task_lib
from musicjax.errors import UserError
from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer

SECONDS = (30.0, 240.0)
# A 240 s one-pass step takes ~20 s here: the long song times this many steps
# and scales to sample.steps (every step of the loop has the same shapes and
# cost; the 30 s case runs all steps and checks that).
LONG_TIMED_STEPS = 3
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
  load_start = bench_lib.load_now()
  plan = songs(config, frames, steps)
  with nnx.use_eager_sharding(False):
    model = task_lib.AccompState(config, nnx.Rngs(config.train.seed)).model
  s = task_lib.sampling(config)
  rate = float(config.model.frame_rate)
  b = config.model.backbone
  out = {'benchmark': 'accomp sampler, batch 1, whole song in one pass, '
                      'RTF = wall / audio seconds (codec excluded)',
         'frame_rate': rate, 'sample_steps': s.steps,
         'params': bench_lib.param_count(model),
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
      fn, args, t_compile = _compiled(model, config, n, scale != 1.0, sc)
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
  out['machine'] = bench_lib.machine(load_start)
  return out


# Codes per codebook of the synthetic experiments (log V = 4.16 nats).
SYNTHETIC_CODES = 64


def weighting_experiment(steps: int = 300, seeds: int = 2, workdir: str = '') -> dict:
  """Which MLM weighting trains fastest: eval masked CE after `steps`.

  The task is the synthetic pairing of musicjax/accomp/synthetic.py (the
  accompaniment is a per-codebook permutation of the vocal at the same
  frame: learnable, with a known floor of 0 and log V for a model that
  ignores the vocal), 2 codebooks of 64, 64 frames, a 2 x 64 backbone. The
  eval CE is the unweighted mean over masked tokens at Sobol-stratified t,
  the same for every weighting, so the runs compare. Every run trains with
  RTD (weight 0.2, backbone gradient) as the default config does.
  """
  def setup(kind):
    def configure(c):
      c.loss.weighting = kind
    return configure

  cases = [(kind, 2, setup(kind)) for kind in diffusion.LOSS_KINDS]
  return _experiment(
      'accomp-weighting', f'MLM loss weighting: eval masked CE (nats) after '
      f'{steps} steps on the synthetic pairing, {seeds} seeds',
      'eval/ce_masked', 'eval_ce_masked', 'eval masked CE', cases, steps, seeds,
      workdir)


# (label, model.decode, codebooks) of the context experiment.
CONTEXT_RUNS = (('diffusion_k1', 'diffusion', 1), ('diffusion_k4', 'diffusion', 4),
                ('ar_k4', 'ar', 4))


def context_experiment(steps: int = 300, seeds: int = 2, workdir: str = '') -> dict:
  """How fast does a model learn from its own track's neighbouring frames?

  The synthetic 'chain' task (musicjax/accomp/synthetic.py): frame t's code
  of codebook k is a fixed permutation of frame t - 1's, and the vocal is
  noise. The AR model's input at frame t already holds frame t - 1; a masked
  model must learn to attend to an unmasked neighbour, and with K > 1 must
  pick its codebook's code out of the frame's sum of K embeddings. Eval CE
  per codebook over the masked tokens (diffusion, Sobol-stratified t: masked
  neighbours make part of it irreducible) or over every token (AR, next
  frame); log V (4.16) is a model that learned nothing.
  """
  def setup(decode):
    def configure(c):
      c.data.synthetic_task = 'chain'
      c.model.decode = decode
      if decode == 'ar':
        c.loss.rtd_weight = 0.0
    return configure

  cases = [(label, k, setup(decode)) for label, decode, k in CONTEXT_RUNS]
  return _experiment(
      'accomp-context', f'learning from context: eval CE of codebook 0 (nats) '
      f'after {steps} steps on the synthetic chain, {seeds} seeds',
      'eval/ce/0', 'eval_ce0', 'eval CE of codebook 0', cases, steps, seeds,
      workdir)


def _experiment(name: str, benchmark: str, metric: str, key: str, what: str,
                cases, steps: int, seeds: int, workdir: str) -> dict:
  """Trains every (label, codebooks, configure) case for `seeds` seeds on
  synthetic data and reports the final `metric` of each run as out[key_label]
  (and its mean). Runs go to `workdir`, or a temporary directory removed
  afterwards."""
  load_start = bench_lib.load_now()
  out = {'benchmark': benchmark, 'log_v': float(np.log(SYNTHETIC_CODES))}
  tmp = None if workdir else tempfile.TemporaryDirectory(
      prefix=name.replace('-', '_') + '_')
  root = workdir or tmp.name
  try:
    for label, codebooks, configure in cases:
      finals = []
      for seed in range(seeds):
        c = _synthetic_config(seed, steps, codebooks)
        configure(c)
        wd = os.path.join(root, f'{label}_{seed}')
        trainer.train(c, wd)
        recs = metrics_lib.read_jsonl(os.path.join(wd, 'metrics.jsonl'))
        finals.append([r for r in recs if metric in r][-1][metric])
      out[f'{key}_{label}'] = [round(x, 4) for x in finals]
      out[f'{key}_{label}_mean'] = round(float(np.mean(finals)), 4)
      print(f'[bench {name}] {label}: {what} {np.mean(finals):.3f} '
            f'({", ".join(f"{x:.3f}" for x in finals)})', flush=True)
  finally:
    if tmp is not None:
      tmp.cleanup()
  out['machine'] = bench_lib.machine(load_start)
  return out


def _synthetic_config(seed: int, steps: int, codebooks: int):
  """A small accomp run on synthetic data: `codebooks` x SYNTHETIC_CODES codes,
  64 frames, a 2 x 64 backbone, eval at the end."""
  c = config_lib.for_task('accomp')
  m = c.model
  m.num_codebooks, m.codebook_size, m.text_vocab_size = codebooks, SYNTHETIC_CODES, 8
  b = m.backbone
  b.num_layers, b.dim, b.num_heads, b.num_kv_heads, b.mlp_dim = 2, 64, 4, 2, 128
  b.scan_layers = False
  d = c.data
  d.kind, d.max_frames, d.synthetic_min_frames = 'synthetic', 64, 64
  d.reference_frames, d.max_text_tokens = 4, 4
  d.batch_size = d.eval_batch_size = 8
  d.shuffle_seed = seed
  c.optim.lr, c.optim.warmup_steps = 3e-3, 20
  t = c.train
  t.seed = seed
  t.steps = t.eval_every = t.checkpoint_every = steps
  t.log_every = max(steps // 4, 1)
  t.eval_steps = 8
  return c
