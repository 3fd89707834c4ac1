"""A new run made from given weights rather than by training: what the
import verbs (`musicjax import-torch`, `musicjax import-heartmula`) write.

The run is an ordinary one (config.json and checkpoints/, see runs.py): one
checkpoint of the task's whole state, its model from the weights and the
rest (optimizer moments, counters) as a fresh run starts, so `musicjax train`
resumes it (fine-tuning), and `eval`, `export` and `generate` load it.

It appears atomically: everything is written into a temporary sibling
directory renamed to the run's name at the end, so a failed import leaves
no half-written run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

import jax
import ml_collections
from flax import nnx

from musicjax import config as config_lib
from musicjax.errors import UserError
from musicjax.parallel import distributed
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import trainer


class NewRunError(UserError, ValueError):
  """The run's directory cannot be made (taken, or not a local path)."""


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def staging_dir(workdir: str) -> str:
  """The temporary sibling a new `workdir` is written into (the same name
  on every process)."""
  parent, base = os.path.split(os.path.abspath(workdir))
  return os.path.join(parent, f'.{base}.importing')


@contextlib.contextmanager
def atomic_workdir(workdir: str) -> Iterator[str]:
  """Yields a fresh temporary directory that becomes `workdir` when the
  block succeeds, and is removed when it fails.

  Raises:
    NewRunError: `workdir` exists and is not empty (nothing is overwritten),
      or is not a local path.
  """
  if '://' in workdir:
    raise NewRunError(f'--workdir {workdir}: import into a local directory, '
                      'then copy it')
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise NewRunError(f'--workdir {workdir} already exists and is not empty; '
                      'import into a new directory')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NewRunError(f'--workdir {workdir} is a file')
  tmp = staging_dir(workdir)
  primary = distributed.is_primary()
  if primary:
    # Left by an import that was killed before it could clean up.
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  _sync('new_run:staged')
  try:
    yield tmp
    _sync('new_run:written')
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if primary:
    if os.path.isdir(workdir):
      os.rmdir(workdir)   # empty (checked above); rename needs it gone
    os.rename(tmp, workdir)
  _sync('new_run:renamed')


def state_with_model(s: trainer.Setup, model: dict, key: str = 'model'
                     ) -> nnx.State:
  """The task's whole state with `model` (the pure dict of its `key`
  subtree, arrays already on their shardings) and everything else fresh.

  One jit of `task.create_state` whose own random model is replaced by
  `model` (donated): XLA drops the unused initialisation, and the optimizer
  moments (zeros of the parameters' shapes) are made on their shardings, so
  no second copy of the model is ever allocated. Run under
  `jax.set_mesh(s.mesh)`.
  """
  task, seed = s.task, s.config.train.seed
  model_shardings = nnx.to_pure_dict(s.state_shardings)[key]

  def create(arrays):
    with nnx.use_eager_sharding(False):
      state = nnx.state(task.create_state(nnx.Rngs(seed)))
    pure = nnx.to_pure_dict(state)
    pure[key] = arrays
    nnx.replace_by_pure_dict(state, pure)
    return state

  return jax.jit(create, in_shardings=(model_shardings,),
                 out_shardings=s.state_shardings, donate_argnums=0)(model)


def write(workdir: str, config: ml_collections.ConfigDict, state: nnx.State,
          step: int) -> None:
  """config.json and one checkpoint of `state` at `step` (no data position:
  training continues from the start of the data)."""
  if distributed.is_primary():
    config_lib.save(config, workdir)
  manager = ckpt_lib.make_manager(workdir, config.checkpoint.keep, False)
  try:
    ckpt_lib.save(manager, step, state, None, None, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
