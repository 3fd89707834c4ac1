"""`musicjax bench WHAT`: speed benchmarks and training experiments (JSON)."""
from __future__ import annotations

import argparse
import dataclasses
import json

from musicjax import config as cfg
from musicjax.cli import flags
from musicjax.errors import UserError

# Benchmarks that build a model from --config.
WITH_CONFIG = ('codec', 'lm-decode', 'lm-train', 'lm-memory', 'accomp')
# The released HeartMuLa + HeartCodec, --config by default:
RELEASED = {'heartmula-memory': 'lm/heartmula_oss_3b',
            'heartcodec-decode': 'codec/heartcodec_bench'}
# Small training runs on synthetic data: no --config.
EXPERIMENTS = ('accomp-weighting', 'accomp-context')
# Benchmarks of a trained run: --workdir.
WITH_RUN = ('lm-quant',)
BENCHES = (WITH_CONFIG + tuple(RELEASED) + EXPERIMENTS + WITH_RUN
           + ('decode-attention',))
# heartmula-memory's codec when --codec-config is not given.
DEFAULT_CODEC_CONFIG = 'codec/heartcodec_oss'
# Train steps per run of the accomp experiments when --steps is not given.
EXPERIMENT_TRAIN_STEPS = 300


def register(sub) -> dict:
  b = sub.add_parser('bench', help='speed benchmarks (prints JSON)')
  b.add_argument('what', choices=BENCHES,
                 help=f'{", ".join(WITH_CONFIG)}: time a model built from '
                 f'--config; heartmula-memory: compiled inference memory of '
                 'the released LM + HeartCodec (nothing allocated); '
                 'heartcodec-decode: HeartCodec detokenize speed; '
                 f'{", ".join(EXPERIMENTS)}: small training runs on '
                 'synthetic data; lm-quant: int8/int4 inference of a '
                 'trained --workdir beside its float weights; '
                 'decode-attention: the decode kernel')
  b.add_argument('--workdir', default=None,
                 help='lm-quant: a trained LM run')
  b.add_argument('--config', metavar='PATH',
                 help='config file (configs/...) or shipped config name '
                 '(lm/tiny), needed by ' + ', '.join(WITH_CONFIG) + '; '
                 + '; '.join(f'{k} default {v}' for k, v in RELEASED.items())
                 + '; '
                 'PATH:ARG calls get_config(ARG). Overrides: --config.a.b=value '
                 'or --config.a.b value.')
  b.add_argument('--devices', type=int, default=0,
                 help='lm-memory: number of devices of the target topology')
  b.add_argument('--seconds', type=float, default=None,
                 help='audio length per call (codec: default 10; '
                 'heartcodec-decode: 50, two windows); heartmula-memory: the '
                 'song generated (default 240, heartlib\'s longest)')
  b.add_argument('--repeats', type=int, default=5,
                 help='timed calls per case, after a warm-up')
  b.add_argument('--steps', type=flags.int_list, default=None, metavar='N[,N...]',
                 help='accomp: sampler steps per --frames entry (one value: '
                 'all), every step run and timed (default '
                 'config.sample.steps); accomp-weighting/-context: train '
                 f'steps per run (default {EXPERIMENT_TRAIN_STEPS})')
  b.add_argument('--frames', type=flags.int_list, default=None, metavar='F,F,...',
                 help='accomp: song lengths in frames, one case each (default '
                 '30 s and 240 s at the frame rate); lm-decode: frames '
                 'generated, one case each (default 200,1000)')
  b.add_argument('--seeds', type=int, default=2,
                 help='accomp-weighting/-context: runs (seeds) per case')
  b.add_argument('--codec-config', metavar='PATH', default=None,
                 help='heartmula-memory: the HeartCodec config (default '
                 f'{DEFAULT_CODEC_CONFIG}); its estimator runs in bfloat16')
  b.add_argument('--param-dtype', choices=['bfloat16', 'float32'], default=None,
                 help='heartmula-memory: dtype of both models\' parameters '
                 '(default bfloat16); lm-memory: dtype of the train state\'s '
                 'float weights and AdamW moments (default float32)')
  # Defaults live in bench.kernels.Options: flags not given stay unset.
  da = b.add_argument_group('decode-attention (no --config)',
                            argument_default=argparse.SUPPRESS)
  da.add_argument('--batch', type=flags.int_list, metavar='B,B,...',
                  help='batch sizes, one case each (default 1,8)')
  da.add_argument('--seq', type=int, help='cache slots S (default 8192)')
  da.add_argument('--length', type=int,
                  help='attended slots (default 0 = all S)')
  da.add_argument('--q-heads', type=int, help='default 32')
  da.add_argument('--kv-heads', type=int, help='default 8')
  da.add_argument('--head-dim', type=int, help='default 128')
  da.add_argument('--dtype', choices=['bfloat16', 'float32'],
                  help='default bfloat16')
  da.add_argument('--impl', choices=['auto', 'xla', 'pallas', 'interpret', 'all'],
                  help='auto (default): XLA, plus the native kernel on GPU/TPU; '
                  "interpret: also the kernel in Pallas's interpreter")
  da.add_argument('--shipped', choices=['native', 'all', 'none'],
                  help="the decode kernels jax and tokamax ship, beside ours: "
                  'native (default) = those that compile for this device; all '
                  '= also their CPU forms (interpreter / XLA path, labelled); '
                  'none')
  da.add_argument('--rotate', type=int,
                  help='distinct caches per timed executable (default 0: enough '
                  'to exceed 256 MB, at most 16; 1 = hot cache)')
  da.add_argument('--calls', type=int,
                  help='calls per timed executable (default 0: 2 x rotate, at '
                  'least 8)')
  da.add_argument('--block-k', type=int, help='kernel keys per step (default 128)')
  da.add_argument('--splits', type=int, help='kernel KV splits (default 8)')
  da.add_argument('--sweep', action='store_true',
                  help='GPU/TPU: also time block_k x splits and report the best')
  da.add_argument('--peak-gbs', type=float,
                  help='peak memory bandwidth in GB/s (default: table by '
                  'device, or measured on CPU)')
  return {'bench': run}


def run(args, overrides: list[str]) -> int:
  _check_flags(args)
  if args.what in EXPERIMENTS:
    result = _experiment(args)
  elif args.what in RELEASED:
    result = _released(args, overrides)
  elif args.what == 'decode-attention':
    result = _decode_attention(args)
  elif args.what in WITH_RUN:
    if not args.workdir:
      raise UserError(f'bench {args.what} needs --workdir (a trained LM run)')
    from musicjax.bench import quant
    result = quant.run(args.workdir, repeats=args.repeats,
                       **({'frames': args.frames[0]} if args.frames else {}))
  else:
    result = _with_config(args, overrides)
  print(json.dumps(result))
  return 0


def _check_flags(args) -> None:
  """Flags that mean something to some benches only."""
  for flag, value, takers in (
      ('--frames', args.frames, ('accomp', 'lm-decode', 'lm-quant')),
      ('--workdir', args.workdir, WITH_RUN),
      ('--steps', args.steps, ('accomp',) + EXPERIMENTS),
      ('--codec-config', args.codec_config, ('heartmula-memory',)),
      ('--param-dtype', args.param_dtype, ('heartmula-memory', 'lm-memory'))):
    if value is not None and args.what not in takers:
      raise UserError(f'bench {args.what} takes no {flag} (it applies to '
                      f'bench {"/".join(takers)}); leave it out')


def _train_steps(args) -> int:
  """--steps of the accomp experiments: one count of train steps."""
  if args.steps is None:
    return EXPERIMENT_TRAIN_STEPS
  if len(args.steps) != 1:
    raise UserError(f'bench {args.what} takes one --steps value (train steps '
                    f'per run), got {",".join(map(str, args.steps))}')
  return args.steps[0]


def _experiment(args) -> dict:
  from musicjax.bench import accomp_experiments
  experiment = {'accomp-weighting': accomp_experiments.weighting_experiment,
                'accomp-context': accomp_experiments.context_experiment}[args.what]
  return experiment(steps=_train_steps(args), seeds=args.seeds)


def _decode_attention(args) -> dict:
  from musicjax.bench import kernels
  names = {f.name for f in dataclasses.fields(kernels.Options)}
  given = {k: v for k, v in vars(args).items() if k in names}
  return kernels.run(kernels.Options(**given))


def _released(args, overrides: list[str]) -> dict:
  from musicjax.bench import heartmula
  from musicjax.codec.heartcodec import config as codec_config
  spec = args.config or RELEASED[args.what]
  kw = {'seconds': args.seconds, 'repeats': args.repeats}
  if args.what == 'heartcodec-decode':
    return heartmula.run(args.what, codec_config.load(spec, overrides), **kw)
  codec = codec_config.load(args.codec_config or DEFAULT_CODEC_CONFIG)
  return heartmula.run(args.what, cfg.load(spec, overrides), codec,
                       param_dtype=args.param_dtype, **kw)


def _with_config(args, overrides: list[str]) -> dict:
  if not args.config:
    raise cfg.ConfigError(f'bench {args.what} needs --config')
  if args.what == 'lm-memory' and args.devices:
    import jax
    # CPU-only hosts simulate the target topology (accelerators ignore this).
    jax.config.update('jax_num_cpu_devices', args.devices)
  config = cfg.load(args.config, overrides)
  if args.what == 'codec':
    from musicjax.bench import codec
    return codec.run(config, repeats=args.repeats,
                     **({} if args.seconds is None else {'seconds': args.seconds}))
  if args.what == 'accomp':
    from musicjax.bench import accomp
    return accomp.run(config, repeats=args.repeats, frames=args.frames,
                      steps=args.steps)
  from musicjax.bench import lm
  return lm.run(args.what, config, repeats=args.repeats, devices=args.devices,
                frames=args.frames, param_dtype=args.param_dtype)
