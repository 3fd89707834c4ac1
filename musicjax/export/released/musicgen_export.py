"""An imported (and perhaps fine-tuned) MusicGen run -> a folder that
transformers' `MusicgenForConditionalGeneration.from_pretrained` (or, for a
MusicGen-Melody run, `MusicgenMelodyForConditionalGeneration`'s, with its
preprocessor_config.json) loads: the inverse of musicgen.py.

The LM's arrays go back through the import's own mapping turned around
(mapping.export_tensors); the EnCodec tensors ('audio_encoder.*') come from
the codec run beside it (RUN/codec, or --codec-workdir) through
encodec_export.py. config.json, generation_config.json and the tokenizer
files are the ones the import kept in RUN/released/, after checking that
config.json still describes the run's model. Only runs made by
`import-musicgen` export: a config of another structure has no MusicGen
config.json to give (the error says so).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from musicjax import fileio
from musicjax.config import ConfigError
from musicjax.export import export as export_lib
from musicjax.export.released import encodec_export
from musicjax.export.released import mapping as M
from musicjax.export.released import musicgen
from musicjax.train import runs

METADATA = {'format': 'pt'}   # transformers refuses files naming no framework


def _released(workdir: str) -> str:
  from musicjax.export import import_musicgen as imp
  return os.path.join(workdir, imp.RELEASED)


def export_workdir(workdir: str, out_dir: str, step: int | None = None,
                   codec_workdir: str | None = None) -> dict[str, Any]:
  """Writes `out_dir` (config.json, model.safetensors, generation_config.json,
  the tokenizer files) from the LM run `workdir` and its codec run.

  Raises:
    ConfigError / UserError: not an imported MusicGen run, a config that no
      longer matches its config.json, or no codec run.
  """
  from musicjax.export import import_musicgen as imp
  export_lib.check_out_dir(out_dir)
  released = _released(workdir)
  theirs_path = os.path.join(released, M.CONFIG)
  if not os.path.isfile(theirs_path):
    raise ConfigError(f'{workdir}: no {theirs_path}; only a run made by '
                      'musicjax import-musicgen exports to MusicGen\'s layout')
  with open(theirs_path) as f:
    theirs = json.load(f)
  config = runs.saved_config(workdir, ('lm', 'lm_dpo'), verb='export-musicgen')
  if musicgen.config_from(theirs).model.to_dict() != config.model.to_dict():
    raise ConfigError(f'{workdir}: config.model no longer matches '
                      f'{theirs_path} (the model was changed after import)')
  codec_dir = codec_workdir or os.path.join(workdir, imp.CODEC)
  if not os.path.isdir(codec_dir):
    raise ConfigError(f'no codec run at {codec_dir}: pass --codec-workdir with '
                      'the EnCodec run of this MusicGen')
  run = runs.load_run(workdir, step, config=config, verb='export-musicgen')
  codec = runs.load_run(codec_dir, expect='codec', flag='--codec-workdir')
  with run.activate():
    arrays = {k: export_lib.to_host(x)
              for k, x in export_lib.state_paths(run.model).items()}
  with codec.activate():
    codec_arrays = {k: export_lib.to_host(x)
                    for k, x in export_lib.state_paths(codec.model).items()}
  named = M.export_tensors(musicgen.lm_mapping(config.model), arrays)
  for name, value in encodec_export.tensors(codec_arrays,
                                            codec.config).items():
    named[musicgen.CODEC_PREFIX + name] = value
  named = {n: np.ascontiguousarray(x, np.float32) for n, x in named.items()}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    fileio.write_with(os.path.join(out_dir, musicgen.SINGLE),
                      lambda tmp: save_file(named, tmp, metadata=METADATA))
    for name in sorted(os.listdir(released)):
      if name != imp.RECORD:
        fileio.write_with(os.path.join(out_dir, name), lambda tmp, n=name:
                          shutil.copyfile(os.path.join(released, n), tmp))
  return {'out': out_dir, 'format': 'musicgen', 'tensors': len(named),
          'step': run.step, 'codec': codec_dir}
