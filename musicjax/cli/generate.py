"""`musicjax generate`: a song from a trained LM (tags, lyrics, melody, style),
from a released HeartMuLa run (`musicjax import-heartmula`) through
HeartCodec, or from a released MusicGen run (`import-musicgen`, --text)."""
from __future__ import annotations

import dataclasses
import json
import os

from musicjax.cli import configs
from musicjax.cli import flags
from musicjax.errors import UserError


def register(sub) -> dict:
  g = sub.add_parser('generate', help='generate a song with a trained LM')
  g.add_argument('--workdir', required=True, help='a trained LM workdir')
  flags.add_config(g, required=False)
  g.add_argument('--tags', default='', help="e.g. 'genre: chorale; mood: bright' "
                 "or 'chorale, bright' (empty: unconditional tags)")
  g.add_argument('--text', default='',
                 help="an imported MusicGen run's description, e.g. '80s pop "
                 "with synths' (empty: unconditional)")
  g.add_argument('--lyrics', default='', metavar='FILE',
                 help='lyrics text file with [verse]/[chorus] markers')
  g.add_argument('--melody', default='', metavar='WAV',
                 help='audio (e.g. hummed) whose chroma the melody follows')
  g.add_argument('--reference', default='', metavar='WAV',
                 help='audio whose style the song follows')
  g.add_argument('--seconds', type=float, default=None,
                 help='at most this long (default config.sample.seconds: 10 '
                 's; 120 s for the released HeartMuLa, as heartlib)')
  g.add_argument('--min-seconds', type=float, default=0.0,
                 help='the song does not end (END token) before this')
  g.add_argument('--seed', type=int, default=0)
  g.add_argument('--cfg', type=float, default=None,
                 help='guidance scale (default config.sample.cfg_scale; 1 = off)')
  g.add_argument('--temperature', type=float, default=None)
  g.add_argument('--top-k', type=int, default=None)
  g.add_argument('--top-p', type=float, default=None)
  g.add_argument('--codec-workdir', default=None,
                 help='codec for decoding (default: the one that made the '
                 'tokens; for an imported HeartMuLa run, the HeartCodec-oss '
                 'folder it was released with)')
  g.add_argument('--out', required=True, help='song.wav; also writes .npz and .png')
  return {'generate': run}


def run(args, overrides: list[str]) -> int:
  from musicjax.export import heartmula_run
  from musicjax.lm import song
  config = configs.load_config(args, overrides)
  lyrics = ''
  if args.lyrics:
    if not os.path.isfile(args.lyrics):
      raise UserError(f'--lyrics file not found: {args.lyrics}')
    with open(args.lyrics, encoding='utf-8') as f:
      lyrics = f.read()
  req = song.SongRequest(
      tags=args.tags, lyrics=lyrics, melody_path=args.melody,
      reference_path=args.reference, seconds=args.seconds,
      min_seconds=args.min_seconds, seed=args.seed, cfg_scale=args.cfg,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  from musicjax.lm import musicgen_song
  if args.text and not musicgen_song.is_released(args.workdir):
    raise UserError(f'--text is for a run made by import-musicgen; '
                    f'{args.workdir} is not one (use --tags and --lyrics)')
  if musicgen_song.is_released(args.workdir):
    musicgen_song.check_request(req, config)   # before the model is restored
    ctx = musicgen_song.open_song(args.workdir, config, args.codec_workdir)
    if req.seconds is None:
      req = dataclasses.replace(req, seconds=float(ctx.config.sample.seconds))
    print(json.dumps(musicgen_song.generate_song(ctx, req, args.text,
                                                 args.out)))
    return 0
  if heartmula_run.is_released(args.workdir):
    from musicjax.lm import heartmula_song
    heartmula_song.check_request(req)       # before a 3B model is restored
    ctx = heartmula_run.open_song(args.workdir, config, args.codec_workdir)
    make = heartmula_song.generate_song
  else:  # checks the run's kind first: a codec run is named as such
    ctx = song.SongContext(config, args.workdir, args.codec_workdir)
    make = song.generate_song
  if req.seconds is None:
    req = dataclasses.replace(req, seconds=float(ctx.config.sample.seconds))
  print(json.dumps(make(ctx, req, args.out)))
  return 0
