"""The `musicjax` command: parses argv and runs the verb's handler."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from musicjax.cli import accompany
from musicjax.cli import bench
from musicjax.cli import codec_quality
from musicjax.cli import encode_decode
from musicjax.cli import evaluate
from musicjax.cli import export
from musicjax.cli import flags
from musicjax.cli import generate
from musicjax.cli import import_released
from musicjax.cli import prefs
from musicjax.cli import prepare
from musicjax.cli import tokenizer
from musicjax.cli import train
from musicjax.errors import UserError

_EPILOG = r"""examples:
  musicjax train --config configs/codec/tiny.py --workdir runs/tiny
  musicjax train --config configs/codec/tiny.py --workdir runs/tiny --config.train.steps=2000
  musicjax eval --workdir runs/tiny
  musicjax encode --workdir runs/tiny song.wav song.npz
  musicjax decode --workdir runs/tiny song.npz song_decoded.wav
  musicjax codec-quality --workdir runs/tiny --audio music/ --clips 8 --json q.json
  musicjax prepare --config configs/codec/tiny.py --out data/shards
  musicjax prepare --codec-workdir runs/codec --out data/tokens [--stems]
  musicjax tokenizer --config configs/codec/tiny.py --out data/tokenizer.json
  musicjax bench codec --config configs/codec/base.py
  musicjax train --config configs/lm/tiny.py --workdir runs/lm --config.data.path=data/tokens
  musicjax generate --workdir runs/lm --tags 'chorale, bright' --lyrics lyrics.txt \
      --seconds 10 --seed 0 --out song.wav
  musicjax bench lm-decode --config configs/lm/bench_tiny.py
  musicjax prefs --workdir runs/lm --out pairs.jsonl --prompts 64 --candidates 4 --seconds 4
  musicjax train --config configs/lm/dpo_tiny.py --workdir runs/dpo
  musicjax train --config configs/accomp/tiny.py --workdir runs/accomp
  musicjax accompany --workdir runs/accomp --vocal vocal.wav --tags 'chorale' \
      --steps 60 --seed 0 --out mix.wav --stem accomp.wav
  musicjax eval --workdir runs/accomp --songs 8 --seconds 10
  musicjax bench accomp --config configs/accomp/tiny.py
  musicjax bench accomp --config configs/accomp/vampnet_tiny_size.py \
      --frames 750,3000 --steps 12,36
  musicjax export --workdir runs/lm --out exports/lm [--dtype bfloat16]
  musicjax import-torch --from exports/lm_finetuned --workdir runs/lm_ft
  musicjax train --config configs/lm/tiny.py --workdir runs/lora \
      --config.init.workdir=runs/lm --config.lora.rank=16 --config.lora.base=int8
  musicjax merge-lora --workdir runs/lora --out runs/lm_lora_merged
  musicjax import-heartmula --from heartlib_ckpt --workdir runs/heartmula

--config takes a file path or the name of a shipped config (lm/tiny, codec/tiny,
...); PATH:ARG passes ARG to the file's get_config(arg).
Any --config.a.b=value (or --config.a.b value) overrides one key of the config
(its type is checked).
Multi-host: launch/local.sh N -- musicjax train ...  (see docs/training.md)."""

# The verb modules, in the order `musicjax --help` lists their verbs. Each
# one's register(sub) adds its subparsers and returns {verb: handler}; a
# handler(args, overrides) returns the exit status.
VERB_MODULES = (train, evaluate, encode_decode, codec_quality, prepare,
                tokenizer, generate, accompany, prefs, export, import_released,
                bench)

# Verbs that run training or timed steps: glibc malloc tuned (musicjax/runtime.py).
MALLOC_VERBS = ('train', 'eval', 'bench')


def parser_and_handlers() -> tuple[argparse.ArgumentParser, dict]:
  """The argparse parser of every verb, and the table verb -> handler."""
  p = argparse.ArgumentParser(
      prog='musicjax', description='Train, evaluate and run music models in JAX.',
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='verb', metavar='VERB', required=True)
  handlers = {}
  for module in VERB_MODULES:
    handlers.update(module.register(sub))
  return p, handlers


def configure_logging() -> None:
  """INFO for musicjax (MUSICJAX_LOG overrides), WARNING for chatty libraries."""
  logging.basicConfig(level=os.environ.get('MUSICJAX_LOG', 'INFO'),
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  # absl (used by orbax/grain) is chatty at INFO. jax's backend probe logs
  # "Unable to initialize backend 'tpu' ... libtpu.so" on every CPU/GPU run.
  for name in ('absl', 'jax._src.xla_bridge'):
    logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
  argv = flags.join_overrides(list(sys.argv[1:] if argv is None else argv))
  parser, handlers = parser_and_handlers()
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  configure_logging()
  if args.verb in MALLOC_VERBS:
    # Before JAX starts its threads (musicjax/runtime.py: XLA:CPU's per-step
    # temporaries would otherwise be page-faulted in again on every step).
    from musicjax import runtime
    runtime.tune_malloc()
  try:
    return handlers[args.verb](args, overrides)
  except UserError as e:
    if os.environ.get('MUSICJAX_DEBUG'):
      traceback.print_exc()
    print(f'musicjax {args.verb}: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'musicjax {args.verb}: interrupted', file=sys.stderr)
    return 130
