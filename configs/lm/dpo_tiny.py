"""Tiny DPO run: preference fine-tuning of the tiny LM (configs/lm/tiny.py).

  musicjax train --config configs/lm/tiny.py --workdir runs/demo/lm
  musicjax prefs --workdir runs/demo/lm --out runs/demo/pairs.jsonl \
      --prompts 64 --candidates 4 --seconds 4 --metric chroma --margin 0.1
  musicjax train --config configs/lm/dpo_tiny.py --workdir runs/demo/dpo
The model and data sections are the LM config's (the run checks the model
against the LM checkpoint); data.path is the LM's token set.
"""
import os

from musicjax import config as config_lib


def get_config():
  # Model and data come from the LM run's config, so the two cannot drift.
  lm = config_lib.load(os.path.join(os.path.dirname(__file__), 'tiny.py'))
  c = config_lib.for_task('lm_dpo')
  c.model = lm.model
  c.data.update(lm.data)
  c.sample.update(lm.sample)
  c.data.batch_size = 8           # pairs per step (16 sequences)
  c.data.eval_batch_size = 8

  p = c.dpo
  p.init_workdir = 'runs/demo/lm'
  p.pairs = 'runs/demo/pairs.jsonl'
  p.beta = 0.1
  p.eval_fraction = 0.1

  # The paper uses lr 1e-7 for its 3B model; a tiny model trained for a few
  # hundred steps needs a larger step to move at all.
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 10
  c.train.steps = 300
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.eval_steps = 2
  return c
