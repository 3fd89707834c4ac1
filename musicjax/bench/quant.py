"""`musicjax bench lm-quant --workdir RUN`: weight-only int8 / int4 inference
(config.sample.weights, nn/lora.py) of a trained LM beside its float weights,
all in one run: what it costs in quality (eval loss on the run's eval split;
greedy decoding's agreement with the float model's codes), what it saves
(the model's bytes at rest) and its decode speed on this machine, with the
fused (default) and stacked decode weights.

A trained run, not random weights: how far quantization moves the greedy
path depends on how peaked the learned distributions are.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from musicjax import runtime
from musicjax.bench import lm as lm_bench
from musicjax.bench import machine
from musicjax.lm import generate as gen
from musicjax.nn import lora
from musicjax.train import runs

WEIGHTS = ('float', 'bfloat16', 'int8', 'int4')
# Greedy decode: frames per song and prompts (rows with their null rows).
FRAMES = 200
PROMPTS = 4


def _bytes(model: nnx.Module) -> int:
  """The model's bytes at rest (int4 values are stored two to a byte)."""
  return int(sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))))


def _eval_loss(run, model, batches: int) -> float:
  it = iter(run.task.dataset('eval', 0, 1))
  step = nnx.jit(lambda m, b: run.task._loss(m, b)[0])  # pylint: disable=protected-access
  return float(np.mean([float(step(model, next(it))) for _ in range(batches)]))


def _agreement(codes: np.ndarray, want: np.ndarray, name: str) -> dict:
  """Greedy codes [prompts, ...frames..., K] against `want`'s: the share of
  equal codes, and per prompt the frames before the first different one."""
  same = np.all(codes == want, axis=-1).reshape(codes.shape[0], -1)
  return {f'greedy_code_agreement_vs_{name}': float(np.mean(codes == want)),
          f'greedy_frames_before_first_difference_vs_{name}': [
              int(np.argmin(r)) if not r.all() else r.size for r in same]}


def run(workdir: str, repeats: int = 3, frames: int = FRAMES,
        eval_batches: int = 4) -> dict:
  load_start = runtime.load_now()
  base = runs.load_run(workdir, expect=('lm', 'lm_dpo'), verb='bench lm-quant')
  config, group = base.config, int(base.config.lora.int4_group)
  rng = np.random.default_rng(0)
  prompts = [lm_bench._prompt(config, 2, rng) for _ in range(PROMPTS)]  # pylint: disable=protected-access
  out = {'benchmark': f'weight-only quantized inference of {workdir}: eval '
                      f'loss over {eval_batches} eval batches, greedy CFG '
                      f'decoding of {PROMPTS} random prompts x {frames} '
                      f'frames, decode frames/s median of {repeats} (weight types '
                      'timed round-robin)',
         'compute_dtype': config.model.backbone.dtype, 'cases': {}}
  all_codes, timed = {}, {}
  with base.activate():
    for weights in WEIGHTS:
      model = lora.quantize_stacks(nnx.clone(base.model), weights, group)
      case = {'model_bytes': _bytes(model),
              'eval_loss': _eval_loss(base, model, eval_batches)}
      for layout in ('fused', 'stacked'):
        sampling = gen.sampling_from_config(
            config.sample, temperature=0.0, max_frames=frames,
            min_frames=frames, backbone_weights=layout,
            cfg_scale=config.sample.cfg_scale if config.sample.cfg_scale != 1
            else 1.5, **gen.model_classes(config.model))
        fn = gen.make_generate_fn(model, sampling, num_cond=1)
        if layout == 'fused':
          all_codes[weights] = np.stack(
              [np.asarray(fn(p, jax.random.key(0))['codes']) for p in prompts])
        timed[weights, layout] = (
            lambda fn=fn: fn(prompts[0], jax.random.key(0))['codes'])
      for ref in ('float', 'bfloat16'):
        if ref in all_codes:
          case.update(_agreement(all_codes[weights], all_codes[ref], ref))
      out['cases'][weights] = case
    # Round-robin over the weight types, so that a slow spell of this shared
    # machine slows them all alike instead of one block of repeats.
    spent = {key: [] for key in timed}
    for fn in timed.values():
      jax.block_until_ready(fn())            # warm-up (compiled above)
    for _ in range(repeats):
      for key, fn in timed.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        spent[key].append(time.perf_counter() - t0)
    for (weights, layout), ts in spent.items():
      out['cases'][weights][f'frames_per_s_{layout}'] = frames / float(
          np.median(ts))
  f = out['cases']['float']
  for weights in WEIGHTS[1:]:
    c = out['cases'][weights]
    c['bytes_vs_float'] = c['model_bytes'] / f['model_bytes']
    c['eval_loss_change'] = c['eval_loss'] - f['eval_loss']
    for layout in ('fused', 'stacked'):
      c[f'speed_vs_float_{layout}'] = (c[f'frames_per_s_{layout}']
                                       / f[f'frames_per_s_{layout}'])
  out['machine'] = machine.describe(load_start)
  return out
