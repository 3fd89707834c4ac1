"""`musicjax encode` / `decode`: audio file <-> codes (.npz) with a trained codec."""
from __future__ import annotations


def register(sub) -> dict:
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
  return {'encode': encode, 'decode': decode}


def encode(args, overrides: list[str]) -> int:
  from musicjax.codec import chunked
  from musicjax.train import runs
  config = runs.saved_config(args.workdir, 'codec', verb='encode',
                             overrides=overrides)
  chunked.encode_file(config, args.workdir, args.input, args.output,
                      n_q=args.n_q, chunk_seconds=args.chunk_seconds)
  return 0


def decode(args, overrides: list[str]) -> int:
  from musicjax.codec import chunked
  from musicjax.train import runs
  config = runs.saved_config(args.workdir, 'codec', verb='decode',
                             overrides=overrides)
  chunked.decode_file(config, args.workdir, args.input, args.output,
                      chunk_seconds=args.chunk_seconds)
  return 0
