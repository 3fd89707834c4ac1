"""Opening a run made by `musicjax import-heartmula` for generation.

Such a run holds RUN/released/ (import_heartmula.py): the tokenizer and
gen_config.json it was released with, and heartmula.json, which records
where HeartCodec's folder was. `open_song` restores the LM and loads that
HeartCodec (or the folder given instead) into lm.heartmula_song.ReleasedSong.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from musicjax.errors import UserError
from musicjax.export import import_heartmula as imp
from musicjax.export.released import heartcodec
from musicjax.lm import heartmula_song
from musicjax.train import runs


def record_path(workdir: str) -> str:
  return os.path.join(workdir, imp.RELEASED, imp.RECORD)


def is_released(workdir: str) -> bool:
  """Whether `workdir` was made by import-heartmula (it has the record)."""
  return os.path.isfile(record_path(workdir))


def read_record(workdir: str) -> dict[str, Any]:
  path = record_path(workdir)
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: cannot read it ({e}); re-run musicjax '
                    'import-heartmula for this run') from None


def _released_file(workdir: str, name: str) -> str:
  path = os.path.join(workdir, imp.RELEASED, name)
  if not os.path.isfile(path):
    raise UserError(
        f'{path} not found: the released folder this run was imported from '
        f'had no {name}; copy it there from the HeartMuLa release')
  return path


def open_song(workdir: str, config: ml_collections.ConfigDict | None = None,
              codec_folder: str | None = None, step: int | None = None
              ) -> heartmula_song.ReleasedSong:
  """The run `workdir` (its latest checkpoint, or `step`), its tokenizer and
  gen_config, and HeartCodec from `codec_folder` or the one recorded."""
  record = read_record(workdir)
  tokenizer = _released_file(workdir, 'tokenizer.json')
  gen_config = _released_file(workdir, 'gen_config.json')
  folder = codec_folder or record.get('heartcodec') or ''
  if not folder or not os.path.isdir(folder):
    where = (f'the HeartCodec folder {folder!r} recorded in '
             f'{record_path(workdir)} is not there' if not codec_folder else
             f'--codec-workdir {codec_folder}: no such directory')
    raise UserError(f'{where}: pass --codec-workdir with the released '
                    'HeartCodec-oss folder')
  run = runs.serving(runs.load_run(workdir, step, config=config,
                                   expect=('lm', 'lm_dpo'), verb='generate'))
  return heartmula_song.ReleasedSong(run, tokenizer, gen_config,
                                     heartcodec.load(folder), folder)
