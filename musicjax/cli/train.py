"""`musicjax train`: train a model; resumes if WORKDIR has checkpoints."""
from __future__ import annotations

from musicjax.cli import configs
from musicjax.cli import flags


def register(sub) -> dict:
  t = sub.add_parser('train', help='train a model; resumes if WORKDIR has checkpoints')
  flags.add_config(t, required=False)
  t.add_argument('--workdir', required=True, help='checkpoints, metrics.jsonl, TensorBoard')
  return {'train': run}


def run(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.train import trainer
  config = configs.load_config(args, overrides)
  trainer.train(config, args.workdir)
  return 0
