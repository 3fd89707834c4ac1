"""`musicjax prefs`: DPO preference pairs sampled and scored with a trained LM."""
from __future__ import annotations

import json

from musicjax.cli import configs
from musicjax.cli import flags


def register(sub) -> dict:
  pf = sub.add_parser('prefs', help='DPO preference pairs: sample candidates '
                      'per prompt with a trained LM, score them, write pairs')
  pf.add_argument('--workdir', required=True, help='a trained LM workdir')
  flags.add_config(pf, required=False)
  pf.add_argument('--out', required=True,
                  help='pairs.jsonl, or a directory for ArrayRecord shards')
  pf.add_argument('--prompts', type=int, default=64,
                  help='prompts (token records of --split) to sample')
  pf.add_argument('--candidates', type=int, default=4, help='samples per prompt')
  pf.add_argument('--seconds', type=float, default=10.0)
  pf.add_argument('--metric', default='chroma', choices=['chroma'])
  pf.add_argument('--margin', type=float, default=0.1,
                  help='keep a pair only if best - worst score > margin')
  pf.add_argument('--min-winner', type=float, default=0.0,
                  help='... and the best score > this')
  pf.add_argument('--seed', type=int, default=0)
  pf.add_argument('--split', default='eval', choices=['train', 'eval'])
  pf.add_argument('--codec-workdir', default=None,
                  help='codec for scoring (default: the one that made the tokens)')
  return {'prefs': run}


def run(args, overrides: list[str]) -> int:
  from musicjax.lm import prefs
  config = configs.load_config(args, overrides)
  print(json.dumps(prefs.prefs_main(
      config, args.workdir, args.out, args.prompts, args.candidates,
      args.seconds, args.metric, args.margin, args.min_winner, args.seed,
      args.split, codec_workdir=args.codec_workdir)))
  return 0
