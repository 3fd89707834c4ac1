"""Orbax checkpoints under WORKDIR/checkpoints: train state + Grain iterator state.

The state is stored as a plain nested dict of arrays (`nnx.to_pure_dict`), so
the on-disk layout doesn't depend on NNX Variable classes. Restore always goes
against the *current* abstract state with its target shardings: a checkpoint
written on one mesh / device count / process count restores onto any other.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from musicjax.config import ConfigError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir),
                               item_names=('state', 'data', 'meta'), options=options)


def has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
  """Whether `step` saved `item` ('data', 'meta'). Read from the step's
  directory (epath: local or gs://): `manager.item_metadata` logs a warning per
  item for managers built from item names, a wall of noise in notebooks."""
  return (manager.directory / str(step) / item).exists()


def abstract_target(abstract_state: nnx.State, shardings: Any) -> dict:
  """Pure-dict tree of ShapeDtypeStructs carrying the target shardings."""
  def one(var, sharding):
    v = var.get_value() if isinstance(var, nnx.Variable) else var
    return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
  tree = jax.tree.map(one, abstract_state, shardings,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree)


def _without(pure: dict, leave_out: set[str]) -> dict:
  from musicjax.train import adapter_runs
  return adapter_runs.drop(pure, leave_out) if leave_out else pure


def save(manager: ocp.CheckpointManager, step: int, state: nnx.State,
         data_iter: Any | None, meta: dict | None = None,
         force: bool = False, leave_out: set[str] = frozenset()) -> bool:
  """Starts an (async) save of state (but the `leave_out` paths: a LoRA
  run's frozen base), iterator state and small JSON `meta`."""
  items = {'state': ocp.args.StandardSave(
      _without(nnx.to_pure_dict(state), leave_out))}
  if meta is not None:
    items['meta'] = ocp.args.JsonSave(meta)
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: nnx.State,
            shardings: Any, data_iter: Any | None = None,
            base: nnx.State | None = None,
            leave_out: set[str] = frozenset()) -> nnx.State:
  """Restores `step` onto `shardings`; also rewinds `data_iter` when given.
  With `base` (a LoRA run's state with its frozen weights in place), the
  checkpoint holds all but the `leave_out` paths, restored into `base`."""
  items = {'state': ocp.args.StandardRestore(
      _without(abstract_target(abstract_state, shardings), leave_out))}
  if data_iter is not None and has_item(manager, step, 'data'):
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  elif data_iter is not None:
    # A checkpoint made by `musicjax import-torch` has weights only.
    print(f'[checkpoint] step {step} has no data position: the data starts '
          'from the beginning', file=sys.stderr, flush=True)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  state = jax.tree.map(lambda x: x, abstract_state if base is None else base,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.replace_by_pure_dict(state, restored['state'])
  return state


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON `meta` saved with `step` ({} when the checkpoint has none)."""
  if not has_item(manager, step, 'meta'):
    return {}
  return dict(manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])


def latest_step_or_raise(manager: ocp.CheckpointManager, workdir: str,
                         step: int | None = None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise ConfigError(f'no checkpoint in {checkpoint_dir(workdir)}: train first '
                      '(`musicjax train --workdir ...`)')
  if step is None:
    return max(steps)
  if step not in steps:
    raise ConfigError(f'checkpoint step {step} not in {checkpoint_dir(workdir)}; '
                      f'available: {sorted(steps)}')
  return step


def restore_subtree(workdir: str, keep: int, key: str, abstract: nnx.State,
                    shardings: Any) -> tuple[dict, int]:
  """(pure dict of `state[key]` at the latest step of `workdir`, that step).

  Only that subtree is read (partial restore), on `shardings`: e.g. a
  fine-tuning run takes a finished run's model weights without ever loading
  its optimizer moments.
  """
  restored, step = restore_partial(
      workdir, keep, {key: abstract_target(abstract, shardings)})
  return restored[key], step


def restore_partial(workdir: str, keep: int, target: dict) -> tuple[dict, int]:
  """(the leaves of `target` read from the latest step of `workdir`, that step).

  `target` is a pure-dict tree of ShapeDtypeStructs (with shardings) naming
  any subset of the checkpoint's state, at any depth; nothing else is read.
  """
  manager = make_manager(workdir, keep, False)
  try:
    step = latest_step_or_raise(manager, workdir)
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))
  finally:
    manager.close()
  return restored['state'], int(step)
