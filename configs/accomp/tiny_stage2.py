"""Tiny accompaniment model, curriculum stage 2: long windows, quality subset.

Starts from the stage-1 run's weights (fresh optimizer, lower learning rate):
  musicjax train --config configs/accomp/tiny_stage2.py --workdir runs/accomp2 \
      --config.init.workdir=runs/accomp
Windows of 16 s (1000 frames), trained only on songs that pass the quality
rule of musicjax/accomp/data.py (data.quality): long enough to fill most of a
window, a vocal and an accompaniment that are active most of the time, and at
least 4 phrases (the stand-in for the paper's structure filter).
"""
import os

from musicjax import config as config_lib


def get_config():
  c = config_lib.load(os.path.join(os.path.dirname(__file__), 'tiny.py'))
  c.init.workdir = 'runs/demo/accomp'
  d = c.data
  d.max_frames = 1000
  d.batch_size = 4
  d.eval_batch_size = 4
  q = d.quality
  q.enabled = True
  q.min_seconds = 12.0
  q.min_vocal_active = 0.6
  q.min_accompaniment_active = 0.6
  q.min_sections = 4
  c.sample.window_frames = 1000
  c.sample.overlap_frames = 250
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 50
  c.train.steps = 300
  c.train.eval_every = 300
  c.train.checkpoint_every = 300
  return c
