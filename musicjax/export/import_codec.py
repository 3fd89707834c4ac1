"""`musicjax import-dac` / `import-encodec`: a released codec (transformers'
DacModel or EncodecModel folder) -> a musicjax codec run (config.json + an
Orbax checkpoint at step 0) that `encode`, `decode`, `codec-quality`,
`eval` and `train` (fine-tuning) use.

The run's config is built from the folder's config.json
(released/dac.py, released/encodec.py), or is --config, whose model must
describe the folder. Weights stream into their shardings on this machine's
mesh one array at a time; the optimizers and the discriminator start fresh
(the released files hold no discriminator). The run is written atomically
(train/new_run.py), and RUN/released/<family>.json records the folder read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import jax
import ml_collections

from musicjax import config as config_lib
from musicjax.export import streamed
from musicjax.export.released import dac
from musicjax.export.released import encodec
from musicjax.train import new_run

RELEASED = 'released'           # the run's folder of released files
RECORD = 'dac.json'             # in it: where the weights came from (DAC's)
GENERATOR = 'generator'         # the codec state's inference model


@dataclasses.dataclass(frozen=True)
class Family:
  """One released codec's loader (released/<name>.py), as the import uses it."""
  name: str                       # 'dac': RUN/released/dac.json
  read_config: Callable[..., ml_collections.ConfigDict]  # (folder, config=None)
  open_weights: Callable[[str], Any]
  read_arrays: Callable[..., dict]   # (reader, config, state, place)
  error: type[Exception]
  accepts: Callable[[str], bool]     # is --from something it reads
  what: str                          # what --from must be, for the error
  record: Callable[[str], dict[str, Any]] = lambda folder: {}


FAMILIES = {
    'dac': Family('dac', dac.read_config, dac.open_weights, dac.read_arrays,
                  dac.DacWeightsError,
                  lambda p: os.path.isdir(p) or dac.is_descript(p),
                  f'neither a directory nor a descript {dac.PTH} file'),
    'encodec': Family('encodec', encodec.read_config, encodec.open_weights,
                      encodec.read_arrays, encodec.EncodecWeightsError,
                      os.path.isdir, 'not a directory', encodec.record),
}


def record_name(family: str) -> str:
  return f'{family}.json'


def run_config(folder: str, config: str | None = None,
               overrides: Iterable[str] = (), family: str = 'dac'
               ) -> ml_collections.ConfigDict:
  """The run's config: `config` (a path or shipped name) with `overrides`,
  or the one config.json describes with them; checked against config.json."""
  read = FAMILIES[family].read_config
  if config is not None:
    return read(folder, config_lib.load(config, list(overrides)))
  c = config_lib.apply_overrides(read(folder), list(overrides))
  config_lib.validate(c, config_lib.schema_for(c))
  return read(folder, c)   # overrides must keep the network


def import_folder(from_dir: str, workdir: str, config: str | None = None,
                  overrides: Iterable[str] = (), family: str = 'dac'
                  ) -> dict[str, Any]:
  """Writes the codec run `workdir` from a released codec's folder.

  Args:
    from_dir: config.json + model.safetensors (released/dac.py,
      released/encodec.py).
    workdir: the new run; must not exist, or be empty.
    config: our codec config (path or shipped name); None: config.json's.
    overrides: '--config.a.b=value' changes of that config.
    family: 'dac' or 'encodec' (FAMILIES).

  Returns:
    What was written (JSON-able).

  Raises:
    DacWeightsError / EncodecWeightsError / ConfigError: naming the file and
      tensor, or the key.
    NewRunError: `workdir` is taken.
  """
  fam = FAMILIES[family]
  if not fam.accepts(from_dir):
    raise fam.error(f'--from {from_dir}: {fam.what}')
  c = run_config(from_dir, config, overrides, family)
  reader = fam.open_weights(from_dir)
  extra = fam.record(from_dir)
  with new_run.atomic_workdir(workdir) as tmp:
    streamed.write_run(tmp, c, lambda state, place: fam.read_arrays(
        reader, c, state, place), key=GENERATOR)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(tmp, RELEASED))
      with open(os.path.join(tmp, RELEASED, record_name(family)), 'w') as f:
        json.dump({family: os.path.abspath(from_dir), **extra}, f, indent=2)
  return {'workdir': workdir, 'from': os.path.abspath(from_dir), 'step': 0,
          'sample_rate': int(c.data.sample_rate),
          'num_codebooks': int(c.model.rvq.num_codebooks)}
