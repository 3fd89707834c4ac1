"""A trained (or imported) run, loaded for inference: `load_run`.

A run is the workdir of `musicjax train` (or an import, train/new_run.py): its
config.json and its checkpoints/. Every command that uses a finished run loads
it here, so all of them say the same thing when the workdir is missing, holds
another kind of run, or has no checkpoint. `check_same_model` is the one check
that a new run can start from an earlier run's weights (warm starts).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterable, Iterator

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from musicjax import config as config_lib
from musicjax.config import ConfigError
from musicjax.parallel import rules as rules_lib
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import trainer


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A restored run; call its model inside `with run.activate():`."""
  workdir: str
  config: ml_collections.ConfigDict
  task: Any
  mesh: Mesh
  rules: rules_lib.Rules
  state: nnx.Module   # the task's whole state, its arrays sharded on `mesh`
  step: int

  @property
  def model(self) -> nnx.Module:
    """The module inference runs: the task's `inference_model` (e.g. the
    codec's generator, the LM)."""
    return self.task.inference_model(self.state)

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """The run's mesh and logical-axis rules, which its model code needs."""
    with jax.set_mesh(self.mesh), rules_lib.use_rules(self.rules):
      yield


def _tasks(expect: str | Iterable[str] | None) -> tuple[str, ...]:
  if expect is None:
    return ()
  return (expect,) if isinstance(expect, str) else tuple(expect)


def saved_config(workdir: str, expect: str | Iterable[str] | None = None, *,
                 verb: str | None = None, flag: str = '--workdir',
                 overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The config.json of the run in `workdir`, checked to be of `expect`.

  Args:
    workdir: the run's directory.
    expect: the task(s) the caller can use, the first naming the kind needed
      ('codec', or ('lm', 'lm_dpo')); None: any.
    verb: the `musicjax` verb, for messages.
    flag: what the user called `workdir` ('--workdir', '--codec-workdir',
      'config.init.workdir'), for messages.
    overrides: '--config.a.b=value' changes (`config.load_saved`).

  Raises:
    ConfigError: `workdir` is empty, missing, has no config.json, or holds a
      run of another task than `expect`.
  """
  expect = _tasks(expect)
  which = config_lib.how_to_train(expect[0]) if expect else (
      'a `musicjax train` run')
  if not workdir:
    raise ConfigError(f'{flag} is empty: point it at {which}')
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    why = ('no such directory' if not os.path.isdir(workdir) else
           'so it is no musicjax run, or not one trained yet')
    raise ConfigError(f'{flag} {workdir} has no config.json ({why}): point '
                      f'{flag} at {which}')
  config = config_lib.load_saved(workdir, overrides)
  if expect:
    config_lib.require_task(config, workdir, expect, verb, flag)
  return config


def load_run(workdir: str, step: int | None = None, *,
             config: ml_collections.ConfigDict | None = None,
             expect: str | Iterable[str] | None = None,
             verb: str | None = None, flag: str = '--workdir',
             overrides: Iterable[str] = ()) -> Run:
  """Restores the latest (or `step`) checkpoint of the run in `workdir`.

  Args:
    workdir: the run's directory (config.json and checkpoints/).
    step: the checkpoint step; None: the latest.
    config: the config to restore with (e.g. the run's own with overrides);
      None: the run's config.json.
    expect: the task(s) the caller can use, the first naming the kind needed
      ('codec', or ('lm', 'lm_dpo')); None: any.
    verb: the `musicjax` verb, for messages.
    flag: what the user called `workdir` ('--workdir', '--codec-workdir'),
      for messages.
    overrides: '--config.a.b=value' changes of the run's own config (only
      without `config`).

  Returns:
    The Run; its arrays are sharded on its mesh.

  Raises:
    ConfigError: as `saved_config`; or `config` is of another task than
      `expect`, the run has no checkpoint, or none at `step`.
  """
  if config is None:
    config = saved_config(workdir, expect, verb=verb, flag=flag,
                          overrides=overrides)
  else:
    if overrides:
      raise ValueError('load_run: pass overrides or a config, not both')
    if not workdir:
      raise ConfigError(f'{flag} is empty: point it at a trained run')
    if expect:
      config_lib.require_task(config, workdir, _tasks(expect), verb, flag)
  # Checked before the checkpoint manager, which would create the folder.
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir) or not any(
      n.isdigit() for n in os.listdir(ckpt_dir)):
    raise ConfigError(
        f'{flag} {workdir} has no checkpoint in {ckpt_dir}: train it first '
        f'(`musicjax train`), or point {flag} at a trained run')
  s, state, step = trainer.restore_checkpoint(config, workdir, step)
  return Run(workdir, config, s.task, s.mesh, s.rules,
             nnx.merge(s.graphdef, state), int(step))


def serving(run: Run) -> Run:
  """`run` as `generate` / `accompany` use it: its model's stack weights
  quantized in place when config.sample.weights is int8 / int4 (weight-only
  inference; nn/lora.py), unchanged when float."""
  from musicjax.nn import lora
  weights = run.config.get('sample', {}).get('weights', 'float')
  if weights not in lora.SERVING:
    raise ConfigError(f'config.sample.weights must be one of {lora.SERVING}, '
                      f'got {weights!r}')
  if weights != 'float':
    with run.activate():
      lora.quantize_stacks(run.model, weights, int(run.config.lora.int4_group))
  return run


def check_same_model(config: ml_collections.ConfigDict, workdir: str, *,
                     expect: str | Iterable[str], flag: str,
                     free_keys: Iterable[str] = (),
                     sections: Iterable[str] = ('model',),
                     hint: str = '') -> ml_collections.ConfigDict:
  """The config of the run in `workdir`, after checking that `config.model`
  describes the network it trained, so that a new run can start from its
  weights.

  Args:
    config: the new run's config.
    workdir: the earlier run.
    expect: the task(s) whose checkpoints hold that network.
    flag: the config key naming `workdir` ('config.init.workdir').
    free_keys: config.model keys that may differ: they change neither the
      weights' shapes nor the function the network computes (dtype, remat).
    sections: the config sections that describe the network ('model'; the
      codec's 'disc' too); keys of other sections than 'model' are named
      with their section in `free_keys` ('disc.periods').
    hint: appended to the error (e.g. how to allow a difference on purpose).

  Raises:
    ConfigError: as `saved_config`, or naming the first config.model key that
      differs and the value that run was trained with.
  """
  theirs_config = saved_config(workdir, expect, flag=flag)
  free = set(free_keys)
  for section in sections:
    ours = config_lib.flatten(config.get(section, ml_collections.ConfigDict()))
    theirs = config_lib.flatten(
        theirs_config.get(section, ml_collections.ConfigDict()))
    prefix = '' if section == 'model' else f'{section}.'
    for key in sorted(set(ours) | set(theirs)):
      if prefix + key in free or ours.get(key) == theirs.get(key):
        continue
      raise ConfigError(
          f'config.{section}.{key} = {ours.get(key)!r}, but the run in '
          f'{workdir} ({flag}) was trained with {theirs.get(key)!r}; this run '
          f'starts from its weights, so the network must match: set '
          f'--config.{section}.{key}={theirs.get(key)!r}{hint}')
  return theirs_config
