"""What a LoRA run (config.lora.rank > 0, musicjax/nn/lora.py) changes in
the life of a run.

* Its base is `config.init.workdir`, always: a fresh run takes the base
  weights from it (warm_start.py, quantizing them when config.lora.base is
  int8/int4) and starts its adapters fresh; a resumed run, `generate` and
  `eval` rebuild the base from it the same way, then restore the adapters.
* Its checkpoints hold only what it trains and counts: the adapters, their
  optimizer moments, counters and the data position, not the frozen weights
  of the warm-started subtrees. `base.json` beside them records the base's
  checkpoint step, so a base that has moved on is caught, not silently used.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from flax import nnx

from musicjax.config import ConfigError
from musicjax.fileio import write_text
from musicjax.nn import lora
from musicjax.parallel import distributed

BASE_RECORD = 'base.json'


def check(task) -> None:
  """Config errors of a LoRA run of `task`, before anything is built."""
  config = task.config
  lora.check_config(config)
  if not lora.enabled(config):
    return
  if not task.supports_lora:
    raise ConfigError(f'config.lora.rank={config.lora.rank}: task '
                      f'{config.task!r} does not take adapters (the lm, lm_dpo '
                      'and accomp tasks do); set --config.lora.rank=0')
  if not task.init_source()[0]:
    raise ConfigError(f'config.lora.rank={config.lora.rank} trains adapters '
                      'on a base model: name it with --config.init.workdir=RUN '
                      '(a trained or imported run)')


def flat_variables(state: nnx.State) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [('/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in kp),
           v) for kp, v in flat]


def made_paths(state: nnx.State) -> set[str]:
  """Weights a LoRA run adds to its base's: adapters and quantized scales."""
  return {p for p, v in flat_variables(state) if isinstance(v, nnx.LoRAParam) or
          (isinstance(v, lora.Quantized) and p.endswith('_scale'))}


def quantized_paths(state: nnx.State) -> set[str]:
  """Base weights stored as integers (their float values come from the base)."""
  return {p for p, v in flat_variables(state)
          if isinstance(v, lora.Quantized) and not p.endswith('_scale')}


def frozen_paths(state: nnx.State, subtrees) -> set[str]:
  """What the checkpoints leave out: every variable of the warm-started
  subtrees but the adapters (the base run holds them)."""
  return {p for p, v in flat_variables(state) if p.split('/')[0] in subtrees
          and not isinstance(v, nnx.LoRAParam)}


def drop(pure: dict, paths_: set[str]) -> dict:
  """A copy of the pure-dict tree `pure` without `paths_` (and without the
  dicts that leaves empty)."""
  def walk(node, prefix):
    if not isinstance(node, dict):
      return node
    out = {}
    for k, v in node.items():
      p = f'{prefix}/{k}' if prefix else str(k)
      if p in paths_:
        continue
      v = walk(v, p)
      if isinstance(v, dict) and not v and isinstance(node[k], dict) and node[k]:
        continue
      out[k] = v
    return out
  return walk(pure, '')


def record_base(workdir: str, init_workdir: str, step: int) -> None:
  if distributed.is_primary():
    write_text(os.path.join(workdir, BASE_RECORD), json.dumps(
        {'workdir': os.path.abspath(os.path.expanduser(init_workdir)),
         'step': int(step)}, indent=1) + '\n')


def check_base(workdir: str, init_workdir: str, step: int) -> None:
  """The base a LoRA run was trained on is still the one init.workdir holds."""
  path = os.path.join(workdir, BASE_RECORD)
  if not os.path.exists(path):
    return
  with open(path) as f:
    rec = json.load(f)
  if int(rec['step']) != int(step):
    raise ConfigError(
        f'the LoRA run in {workdir} was trained on {rec["workdir"]} at step '
        f'{rec["step"]}, but config.init.workdir={init_workdir} is now at step '
        f'{step}: its adapters belong to the earlier weights. Point '
        'config.init.workdir at a copy of that base, or start a new LoRA run')
