"""`musicjax tokenizer`: train the text tokenizer on the train split."""
from __future__ import annotations

import json

from musicjax.cli import configs
from musicjax.cli import flags


def register(sub) -> dict:
  tk = sub.add_parser('tokenizer', help='train the text tokenizer on the train split')
  flags.add_config(tk, required=True)
  tk.add_argument('--out', required=True, metavar='FILE',
                  help='tokenizer.json to write (a directory gets DIR/tokenizer.json)')
  return {'tokenizer': run}


def run(args, overrides: list[str]) -> int:
  from musicjax.prepare import tokenizer
  config = configs.load_config(args, overrides)
  print(json.dumps(tokenizer.tokenizer_main(config, args.out), sort_keys=True))
  return 0
