"""`musicjax accompany`: accompaniment for a vocal recording (trained accomp run)."""
from __future__ import annotations

import json

from musicjax.cli import configs
from musicjax.cli import flags


def register(sub) -> dict:
  ac = sub.add_parser('accompany', help='accompaniment for a vocal recording '
                      '(trained accomp run); writes the mix and the stem')
  ac.add_argument('--workdir', required=True, help='a trained accomp workdir')
  flags.add_config(ac, required=False)
  ac.add_argument('--vocal', required=True, metavar='WAV',
                  help='the vocal recording (left unchanged in the mix)')
  ac.add_argument('--tags', default='', help="e.g. 'genre: chorale' (empty: "
                  'unconditional text prefix)')
  ac.add_argument('--reference', default='', metavar='WAV',
                  help='audio whose style the accompaniment follows')
  ac.add_argument('--steps', type=int, default=None,
                  help='sampler steps (default config.sample.steps, 60)')
  ac.add_argument('--seed', type=int, default=0)
  ac.add_argument('--cfg', type=float, default=None,
                  help='guidance over the prefix (default config.sample.cfg_scale;'
                  ' 1 = off)')
  ac.add_argument('--temperature', type=float, default=None)
  ac.add_argument('--codec-workdir', default=None,
                  help='codec (default: the one that made the training tokens)')
  ac.add_argument('--out', required=True, help='the mix (float WAV, vocal rate)')
  ac.add_argument('--stem', required=True,
                  help='the accompaniment alone; also writes .npz and .png')
  return {'accompany': run}


def run(args, overrides: list[str]) -> int:
  from musicjax.accomp import song as accomp_song
  config = configs.load_config(args, overrides)
  ctx = accomp_song.AccompContext(config, args.workdir, args.codec_workdir)
  req = accomp_song.AccompRequest(
      vocal_path=args.vocal, tags=args.tags, reference_path=args.reference,
      steps=args.steps, seed=args.seed, cfg_scale=args.cfg,
      temperature=args.temperature)
  print(json.dumps(accomp_song.accompany_file(ctx, req, args.out, args.stem)))
  return 0
