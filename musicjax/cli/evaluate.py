"""`musicjax eval`: evaluate the latest checkpoint; the last line is JSON."""
from __future__ import annotations

import json

from musicjax.cli import configs
from musicjax.cli import flags


def register(sub) -> dict:
  e = sub.add_parser('eval', help='evaluate the latest checkpoint; last line is JSON')
  flags.add_config(e, required=False)
  e.add_argument('--workdir', required=True)
  e.add_argument('--num-batches', type=int, default=None,
                 help='eval batches (default: config.train.eval_steps)')
  e.add_argument('--songs', type=int, default=8,
                 help='accomp: held-out songs to accompany for the audio '
                 'metrics (0 = loss only)')
  e.add_argument('--seconds', type=float, default=10.0,
                 help='accomp: seconds of each held-out song')
  e.add_argument('--steps', type=int, default=None,
                 help='accomp: sampler steps (default config.sample.steps)')
  e.add_argument('--out', default='',
                 help='accomp: write the table (Markdown) and the clips here')
  return {'eval': run}


def run(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.train import trainer
  config = configs.load_config(args, overrides)
  metrics = trainer.evaluate(config, args.workdir, num_batches=args.num_batches)
  if config.task == 'accomp' and args.songs:
    from musicjax.accomp import evaluate as accomp_eval
    metrics['audio'] = accomp_eval.evaluate_audio(
        config, args.workdir, songs=args.songs, seconds=args.seconds,
        steps=args.steps, out_dir=args.out)
  print(json.dumps(metrics, sort_keys=True))
  return 0
