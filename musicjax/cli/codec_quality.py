"""`musicjax codec-quality`: a trained codec vs Opus on real recordings."""
from __future__ import annotations

import argparse


def register(sub) -> dict:
  cq = sub.add_parser('codec-quality', help='a trained codec vs Opus on real '
                      'recordings: level, DC, <40 Hz energy, mel, SI-SDR',
                      argument_default=argparse.SUPPRESS)
  # Defaults live in musicjax.codec.quality.run: flags not given stay unset.
  cq.add_argument('--workdir', required=True, help='a trained codec workdir')
  cq.add_argument('--audio', required=True, nargs='+', metavar='DIR_OR_FILE',
                  help='audio files, or folders searched for them')
  cq.add_argument('--seconds', type=float, help='clip length (default 10)')
  cq.add_argument('--offset', type=float,
                  help='seconds skipped at the start of long enough files '
                  '(default 10)')
  cq.add_argument('--clips', type=int, help='at most N clips (default 0: all files)')
  cq.add_argument('--quiet-dbfs', type=float,
                  help='level of the quiet copy of each clip (default -30)')
  cq.add_argument('--opus-kbps', type=float,
                  help='Opus bitrate to compare with (default 6, its lowest); '
                  '0 skips Opus')
  cq.add_argument('--json', dest='json_path', metavar='OUT',
                  help='also write the full result here')
  return {'codec-quality': run}


def run(args, overrides: list[str]) -> int:
  del overrides  # the codec's own config.json is used as saved
  from musicjax.codec import quality
  given = {k: v for k, v in vars(args).items() if k not in ('verb', 'workdir',
                                                            'audio')}
  quality.main(args.workdir, args.audio, **given)
  return 0
