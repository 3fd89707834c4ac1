"""Writing an imported model as a run: its weights streamed from the files
into their target shardings on this machine's mesh, one array at a time
(mapping.load_arrays), so neither the whole model on one device nor a
second host copy ever exists; the optimizer (and anything else the task
holds) starts fresh. The import verbs share this."""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from musicjax.export.released import mapping
from musicjax.train import new_run
from musicjax.train import trainer

# read(abstract model state, place) -> the model's pure dict of placed arrays.
Reader = Callable[[Any, Callable[[str, np.ndarray], jax.Array]], dict]


def write_run(workdir: str, config: ml_collections.ConfigDict, read: Reader,
              key: str = 'model') -> None:
  """Writes config.json and a step-0 checkpoint of `config`'s task state into
  `workdir` (an atomic_workdir's staging folder), with the `key` subtree
  (the task's model) from `read`."""
  s = trainer.setup(config)
  shardings = {
      mapping.path_key(p): sh for p, sh in
      jax.tree_util.tree_leaves_with_path(
          nnx.to_pure_dict(s.state_shardings)[key])}

  def place(path: str, value: np.ndarray) -> jax.Array:
    # Each device gets its slice of the host value; works on several
    # processes too (each reads the same file).
    return jax.make_array_from_callback(value.shape, shardings[path],
                                        lambda index: value[index])

  with jax.set_mesh(s.mesh):
    model = read(s.abstract_state[key], place)
    state = new_run.state_with_model(s, model, key=key)
    new_run.write(workdir, config, state, 0)
