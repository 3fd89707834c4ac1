"""`musicjax import-musicgen`: a released MusicGen folder (transformers'
`MusicgenForConditionalGeneration`, e.g. a download of facebook/musicgen-small,
or `MusicgenMelodyForConditionalGeneration`, facebook/musicgen-melody)
-> a musicjax LM run (config.json + an Orbax checkpoint at step 0) that
`generate`, `train` (fine-tuning), `eval` and `export` use.

The run's config is built from the folder's config.json
(released/musicgen.py); `--config.a.b=value` overrides may change what
does not change the network (sampling, data, training). The LM (decoder,
T5 text encoder and the projection between them) streams into its
shardings (streamed.py). The folder's EnCodec ('audio_encoder.*') becomes a
codec run of its own at RUN/codec (released/encodec.py), which `generate`
decodes with and `encode` / `decode` / `train` take like any codec run.
config.json, generation_config.json and the tokenizer files are kept in
RUN/released/ (for `generate --text` and `export-musicgen`), beside
musicgen.json, which records the folder. A MusicGen-Melody folder's
preprocessor_config.json (its chroma settings, which `generate --melody`
reads) is checked against config.json's num_chroma. All of it is written
atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

import jax
import ml_collections

from musicjax import config as config_lib
from musicjax.errors import UserError
from musicjax.export import import_codec
from musicjax.export import streamed
from musicjax.export.released import encodec
from musicjax.export.released import musicgen
from musicjax.export.released import reader as reader_lib
from musicjax.lm import musicgen_chroma
from musicjax.train import new_run

RELEASED = 'released'           # the run's folder of released files
RECORD = 'musicgen.json'        # in it: where everything came from
TOKENIZER = 'tokenizer.json'
CODEC = 'codec'                 # RUN/codec: the EnCodec as a codec run
# Kept in RUN/released/ when the folder has them (export-musicgen writes
# them back): the configs and the T5 tokenizer's files.
KEPT = (musicgen.M.CONFIG, musicgen.GENERATION, TOKENIZER,
        'tokenizer_config.json', 'special_tokens_map.json', 'spiece.model',
        'preprocessor_config.json')


def run_config(folder: str, overrides: Iterable[str] = ()
               ) -> ml_collections.ConfigDict:
  """The folder's config with `overrides`, which must keep the network."""
  return _configs(folder, overrides)[0]


def _configs(folder: str, overrides: Iterable[str]
             ) -> tuple[ml_collections.ConfigDict, dict]:
  """(run_config, the folder's config.json), the file read once."""
  c, d = musicgen.read_config(folder)
  model = c.model.to_dict()
  c = config_lib.apply_overrides(c, list(overrides))
  config_lib.validate(c, config_lib.schema_for(c))
  if c.model.to_dict() != model:
    raise musicgen.MusicGenWeightsError(
        'an override changes config.model, which the folder\'s config.json '
        'fixes; override sampling, data or training keys only')
  return c, d


def import_folder(from_dir: str, workdir: str,
                  overrides: Iterable[str] = ()) -> dict[str, Any]:
  """Writes the LM run `workdir` from a MusicGen folder.

  Raises:
    MusicGenWeightsError / ConfigError: naming the file and the tensor, or
      the key.
    NewRunError: `workdir` is taken.
  """
  if not os.path.isdir(from_dir):
    raise musicgen.MusicGenWeightsError(f'--from {from_dir}: no such '
                                        'directory')
  from_dir = os.path.abspath(from_dir)
  c, d = _configs(from_dir, overrides)
  if not c.data.tokenizer and os.path.isfile(os.path.join(from_dir, TOKENIZER)):
    # Fine-tuning reads descriptions in T5's tokens: the copy kept in the run.
    c.data.tokenizer = os.path.join(os.path.abspath(workdir), RELEASED,
                                    TOKENIZER)
  codec_c, theirs = codec_config(d, os.path.join(from_dir, musicgen.M.CONFIG),
                                 c)
  check_chroma(from_dir, c)
  reader = musicgen.reader(from_dir)
  codec_reader = encodec.Renamed(reader_lib.Prefixed(reader,
                                                     musicgen.CODEC_PREFIX))
  kept = [n for n in KEPT if os.path.isfile(os.path.join(from_dir, n))]
  with new_run.atomic_workdir(workdir) as tmp:
    streamed.write_run(tmp, c, lambda state, place: musicgen.read_arrays(
        from_dir, c, state, place))
    codec_dir = os.path.join(tmp, CODEC)
    streamed.write_run(codec_dir, codec_c, lambda state, place:
                       encodec.read_arrays(codec_reader, codec_c, state, place),
                       key=import_codec.GENERATOR)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(tmp, RELEASED))
      for name in kept:
        shutil.copyfile(os.path.join(from_dir, name),
                        os.path.join(tmp, RELEASED, name))
      tok = os.path.join(RELEASED, TOKENIZER) if TOKENIZER in kept else None
      with open(os.path.join(tmp, RELEASED, RECORD), 'w') as f:
        json.dump({'musicgen': from_dir, 'tokenizer': tok, 'codec': CODEC},
                  f, indent=2)
      os.makedirs(os.path.join(codec_dir, import_codec.RELEASED))
      with open(os.path.join(codec_dir, import_codec.RELEASED,
                             import_codec.record_name('encodec')), 'w') as f:
        json.dump({'encodec': from_dir, 'target_bandwidths': [
            float(b) for b in theirs['target_bandwidths']]}, f, indent=2)
  return {'workdir': workdir, 'from': from_dir, 'step': 0,
          'codec': os.path.join(workdir, CODEC), 'kept': kept,
          'sample_rate': int(codec_c.data.sample_rate)}


def check_chroma(folder: str, c: ml_collections.ConfigDict) -> None:
  """A MusicGen-Melody folder's preprocessor_config.json (if any) gives the
  chroma classes its config.json's num_chroma says."""
  if c.model.get('conditioning', 'cross') != 'prefix':
    return
  path = os.path.join(folder, musicgen_chroma.PREPROCESSOR)
  try:
    s = musicgen_chroma.ChromaSettings.from_file(path)
  except UserError as err:   # naming the file and the key
    raise musicgen.MusicGenWeightsError(str(err)) from None
  if s.num_chroma != int(c.model.chroma_bins):
    raise musicgen.MusicGenWeightsError(
        f'{path}: num_chroma is {s.num_chroma}, but config.json\'s '
        f'num_chroma is {c.model.chroma_bins}')


def codec_config(d: dict, path: str, lm: ml_collections.ConfigDict
                 ) -> tuple[ml_collections.ConfigDict, dict]:
  """(our codec config, EnCodec's sub-config) of MusicGen's config.json `d`
  (read from `path`)'s audio_encoder; its codes must be the LM's."""
  theirs = d.get('audio_encoder')
  if not isinstance(theirs, dict):
    raise musicgen.MusicGenWeightsError(f'{path}: no "audio_encoder" config')
  c = encodec.run_config(theirs, f'{path} "audio_encoder"')
  q, m = c.model.rvq, lm.model
  if (int(q.num_codebooks), int(q.codebook_size)) != (int(m.num_codebooks),
                                                      int(m.codebook_size)):
    raise musicgen.MusicGenWeightsError(
        f'{path}: the audio_encoder makes {q.num_codebooks} x '
        f'{q.codebook_size} codes, the decoder reads {m.num_codebooks} x '
        f'{m.codebook_size}')
  c.data.batch_size = lm.data.batch_size       # one mesh for both runs
  c.data.eval_batch_size = lm.data.eval_batch_size
  return c, theirs
