"""`musicjax bench accomp-weighting` and `accomp-context`: small accomp runs
trained on synthetic data (musicjax/accomp/synthetic.py), compared by their
final eval cross-entropy. Training, not timing: they answer which loss
weighting learns fastest, and how fast a model learns from its own track's
neighbouring frames.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from musicjax import runtime
from musicjax import config as config_lib
from musicjax.accomp import diffusion
from musicjax.bench import machine
from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer

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
  load_start = runtime.load_now()
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
  out['machine'] = machine.describe(load_start)
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
