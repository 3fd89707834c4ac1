"""Registry of model families: config `task` name -> Task class."""
from __future__ import annotations

import importlib

from musicjax.errors import UserError

_TASKS = {
    'codec': 'musicjax.codec.task:CodecTask',
    'lm': 'musicjax.lm.task:LMTask',
    'lm_dpo': 'musicjax.lm.dpo:DPOTask',
    'accomp': 'musicjax.accomp.task:AccompTask',
    'heartcodec': 'musicjax.codec.heartcodec.task:HeartCodecTask',
}


def register(name: str, target: str) -> None:
  """Adds task `name`, 'module:Class' imported on first use (the tests' toy task)."""
  _TASKS[name] = target


def get(name: str):
  if name not in _TASKS:
    raise UserError(f'config.task: unknown task {name!r}; known: {sorted(_TASKS)}')
  module, cls = _TASKS[name].split(':')
  return getattr(importlib.import_module(module), cls)
