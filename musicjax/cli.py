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

--config takes a file path or the name of a shipped config (lm/tiny, codec/tiny,
...); PATH:ARG passes ARG to the file's get_config(arg).
Any --config.a.b=value (or --config.a.b value) overrides one key of the config
(its type is checked).
Multi-host: launch/local.sh N -- musicjax train ...  (see docs/training.md)."""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='musicjax', description='Train, evaluate and run music models in JAX.',
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='verb', metavar='VERB', required=True)

  def add_config(sp, required: bool):
    sp.add_argument('--config', required=required, metavar='PATH',
                    help='config file (configs/...) or shipped config name '
                    '(lm/tiny); PATH:ARG calls get_config(ARG). Overrides: '
                    '--config.a.b=value or --config.a.b value.'
                    + ('' if required else ' Default: WORKDIR/config.json.'))

  t = sub.add_parser('train', help='train a model; resumes if WORKDIR has checkpoints')
  add_config(t, required=False)
  t.add_argument('--workdir', required=True, help='checkpoints, metrics.jsonl, TensorBoard')

  e = sub.add_parser('eval', help='evaluate the latest checkpoint; last line is JSON')
  add_config(e, required=False)
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

  cq = sub.add_parser('codec-quality', help='a trained codec vs Opus on real '
                      'recordings: level, DC, <40 Hz energy, mel, SI-SDR',
                      argument_default=argparse.SUPPRESS)
  # Defaults live in musicjax.eval.codec_quality.run: flags not given stay unset.
  cq.add_argument('--workdir', required=True, help='a trained codec workdir')
  cq.add_argument('--audio', required=True, nargs='+', metavar='DIR_OR_FILE',
                  help='audio files, or folders searched for them')
  cq.add_argument('--seconds', type=float, help='clip length (default 10)')
  cq.add_argument('--offset', type=float,
                  help='seconds skipped at the start of long enough files '
                  '(default 10)')
  cq.add_argument('--clips', type=int, help='at most N clips (default 0: all files)')
  cq.add_argument('--quiet-dbfs', type=float,
                  help='level of the quiet copy of each clip (default -30)')
  cq.add_argument('--opus-kbps', type=float,
                  help='Opus bitrate to compare with (default 6, its lowest); '
                  '0 skips Opus')
  cq.add_argument('--json', dest='json_path', metavar='OUT',
                  help='also write the full result here')

  pr = sub.add_parser('prepare', help='write a dataset as ArrayRecord shards: audio, '
                      'or codec tokens for the LM with --codec-workdir')
  add_config(pr, required=False)
  pr.add_argument('--out', required=True, help='output directory; rerun to resume')
  pr.add_argument('--codec-workdir', default=None,
                  help='a trained codec workdir: write codec tokens + melody + '
                  "metadata (data: --config, default the codec's own config)")
  pr.add_argument('--stems', action='store_true',
                  help='with --codec-workdir: also store vocal/accompaniment codes '
                  '(chorales, or folder with <song>/vocals.<ext> + '
                  'accompaniment.<ext>)')
  pr.add_argument('--chunk-seconds', type=float, default=10.0)

  tk = sub.add_parser('tokenizer', help='train the text tokenizer on the train split')
  add_config(tk, required=True)
  tk.add_argument('--out', required=True, metavar='FILE',
                  help='tokenizer.json to write (a directory gets DIR/tokenizer.json)')

  g = sub.add_parser('generate', help='generate a song with a trained LM')
  g.add_argument('--workdir', required=True, help='a trained LM workdir')
  add_config(g, required=False)
  g.add_argument('--tags', default='', help="e.g. 'genre: chorale; mood: bright' "
                 "or 'chorale, bright' (empty: unconditional tags)")
  g.add_argument('--lyrics', default='', metavar='FILE',
                 help='lyrics text file with [verse]/[chorus] markers')
  g.add_argument('--melody', default='', metavar='WAV',
                 help='audio (e.g. hummed) whose chroma the melody follows')
  g.add_argument('--reference', default='', metavar='WAV',
                 help='audio whose style the song follows')
  g.add_argument('--seconds', type=float, default=10.0, help='at most this long')
  g.add_argument('--min-seconds', type=float, default=0.0,
                 help='the song does not end (END token) before this')
  g.add_argument('--seed', type=int, default=0)
  g.add_argument('--cfg', type=float, default=None,
                 help='guidance scale (default config.sample.cfg_scale; 1 = off)')
  g.add_argument('--temperature', type=float, default=None)
  g.add_argument('--top-k', type=int, default=None)
  g.add_argument('--top-p', type=float, default=None)
  g.add_argument('--codec-workdir', default=None,
                 help='codec for decoding (default: the one that made the tokens)')
  g.add_argument('--out', required=True, help='song.wav; also writes .npz and .png')

  ac = sub.add_parser('accompany', help='accompaniment for a vocal recording '
                      '(trained accomp run); writes the mix and the stem')
  ac.add_argument('--workdir', required=True, help='a trained accomp workdir')
  add_config(ac, required=False)
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

  pf = sub.add_parser('prefs', help='DPO preference pairs: sample candidates '
                      'per prompt with a trained LM, score them, write pairs')
  pf.add_argument('--workdir', required=True, help='a trained LM workdir')
  add_config(pf, required=False)
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

  ex = sub.add_parser('export', help='weights as safetensors + config.json for '
                      'PyTorch (musicjax_torch.from_pretrained)')
  ex.add_argument('--workdir', required=True, help='a trained run (codec, LM or '
                  'accompaniment)')
  ex.add_argument('--out', required=True, metavar='DIR', help='export directory')
  ex.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ex.add_argument('--step', type=int, default=None,
                  help='checkpoint step (default: the latest)')
  ex.add_argument('--max-shard-gb', type=float, default=2.0,
                  help='split model.safetensors into shards of at most this size')
  add_config(ex, required=False)

  it = sub.add_parser('import-torch', help='an export (e.g. fine-tuned in '
                      'PyTorch) -> a checkpoint in a new WORKDIR')
  it.add_argument('--from', dest='from_dir', required=True, metavar='DIR',
                  help='directory written by `musicjax export` or '
                  'musicjax_torch.save_pretrained')
  it.add_argument('--workdir', required=True, help='new run directory')
  add_config(it, required=False)

  b = sub.add_parser('bench', help='speed benchmarks (prints JSON)')
  b.add_argument('what', choices=['codec', 'lm-decode', 'lm-train', 'lm-memory',
                                  'accomp', 'accomp-weighting', 'accomp-context',
                                  'decode-attention'])
  add_config(b, required=False)
  b.add_argument('--devices', type=int, default=0,
                 help='lm-memory: number of devices of the target topology')
  b.add_argument('--seconds', type=float, default=10.0, help='audio length per call')
  b.add_argument('--repeats', type=int, default=5)
  b.add_argument('--steps', type=_int_list, default=None, metavar='N[,N...]',
                 help='accomp: sampler steps per --frames entry (one value: '
                 'all), every step run and timed (default '
                 'config.sample.steps); accomp-weighting/-context: train '
                 'steps per run (default 300)')
  b.add_argument('--frames', type=_int_list, default=None, metavar='F,F,...',
                 help='accomp: song lengths in frames, one case each (default '
                 '30 s and 240 s at the frame rate); lm-decode: frames '
                 'generated, one case each (default 200,1000)')
  b.add_argument('--seeds', type=int, default=2,
                 help='accomp-weighting/-context: runs (seeds) per case')
  # Defaults live in kernels.bench.Options: flags not given stay unset.
  da = b.add_argument_group('decode-attention (no --config)',
                            argument_default=argparse.SUPPRESS)
  da.add_argument('--batch', type=_int_list, metavar='B,B,...',
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
  return p


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'want comma-separated integers like 1,8; got {text!r}') from None


# Train steps per run of the accomp experiments when --steps is not given.
EXPERIMENT_TRAIN_STEPS = 300


def _train_steps(args) -> int:
  """--steps of the accomp experiments: one count of train steps."""
  from musicjax.errors import UserError
  if args.steps is None:
    return EXPERIMENT_TRAIN_STEPS
  if len(args.steps) != 1:
    raise UserError(f'bench {args.what} takes one --steps value (train steps '
                    f'per run), got {",".join(map(str, args.steps))}')
  return args.steps[0]


def _load_config(args, overrides):
  from musicjax import config as cfg
  workdir = getattr(args, 'workdir', None)
  if args.config:
    config = cfg.load(args.config, overrides)
    _check_same_task(args, config, workdir)
    return config
  if workdir and os.path.isfile(os.path.join(workdir, 'config.json')):
    return cfg.load_saved(workdir, overrides)
  if workdir and not os.path.isdir(workdir) and args.verb != 'train':
    raise cfg.ConfigError(f'--workdir {workdir!r} does not exist; pass the '
                          'directory of a `musicjax train` run')
  raise cfg.ConfigError(
      'no --config given and no config.json in --workdir '
      f'{workdir!r}; pass --config configs/<family>/<name>.py')


def _check_same_task(args, config, workdir) -> None:
  """--config must be of the task of the run in --workdir, when there is one.

  Otherwise restoring fails on mismatched weights, naming neither task.
  """
  from musicjax import config as cfg
  if not workdir or args.verb == 'import-torch':  # that workdir is new
    return
  saved = cfg.saved_task(workdir)
  if saved is None or saved == config.task:
    return
  if args.verb == 'train' and not os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    return  # nothing to resume: the run starts over with the new config
  raise cfg.ConfigError(
      f'--config {args.config} is a config for {cfg.run_kind(config.task)} '
      f'(config.task {config.task!r}), but --workdir {workdir} is '
      f'{cfg.run_kind(saved)} (config.task {saved!r} in its config.json): '
      "leave out --config to use the run's own config.json, or pass the "
      f'--workdir of {cfg.run_kind(config.task)}')


def _run(args, overrides) -> int:
  from musicjax.errors import UserError
  from musicjax.parallel import distributed
  if args.verb == 'bench':
    from musicjax import bench
    from musicjax import config as cfg
    for flag, value, takers in (
        ('--frames', args.frames, ('accomp', 'lm-decode')),
        ('--steps', args.steps, ('accomp', 'accomp-weighting',
                                 'accomp-context'))):
      if value is not None and args.what not in takers:
        raise UserError(f'bench {args.what} takes no {flag} (it applies to '
                        f'bench {"/".join(takers)}); leave it out')
    if args.what in ('accomp-weighting', 'accomp-context'):
      from musicjax.accomp import bench as accomp_bench
      experiment = {'accomp-weighting': accomp_bench.weighting_experiment,
                    'accomp-context': accomp_bench.context_experiment}[args.what]
      print(json.dumps(experiment(steps=_train_steps(args), seeds=args.seeds)))
      return 0
    if args.what == 'decode-attention':
      import dataclasses
      from musicjax.kernels import bench as kernel_bench
      names = {f.name for f in dataclasses.fields(kernel_bench.Options)}
      given = {k: v for k, v in vars(args).items() if k in names}
      print(json.dumps(kernel_bench.run(kernel_bench.Options(**given))))
      return 0
    if not args.config:
      raise cfg.ConfigError(f'bench {args.what} needs --config')
    if args.what == 'lm-memory' and args.devices:
      import jax
      # CPU-only hosts simulate the target topology (accelerators ignore this).
      jax.config.update('jax_num_cpu_devices', args.devices)
    config = cfg.load(args.config, overrides)
    if args.what == 'codec':
      result = bench.codec(config, seconds=args.seconds, repeats=args.repeats)
    elif args.what == 'accomp':
      from musicjax.accomp import bench as accomp_bench
      result = accomp_bench.run(config, repeats=args.repeats,
                                frames=args.frames, steps=args.steps)
    else:
      from musicjax.lm import bench as lm_bench
      result = lm_bench.run(args.what, config, repeats=args.repeats,
                            devices=args.devices, frames=args.frames)
    print(json.dumps(result))
    return 0
  if args.verb == 'prefs':
    from musicjax.lm import prefs
    config = _load_config(args, overrides)
    print(json.dumps(prefs.prefs_main(
        config, args.workdir, args.out, args.prompts, args.candidates,
        args.seconds, args.metric, args.margin, args.min_winner, args.seed,
        args.split, codec_workdir=args.codec_workdir)))
    return 0
  if args.verb == 'accompany':
    from musicjax.accomp import song as accomp_song
    config = _load_config(args, overrides)
    ctx = accomp_song.AccompContext(config, args.workdir, args.codec_workdir)
    req = accomp_song.AccompRequest(
        vocal_path=args.vocal, tags=args.tags, reference_path=args.reference,
        steps=args.steps, seed=args.seed, cfg_scale=args.cfg,
        temperature=args.temperature)
    print(json.dumps(accomp_song.accompany_file(ctx, req, args.out, args.stem)))
    return 0
  if args.verb == 'generate':
    from musicjax.lm import song
    config = _load_config(args, overrides)
    lyrics = ''
    if args.lyrics:
      if not os.path.isfile(args.lyrics):
        raise UserError(f'--lyrics file not found: {args.lyrics}')
      with open(args.lyrics, encoding='utf-8') as f:
        lyrics = f.read()
    ctx = song.SongContext(config, args.workdir, args.codec_workdir)
    req = song.SongRequest(
        tags=args.tags, lyrics=lyrics, melody_path=args.melody,
        reference_path=args.reference, seconds=args.seconds,
        min_seconds=args.min_seconds, seed=args.seed, cfg_scale=args.cfg,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print(json.dumps(song.generate_song(ctx, req, args.out)))
    return 0
  if args.verb == 'codec-quality':
    from musicjax.eval import codec_quality
    given = {k: v for k, v in vars(args).items() if k not in ('verb', 'workdir',
                                                              'audio')}
    codec_quality.main(args.workdir, args.audio, **given)
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
    from musicjax import config as cfg
    if args.codec_workdir:
      distributed.maybe_initialize()  # the work is split over jax processes
      from musicjax.data import prepare_tokens
      if args.config:
        config = cfg.load(args.config, overrides)
      elif overrides:
        config = cfg.load_saved(args.codec_workdir, overrides)
      else:
        config = None
      print(json.dumps(prepare_tokens.prepare_tokens_main(
          args.codec_workdir, args.out, config, stems=args.stems,
          chunk_seconds=args.chunk_seconds)))
      return 0
    if args.stems or not args.config:
      raise cfg.ConfigError('prepare without --codec-workdir writes audio shards '
                            'and needs --config (and takes no --stems)')
    from musicjax.data import prepare_audio
    prepare_audio.prepare_audio_main(_load_config(args, overrides), args.out)
    return 0
  if args.verb == 'tokenizer':
    from musicjax.data import text
    config = _load_config(args, overrides)
    print(json.dumps(text.tokenizer_main(config, args.out), sort_keys=True))
    return 0

  distributed.maybe_initialize()
  if args.verb == 'import-torch':
    from musicjax.export import import_torch
    config = _load_config(args, overrides) if args.config else None
    print(json.dumps(import_torch.import_export(args.from_dir, args.workdir,
                                                config)))
    return 0
  from musicjax.train import trainer
  config = _load_config(args, overrides)
  if args.verb == 'export':
    from musicjax.export import export as export_lib
    print(json.dumps(export_lib.export_workdir(
        config, args.workdir, args.out, dtype=args.dtype, step=args.step,
        max_shard_bytes=int(args.max_shard_gb * 1e9))))
    return 0
  if args.verb == 'train':
    trainer.train(config, args.workdir)
    return 0
  if args.verb == 'eval':
    metrics = trainer.evaluate(config, args.workdir, num_batches=args.num_batches)
    if config.task == 'accomp' and args.songs:
      from musicjax.accomp import evaluate as accomp_eval
      metrics['audio'] = accomp_eval.evaluate_audio(
          config, args.workdir, songs=args.songs, seconds=args.seconds,
          steps=args.steps, out_dir=args.out)
    print(json.dumps(metrics, sort_keys=True))
    return 0
  raise AssertionError(args.verb)


def configure_logging() -> None:
  """INFO for musicjax (MUSICJAX_LOG overrides), WARNING for chatty libraries."""
  logging.basicConfig(level=os.environ.get('MUSICJAX_LOG', 'INFO'),
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  # absl (used by orbax/grain) is chatty at INFO. jax's backend probe logs
  # "Unable to initialize backend 'tpu' ... libtpu.so" on every CPU/GPU run.
  for name in ('absl', 'jax._src.xla_bridge'):
    logging.getLogger(name).setLevel(logging.WARNING)


# Verbs that run training or timed steps: glibc malloc tuned (musicjax/runtime.py).
_MALLOC_VERBS = ('train', 'eval', 'bench')


def _join_overrides(argv: list[str]) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
  argv = _join_overrides(list(sys.argv[1:] if argv is None else argv))
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  configure_logging()
  if args.verb in _MALLOC_VERBS:
    # Before JAX starts its threads (musicjax/runtime.py: XLA:CPU's per-step
    # temporaries would otherwise be page-faulted in again on every step).
    from musicjax import runtime
    runtime.tune_malloc()
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
