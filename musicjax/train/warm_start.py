"""Warm start: a fresh run of any task starts from another run's weights.

`config.init.workdir` names a run: trained (`musicjax train`) or imported
(`musicjax import-*`, a run with one checkpoint at step 0). A fresh run
restores the task's weight subtrees (`Task.warm_start_subtrees`: the LM's
`model`, the codec's `generator` and `discriminator`) from that run's latest
checkpoint; its optimizer, step counter and data position start fresh. A
resumed run restores its own checkpoint and ignores `init`.

What may differ between the two runs:
  * every section but the network's (`Task.arch_sections`: config.model, the
    codec's config.disc): loss weights, optimizer and learning rate, data,
    train keys;
  * config.model keys in the task's `free_model_keys` (dtype, remat, init
    std: they change neither the weights' shapes nor the function computed);
  * keys named in `init.model_changes`, on purpose (e.g. one that adds a
    head). The weights are then checked one by one: each weight both have
    must have one shape; a weight only the new run has starts fresh only
    when a pattern of `init.new_params` matches its path ('model/uncond_embed',
    fnmatch syntax); a weight only the earlier run has is an error.
All of it is checked by `plan` from the two configs alone, before anything is
compiled; `apply` then reads only the weights it needs.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
from typing import Any

import jax
import ml_collections
from flax import nnx

from musicjax import config as config_lib
from musicjax import tasks
from musicjax.config import ConfigError
from musicjax.nn import lora
from musicjax.parallel import distributed
from musicjax.train import adapter_runs
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import runs


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a warm start restores, decided from the two configs."""
  workdir: str
  flag: str                       # the config key naming `workdir`
  source: ml_collections.ConfigDict
  restored: tuple[str, ...]       # weight paths read from the earlier run
  fresh: tuple[str, ...]          # weight paths that start from their init
  made: tuple[str, ...] = ()      # a LoRA run's adapters and scales (its own)


def paths(tree: Any) -> dict[str, Any]:
  """{'model/backbone/norm/scale': leaf} of a pure-dict tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in kp): v
          for kp, v in flat}


def _abstract_state(task) -> nnx.State:
  """The task's state of ShapeDtypeStructs (no arrays)."""
  with nnx.use_eager_sharding(False):
    return nnx.state(nnx.eval_shape(
        lambda: task.create_state(nnx.Rngs(task.config.train.seed))))


def _weights(state: nnx.State, subtrees) -> dict[str, Any]:
  """Path -> leaf of `subtrees` of `state`."""
  pure = nnx.to_pure_dict(state)
  return paths({k: pure[k] for k in subtrees if k in pure})


def _short(items, n: int = 6) -> str:
  items = sorted(items)
  more = f' (and {len(items) - n} more)' if len(items) > n else ''
  return ', '.join(items[:n]) + more


def plan(task, abstract_state: Any | None = None) -> Plan | None:
  """Checks a warm start of `task` from its init run; None without one.

  Raises:
    ConfigError: the init run is missing, of another task, trained with
      another network (naming the key), or its weights do not fit this
      run's (naming the weights and the `init` key that would allow it).
  """
  workdir, flag = task.init_source()
  config = task.config
  subtrees = tuple(task.warm_start_subtrees)
  if not workdir:
    return None
  workdir = os.path.expanduser(workdir)
  init = config.init
  model_keys = set(config_lib.flatten(config.model))
  for key in init.model_changes:
    if key not in model_keys:
      raise ConfigError(f'config.init.model_changes names {key!r}, which is no '
                        f'config.model key of task {config.task!r}')
  free = tuple(task.free_model_keys) + tuple(init.model_changes)
  source_config = runs.saved_config(workdir, flag=flag)
  if lora.enabled(source_config):
    raise ConfigError(
        f'{flag}={workdir} is a LoRA run: its checkpoints hold only adapters. '
        f'Fold them into a plain run first: musicjax merge-lora --workdir '
        f'{workdir} --out MERGED, then start from MERGED')
  source = runs.check_same_model(
      config, workdir, expect=tuple(task.warm_start_tasks) or (task.name,),
      flag=flag, free_keys=free, sections=task.arch_sections,
      hint=(' (or, to change the network on purpose, name the key in '
            "--config.init.model_changes=\"('KEY',)\")"))
  if abstract_state is None:
    abstract_state = _abstract_state(task)
  ours = _weights(abstract_state, subtrees)
  theirs = _weights(_abstract_state(tasks.get(source.task)(source)), subtrees)
  # A LoRA run's adapters and quantization scales are its own (fresh).
  made = adapter_runs.made_paths(abstract_state) - set(theirs)
  for p in adapter_runs.quantized_paths(abstract_state) & set(ours):
    ours[p] = jax.ShapeDtypeStruct(           # compared as the float weight
        lora.float_shape(ours[p], ours[p + '_scale']), jax.numpy.float32)
  for p in sorted(set(ours) & set(theirs)):
    if tuple(ours[p].shape) != tuple(theirs[p].shape):
      raise ConfigError(
          f'weight {p} has shape {tuple(ours[p].shape)} here but '
          f'{tuple(theirs[p].shape)} in {workdir} ({flag}): it cannot start '
          f'from that run; undo the config.model change '
          f'(config.init.model_changes={tuple(init.model_changes)!r})')
  dropped = set(theirs) - set(ours)
  if dropped:
    raise ConfigError(
        f'the run in {workdir} ({flag}) has weights this run lacks: '
        f'{_short(dropped)}; they would be dropped. Start from a run of the '
        f'same network (config.init.model_changes='
        f'{tuple(init.model_changes)!r})')
  new = set(ours) - set(theirs) - made
  unmatched = [p for p in new
               if not any(fnmatch.fnmatchcase(p, pat) for pat in init.new_params)]
  if unmatched:
    raise ConfigError(
        f'this run has weights the run in {workdir} ({flag}) lacks: '
        f'{_short(unmatched)}. To start them fresh, name them: '
        f"--config.init.new_params=\"('{sorted(unmatched)[0]}',)\" "
        '(fnmatch patterns of these paths)')
  for pat in init.new_params:
    if not any(fnmatch.fnmatchcase(p, pat) for p in new):
      raise ConfigError(
          f'config.init.new_params pattern {pat!r} matches none of the weights '
          f'this run has and the run in {workdir} lacks '
          f'({_short(new) if new else "there are none"})')
  return Plan(workdir, flag, source, tuple(sorted(set(ours) & set(theirs))),
              tuple(sorted(new)), tuple(sorted(made)))


def _parent(tree: dict, path: str) -> tuple[dict, str]:
  """(the dict holding `path`'s leaf in the pure-dict `tree`, its key)."""
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree[p] if p in tree else tree[int(p)]
  return tree, leaf


def apply(task, state: nnx.State, shardings: Any,
          p: Plan | None = None) -> nnx.State:
  """`state` (fresh, sharded) with the planned weights read from the init
  run, on `shardings`; unchanged without an init run."""
  p = p or plan(task, state)
  if p is None:
    return state
  subtrees = tuple(task.warm_start_subtrees)
  target = {k: ckpt_lib.abstract_target(state[k], shardings[k])
            for k in subtrees}
  target = adapter_runs.drop(target, set(p.fresh + p.made))
  # A QLoRA base is read as the floats it was saved as, then quantized.
  quantized = sorted(adapter_runs.quantized_paths(state))
  flat_state = dict(adapter_runs.flat_variables(state))
  for path in quantized:
    node, leaf = _parent(target, path)
    scale = flat_state[path + '_scale'].get_value()
    node[leaf] = jax.ShapeDtypeStruct(lora.float_shape(node[leaf], scale),
                                      jax.numpy.float32,
                                      sharding=node[leaf].sharding)
  restored, step = ckpt_lib.restore_partial(p.workdir, p.source.checkpoint.keep,
                                            target)
  for path in quantized:
    node, leaf = _parent(restored, path)
    node[leaf], node[leaf + '_scale'] = lora.requantize(
        node[leaf], flat_state[path], flat_state[path + '_scale'])
  task.warm_start_step = step    # a LoRA run records its base's step
  for k in subtrees:
    nnx.replace_by_pure_dict(state[k], restored[k])
  if distributed.is_primary():
    fresh = f'; fresh: {_short(p.fresh)}' if p.fresh else ''
    if p.made:
      fresh += f'; {len(p.made)} LoRA adapter and scale arrays of its own'
    print(f'[warm start] {", ".join(subtrees)} from {p.workdir} step {step} '
          f'({len(p.restored)} weights){fresh}', file=sys.stderr, flush=True)
  return jax.device_put(state, shardings)
