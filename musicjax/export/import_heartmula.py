"""`musicjax import-heartmula`: heartlib's released HeartMuLa folder -> a
musicjax LM run (config.json + an Orbax checkpoint at step 0) that
`generate`, `train` (fine-tuning), `eval` and `export` use.

The released folder (DIR) holds HeartMuLa-oss-<size>/ (config.json and the
safetensors weights), HeartCodec-oss/, tokenizer.json and gen_config.json;
`--from` is DIR or the HeartMuLa-oss-* folder itself (then DIR is its
parent). The run's config is the shipped one of the folder's flavors
(released/heartmula.py), or --config; its model must describe the folder.

Weights stream from the files into their target shardings on this
machine's mesh, one array at a time (streamed.py): neither the whole model
on one device nor a second host copy. The optimizer starts fresh. The run
is written atomically (train/new_run.py). tokenizer.json and
gen_config.json are copied into RUN/released/, and RUN/released/
heartmula.json records the folders read, HeartCodec's included, for
generating audio.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any, Iterable

import jax
import ml_collections

from musicjax import config as config_lib
from musicjax.export import streamed
from musicjax.export.released import heartmula
from musicjax.train import new_run

MODEL_GLOB = 'HeartMuLa-oss-*'
CODEC_GLOB = 'HeartCodec-oss*'
EXTRAS = ('tokenizer.json', 'gen_config.json')
RELEASED = 'released'           # the run's folder of released files
RECORD = 'heartmula.json'       # in it: where everything came from


@dataclasses.dataclass(frozen=True)
class Folders:
  model: str                    # config.json + safetensors
  root: str                     # the released folder (DIR)
  codec: str | None             # HeartCodec-oss*, when there
  extras: dict[str, str]        # tokenizer.json, gen_config.json, when there


def _is_model(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, heartmula.CONFIG))


def find(from_dir: str) -> Folders:
  """The released folder's parts; `from_dir` is DIR or DIR/HeartMuLa-oss-*.

  Raises:
    HeartMuLaWeightsError: no (or several) HeartMuLa folders.
  """
  err = heartmula.HeartMuLaWeightsError
  if not os.path.isdir(from_dir):
    raise err(f'--from {from_dir}: no such directory')
  from_dir = os.path.abspath(from_dir)
  if _is_model(from_dir):
    model, root = from_dir, os.path.dirname(from_dir)
  else:
    found = sorted(f for f in glob.glob(os.path.join(from_dir, MODEL_GLOB))
                   if _is_model(f))
    if not found:
      raise err(f'--from {from_dir}: neither a HeartMuLa folder ({heartmula.CONFIG}'
                f' + safetensors) nor a folder holding one ({MODEL_GLOB}/)')
    if len(found) > 1:
      raise err(f'--from {from_dir} holds several HeartMuLa folders ('
                f'{", ".join(os.path.basename(f) for f in found)}): point '
                '--from at the one to import')
    model, root = found[0], from_dir
  codecs = sorted(f for f in glob.glob(os.path.join(root, CODEC_GLOB))
                  if os.path.isdir(f))
  extras = {n: os.path.join(root, n) for n in EXTRAS
            if os.path.isfile(os.path.join(root, n))}
  return Folders(model, root, codecs[0] if codecs else None, extras)


def run_config(model_folder: str, config: str | None = None,
               overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The run's config: `config` (a path or shipped name) or the shipped one
  of the folder's flavors, with `overrides`; checked against config.json."""
  name = config or heartmula.config_name(model_folder)
  c = config_lib.load(name, list(overrides))
  if c.task != 'lm':
    raise heartmula.HeartMuLaWeightsError(
        f'--config {name} is a config for {config_lib.run_kind(c.task)}; '
        'HeartMuLa is an LM: pass an LM config (configs/lm/heartmula_*.py)')
  return heartmula.read_config(model_folder, c)


def _record(folders: Folders) -> dict[str, Any]:
  return {'heartmula': folders.model, 'heartcodec': folders.codec,
          **{n: os.path.join(RELEASED, n) for n in folders.extras}}


def import_folder(from_dir: str, workdir: str, config: str | None = None,
                  overrides: Iterable[str] = ()) -> dict[str, Any]:
  """Writes the run `workdir` from a released HeartMuLa folder.

  Args:
    from_dir: DIR, or DIR/HeartMuLa-oss-* (see module doc).
    workdir: the new run; must not exist, or be empty.
    config: our LM config (path or shipped name); None: the folder's own.
    overrides: '--config.a.b=value' changes of that config.

  Returns:
    What was written (JSON-able).

  Raises:
    HeartMuLaWeightsError: naming the file and the tensor (or key).
    NewRunError: `workdir` is taken.
  """
  folders = find(from_dir)
  c = run_config(folders.model, config, overrides)
  if not c.data.tokenizer and 'tokenizer.json' in folders.extras:
    # Fine-tuning on token data builds the released prompt with this copy.
    c.data.tokenizer = os.path.join(os.path.abspath(workdir), RELEASED,
                                    'tokenizer.json')
  with new_run.atomic_workdir(workdir) as tmp:
    streamed.write_run(tmp, c, lambda state, place: heartmula.read_arrays(
        folders.model, c, state, place))
    if jax.process_index() == 0:
      os.makedirs(os.path.join(tmp, RELEASED))
      for name, path in folders.extras.items():
        shutil.copyfile(path, os.path.join(tmp, RELEASED, name))
      with open(os.path.join(tmp, RELEASED, RECORD), 'w') as f:
        json.dump(_record(folders), f, indent=2)
  return {'workdir': workdir, 'from': folders.model, 'step': 0,
          'heartcodec': folders.codec, 'copied': sorted(folders.extras)}
