"""Ablation (seed 003 table 3): the tiny model decoded autoregressively.

The same backbone, data and budget as configs/accomp/tiny.py, but causal
attention over the dual-track frames, the accompaniment input shifted one
frame right, next-frame cross entropy on every token, no RTD, and left-to-right
decoding (musicjax/accomp/sample.py `accompany_ar`).
  musicjax train --config configs/accomp/tiny_ar.py --workdir runs/accomp_ar
The other ablation, no RTD loss, is an override of the stage-1 config:
  musicjax train --config configs/accomp/tiny.py --workdir runs/accomp_nortd \
      --config.loss.rtd_weight=0
"""
import os

from musicjax import config as config_lib


def get_config():
  c = config_lib.load(os.path.join(os.path.dirname(__file__), 'tiny.py'))
  c.model.decode = 'ar'
  c.loss.rtd_weight = 0.0
  return c
