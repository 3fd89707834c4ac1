"""`musicjax import-dac`: a released DAC (transformers' DacModel folder) ->
a musicjax codec run (config.json + an Orbax checkpoint at step 0) that
`encode`, `decode`, `codec-quality`, `eval` and `train` (fine-tuning) use.

The run's config is built from the folder's config.json
(released/dac.py), or is --config, whose model must describe the folder.
Weights stream into their shardings on this machine's mesh one array at a
time; the optimizers and the discriminator start fresh (DAC's released
files hold no discriminator). The run is written atomically
(train/new_run.py), and RUN/released/dac.json records the folder read.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import jax
import ml_collections
from flax import nnx

from musicjax import config as config_lib
from musicjax.export.released import dac
from musicjax.export.released import mapping
from musicjax.train import new_run
from musicjax.train import trainer

RELEASED = 'released'           # the run's folder of released files
RECORD = 'dac.json'             # in it: where the weights came from
GENERATOR = 'generator'         # the codec state's inference model


def run_config(folder: str, config: str | None = None,
               overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The run's config: `config` (a path or shipped name) with `overrides`,
  or the one config.json describes with them; checked against config.json."""
  if config is not None:
    return dac.read_config(folder, config_lib.load(config, list(overrides)))
  c = config_lib.apply_overrides(dac.read_config(folder), list(overrides))
  config_lib.validate(c, config_lib.schema_for(c))
  return dac.read_config(folder, c)   # overrides must keep the network


def import_folder(from_dir: str, workdir: str, config: str | None = None,
                  overrides: Iterable[str] = ()) -> dict[str, Any]:
  """Writes the codec run `workdir` from a DAC folder.

  Args:
    from_dir: config.json + model.safetensors (released/dac.py).
    workdir: the new run; must not exist, or be empty.
    config: our codec config (path or shipped name); None: config.json's.
    overrides: '--config.a.b=value' changes of that config.

  Returns:
    What was written (JSON-able).

  Raises:
    DacWeightsError / ConfigError: naming the file and tensor, or the key.
    NewRunError: `workdir` is taken.
  """
  if not (os.path.isdir(from_dir) or dac.is_descript(from_dir)):
    raise dac.DacWeightsError(f'--from {from_dir}: neither a directory nor a '
                              f'descript {dac.PTH} file')
  c = run_config(from_dir, config, overrides)
  reader = dac.open_weights(from_dir)
  with new_run.atomic_workdir(workdir) as tmp:
    s = trainer.setup(c)
    shardings = {
        mapping.path_key(p): sh for p, sh in
        jax.tree_util.tree_leaves_with_path(
            nnx.to_pure_dict(s.state_shardings)[GENERATOR])}

    def place(key, value):
      return jax.make_array_from_callback(value.shape, shardings[key],
                                          lambda index: value[index])

    with jax.set_mesh(s.mesh):
      model = dac.read_arrays(reader, c, s.abstract_state[GENERATOR], place)
      state = new_run.state_with_model(s, model, key=GENERATOR)
      new_run.write(tmp, c, state, 0)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(tmp, RELEASED))
      with open(os.path.join(tmp, RELEASED, RECORD), 'w') as f:
        json.dump({'dac': os.path.abspath(from_dir)}, f, indent=2)
  return {'workdir': workdir, 'from': os.path.abspath(from_dir), 'step': 0,
          'sample_rate': int(c.data.sample_rate),
          'num_codebooks': int(c.model.rvq.num_codebooks)}
