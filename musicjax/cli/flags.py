"""Flags several verbs share, and the argv clean-up done before parsing."""
from __future__ import annotations

import argparse


def add_config(sp: argparse.ArgumentParser, required: bool) -> None:
  """--config, the config file or shipped name (and its --config.* overrides)."""
  sp.add_argument('--config', required=required, metavar='PATH',
                  help='config file (configs/...) or shipped config name '
                  '(lm/tiny); PATH:ARG calls get_config(ARG). Overrides: '
                  '--config.a.b=value or --config.a.b value.'
                  + ('' if required else ' Default: WORKDIR/config.json.'))


def int_list(text: str) -> tuple[int, ...]:
  """argparse type of `1,8`-style flags."""
  try:
    return tuple(int(x) for x in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'want comma-separated integers like 1,8; got {text!r}') from None


def join_overrides(argv: list[str]) -> list[str]:
  """`--config.a.b value` -> `--config.a.b=value` (ml_collections' flag form).

  The next word is the value unless it is another option (`--...`); a bare
  `--config.a.b` is left for the config to read (a bool key: True).
  """
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a == '--':
      out += argv[i:]
      break
    if (a.startswith('--config.') and '=' not in a and i + 1 < len(argv)
        and not argv[i + 1].startswith('--')):
      out.append(f'{a}={argv[i + 1]}')
      i += 2
      continue
    out.append(a)
    i += 1
  return out
