"""`musicjax import-torch`: an export (possibly fine-tuned in PyTorch) back
into an Orbax checkpoint that `musicjax train/generate/eval` use.

The run's config is the exported run's (config.json "run_config"), or
--config when given (its `model` must then describe the same network; other
sections such as data paths are yours). The checkpoint holds the imported model, a fresh optimizer and the
export's step; there is no data position, so training continues from the
start of the data. The mesh is this machine's (Orbax reshards on restore).
The run is written atomically: a failed import leaves no WORKDIR.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from musicjax import config as config_lib
from musicjax.errors import UserError
from musicjax.export import export as export_lib
from musicjax.export import files
from musicjax.export import mapping
from musicjax.train import new_run
from musicjax.train import trainer


class ImportError_(UserError, ValueError):  # pylint: disable=invalid-name
  """An export that does not fit the model; the message names the tensor."""


def read_meta(export_dir: str) -> dict[str, Any]:
  path = os.path.join(export_dir, 'config.json')
  if not os.path.isfile(path):
    raise ImportError_(f'{path}: missing; --from must be a directory written by '
                       '`musicjax export` or musicjax_torch.save_pretrained')
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise ImportError_(f'{path}: not JSON ({e})') from None
  if meta.get('format') != export_lib.FORMAT:
    raise ImportError_(f'{path}: format {meta.get("format")!r} is not '
                       f'{export_lib.FORMAT!r}')
  if meta.get('family') not in mapping.FAMILIES:
    raise ImportError_(f'{path}: unknown family {meta.get("family")!r}')
  return meta


def run_config(meta: dict[str, Any], workdir: str,
               config: ml_collections.ConfigDict | None = None
               ) -> ml_collections.ConfigDict:
  """The new run's config, saved as `workdir`/config.json: the exported
  run's (config.json "run_config"), or `config` whose model must match."""
  if config is None:
    if 'run_config' not in meta:
      raise ImportError_('the export has no "run_config" in config.json; pass '
                         '--config configs/<family>/<name>.py for the run')
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(meta['run_config'], f, indent=2)
    return config_lib.load_saved(workdir)
  mine = json.dumps(_jsonable(config.model.to_dict()), sort_keys=True)
  theirs = json.dumps(_jsonable(meta['model']), sort_keys=True)
  if mine != theirs:
    raise ImportError_('--config describes another model than the export '
                       '(config.model differs from the export\'s config.json '
                       '"model"); drop --config to use the export\'s run config')
  config_lib.save(config, workdir)
  return config


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def load_into(model: nnx.Module, fam: str, export_dir: str) -> None:
  """Overwrites every state array of `model` with the export's tensors
  (cast to the model's dtypes); errors name the tensor."""
  get, names = files.reader(export_dir)
  used: set[str] = set()

  def tracked(name):
    used.add(name)
    return get(name)

  _, state = nnx.split(model)
  new = {}
  for path, x in export_lib.state_paths(model).items():
    arr = np.asarray(mapping.import_array(fam, path, tuple(x.shape), tracked))
    if (arr.dtype == np.bool_) != (np.dtype(x.dtype) == np.bool_):
      raise ImportError_(f'{export_dir}: tensor for {path} has dtype {arr.dtype}, '
                         f'the model holds {x.dtype}')
    new[path] = arr.astype(np.dtype(x.dtype))
  extra = sorted(set(names) - used)
  if extra:
    raise ImportError_(f'{export_dir}: tensors the model does not have: '
                       f'{", ".join(extra[:5])}{" ..." if len(extra) > 5 else ""} '
                       '(an export of another architecture?)')

  def put(path, leaf):
    value = new[export_lib.path_key(path)]
    if isinstance(leaf, jax.Array) and hasattr(leaf, 'sharding'):
      return jax.device_put(value, leaf.sharding)
    return value

  pure = jax.tree_util.tree_map_with_path(put, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def import_export(export_dir: str, workdir: str,
                  config: ml_collections.ConfigDict | None = None
                  ) -> dict[str, Any]:
  """Writes the new run `workdir` (config.json and a checkpoint at the
  export's step), atomically (train/new_run.py)."""
  meta = read_meta(export_dir)
  step = int(meta.get('step', 0))
  with new_run.atomic_workdir(workdir) as tmp:
    config = run_config(meta, tmp, config)
    fam = export_lib.family(config)
    if fam != meta['family']:
      raise ImportError_(f'the export is a {meta["family"]}, the config a {fam}')
    s = trainer.setup(config)
    with jax.set_mesh(s.mesh):
      state = trainer.init_state(s)
      module = nnx.merge(s.graphdef, state)
      load_into(s.task.inference_model(module), fam, export_dir)
      _, state = nnx.split(module)
      new_run.write(tmp, config, state, step)
  return {'workdir': workdir, 'family': fam, 'step': step,
          'from': os.path.abspath(export_dir)}
