"""`musicjax <verb>`: wires configs to library entry points. Nothing else lives here."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

_EPILOG = """examples:
  musicjax train --config configs/codec/tiny.py --workdir runs/tiny
  musicjax train --config configs/codec/tiny.py --workdir runs/tiny --config.train.steps=2000
  musicjax eval --workdir runs/tiny
  musicjax encode --workdir runs/tiny song.wav song.npz
  musicjax decode --workdir runs/tiny song.npz song_decoded.wav
  musicjax prepare --config configs/codec/tiny.py --out data/shards
  musicjax bench codec --config configs/codec/base.py

Any --config.a.b=value overrides one key of the config (its type is checked).
Multi-host: launch/local.sh N -- musicjax train ...  (see README)."""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='musicjax', description='Train, evaluate and run music models in JAX.',
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='verb', metavar='VERB', required=True)

  def add_config(sp, required: bool):
    sp.add_argument('--config', required=required, metavar='PATH',
                    help='config file (configs/...). Overrides: --config.a.b=value.'
                    + ('' if required else ' Default: WORKDIR/config.json.'))

  t = sub.add_parser('train', help='train a model; resumes if WORKDIR has checkpoints')
  add_config(t, required=False)
  t.add_argument('--workdir', required=True, help='checkpoints, metrics.jsonl, TensorBoard')

  e = sub.add_parser('eval', help='evaluate the latest checkpoint; last line is JSON')
  add_config(e, required=False)
  e.add_argument('--workdir', required=True)
  e.add_argument('--num-batches', type=int, default=None,
                 help='eval batches (default: config.train.eval_steps)')

  en = sub.add_parser('encode', help='audio file -> codes (.npz)')
  en.add_argument('--workdir', required=True, help='a trained codec workdir')
  en.add_argument('--n-q', type=int, default=None,
                  help='codebooks to keep (lower bitrate); default all')
  en.add_argument('--chunk-seconds', type=float, default=10.0)
  en.add_argument('input')
  en.add_argument('output')

  de = sub.add_parser('decode', help='codes (.npz) -> audio file')
  de.add_argument('--workdir', required=True, help='the codec workdir that encoded it')
  de.add_argument('--chunk-seconds', type=float, default=10.0)
  de.add_argument('input')
  de.add_argument('output')

  pr = sub.add_parser('prepare', help='write a dataset as ArrayRecord shards')
  add_config(pr, required=True)
  pr.add_argument('--out', required=True, help='output directory for the shards')

  b = sub.add_parser('bench', help='speed benchmarks (prints JSON)')
  b.add_argument('what', choices=['codec'])
  add_config(b, required=True)
  b.add_argument('--seconds', type=float, default=10.0, help='audio length per call')
  b.add_argument('--repeats', type=int, default=5)
  return p


def _load_config(args, overrides):
  from musicjax import config as cfg
  if args.config:
    return cfg.load(args.config, overrides)
  workdir = getattr(args, 'workdir', None)
  if workdir and os.path.isfile(os.path.join(workdir, 'config.json')):
    return cfg.load_saved(workdir, overrides)
  raise cfg.ConfigError(
      'no --config given and no config.json in --workdir '
      f'{workdir!r}; pass --config configs/<family>/<name>.py')


def _run(args, overrides) -> int:
  from musicjax.parallel import distributed
  if args.verb == 'bench':
    from musicjax import bench
    from musicjax import config as cfg
    config = cfg.load(args.config, overrides)
    print(json.dumps(bench.codec(config, seconds=args.seconds, repeats=args.repeats)))
    return 0
  if args.verb in ('encode', 'decode'):
    from musicjax import config as cfg
    from musicjax.codec import chunked
    config = cfg.load_saved(args.workdir, overrides)
    if args.verb == 'encode':
      chunked.encode_file(config, args.workdir, args.input, args.output,
                          n_q=args.n_q, chunk_seconds=args.chunk_seconds)
    else:
      chunked.decode_file(config, args.workdir, args.input, args.output,
                          chunk_seconds=args.chunk_seconds)
    return 0
  if args.verb == 'prepare':
    from musicjax.data import prepare_audio
    config = _load_config(args, overrides)
    prepare_audio.prepare_audio_main(config, args.out)
    return 0

  distributed.maybe_initialize()
  from musicjax.train import trainer
  config = _load_config(args, overrides)
  if args.verb == 'train':
    trainer.train(config, args.workdir)
    return 0
  if args.verb == 'eval':
    metrics = trainer.evaluate(config, args.workdir, num_batches=args.num_batches)
    print(json.dumps(metrics, sort_keys=True))
    return 0
  raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  logging.basicConfig(level=os.environ.get('MUSICJAX_LOG', 'INFO'),
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  # absl (used by orbax/grain) is chatty at INFO; keep our own logs readable.
  logging.getLogger('absl').setLevel(logging.WARNING)
  from musicjax.errors import UserError
  try:
    return _run(args, overrides)
  except UserError as e:
    if os.environ.get('MUSICJAX_DEBUG'):
      traceback.print_exc()
    print(f'musicjax {args.verb}: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'musicjax {args.verb}: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
