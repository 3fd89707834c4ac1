"""`musicjax prepare`: a dataset as ArrayRecord shards (audio, or codec tokens)."""
from __future__ import annotations

import json

from musicjax import config as cfg
from musicjax.cli import configs
from musicjax.cli import flags


def register(sub) -> dict:
  pr = sub.add_parser('prepare', help='write a dataset as ArrayRecord shards: audio, '
                      'or codec tokens for the LM with --codec-workdir')
  flags.add_config(pr, required=False)
  pr.add_argument('--out', required=True, help='output directory; rerun to resume')
  pr.add_argument('--codec-workdir', default=None,
                  help='a trained codec workdir: write codec tokens + melody + '
                  "metadata (data: --config, default the codec's own config)")
  pr.add_argument('--stems', action='store_true',
                  help='with --codec-workdir: also store vocal/accompaniment codes '
                  '(chorales, or folder with <song>/vocals.<ext> + '
                  'accompaniment.<ext>)')
  pr.add_argument('--chroma', nargs='?', const='', default=None,
                  metavar='PREPROCESSOR_JSON',
                  help='with --codec-workdir: also store MusicGen-Melody\'s melody '
                  'chroma of every song, at the feature extractor\'s settings in '
                  'PREPROCESSOR_JSON (default: the preprocessor_config.json that '
                  'import-musicgen kept beside the codec, RUN/released/, else '
                  "MusicGen-Melody's own: 32 kHz, n_fft 16384, hop 4096)")
  pr.add_argument('--chunk-seconds', type=float, default=10.0)
  return {'prepare': run}


def run(args, overrides: list[str]) -> int:
  if args.codec_workdir:
    return _tokens(args, overrides)
  if args.stems or args.chroma is not None or not args.config:
    raise cfg.ConfigError('prepare without --codec-workdir writes audio shards '
                          'and needs --config (and takes no --stems or --chroma)')
  from musicjax.prepare import audio as prepare_audio
  prepare_audio.prepare_audio_main(configs.load_config(args, overrides), args.out)
  return 0


def _tokens(args, overrides: list[str]) -> int:
  """Codec tokens (+ melody, metadata) of the data, by a trained codec."""
  from musicjax.parallel import distributed
  distributed.maybe_initialize()  # the work is split over jax processes
  from musicjax.prepare import tokens as prepare_tokens
  from musicjax.train import runs
  if args.config:
    config = cfg.load(args.config, overrides)
  elif overrides:
    config = runs.saved_config(args.codec_workdir, 'codec', verb='prepare',
                               flag='--codec-workdir', overrides=overrides)
  else:
    config = None
  print(json.dumps(prepare_tokens.prepare_tokens_main(
      args.codec_workdir, args.out, config, stems=args.stems,
      chunk_seconds=args.chunk_seconds,
      chroma=_chroma_settings(args.chroma, args.codec_workdir))))
  return 0


def _chroma_settings(path: str | None, codec_workdir: str):
  """--chroma's settings: the given preprocessor_config.json, else the one
  an import-musicgen run keeps beside its codec, else MusicGen-Melody's."""
  if path is None:
    return None
  import os
  from musicjax.errors import UserError
  from musicjax.export import import_musicgen
  from musicjax.lm import musicgen_chroma
  if path and not os.path.isfile(path):
    raise UserError(f'--chroma {path}: no such file (give the '
                    f'{musicgen_chroma.PREPROCESSOR} of a MusicGen-Melody '
                    'release, or no value for the one beside the codec)')
  if not path:
    path = os.path.join(os.path.dirname(os.path.abspath(codec_workdir)),
                        import_musicgen.RELEASED, musicgen_chroma.PREPROCESSOR)
  return musicgen_chroma.ChromaSettings.from_file(path)
