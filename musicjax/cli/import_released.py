"""`musicjax import-heartmula` / `import-musicgen` / `export-musicgen` /
`import-dac` / `export-dac` / `import-encodec` / `export-encodec`: released
checkpoints of other projects <-> musicjax runs."""
from __future__ import annotations

import importlib
import json


def _import_parser(sub, verb: str, summary: str, from_help: str,
                   config_help: str | None) -> None:
  """An import verb: --from, --workdir (a new run) and --config (None: the
  folder fixes the config; only --config.a.b=value overrides)."""
  p = sub.add_parser(verb, help=summary)
  p.add_argument('--from', dest='from_dir', required=True, metavar='DIR',
                 help=from_help)
  p.add_argument('--workdir', required=True,
                 help='the new run directory (must not exist, or be empty)')
  if config_help is not None:
    p.add_argument('--config', default=None, metavar='PATH',
                   help=config_help + '. Overrides: --config.a.b=value.')


def register(sub) -> dict:
  _import_parser(
      sub, 'import-heartmula',
      "heartlib's released HeartMuLa folder -> an LM run (generate, "
      'fine-tune, eval, export)',
      from_help='the released folder (HeartMuLa-oss-3B/, HeartCodec-oss/, '
      'tokenizer.json, gen_config.json) or its HeartMuLa-oss-* folder',
      config_help='our LM config of the model (file or shipped name); '
      "default: the shipped one of the folder's flavors (lm/heartmula_oss_3b)")
  _import_parser(
      sub, 'import-dac',
      "a DAC folder (transformers' DacModel: config.json + model.safetensors) "
      '-> a codec run (encode, decode, fine-tune, export-dac)',
      from_help='the folder DacModel.save_pretrained wrote (e.g. a download '
      'of descript/dac_44khz)',
      config_help='our codec config of the model (file or shipped name, e.g. '
      "codec/dac_44khz); default: built from the folder's config.json")

  _import_parser(
      sub, 'import-musicgen',
      "a MusicGen folder (transformers' MusicgenForConditionalGeneration) -> "
      'an LM run with its T5 text encoder (generate --text, fine-tune, eval)',
      from_help='the folder save_pretrained wrote (e.g. a download of '
      'facebook/musicgen-small); its config.json sets the model (overrides '
      '--config.a.b=value may change sampling, data and training keys)',
      config_help=None)

  _export_parser(sub, 'export-dac', "DAC's", 'DacModel', 'import-dac')
  _import_parser(
      sub, 'import-encodec',
      "an EnCodec folder (transformers' EncodecModel: config.json + "
      'model.safetensors) -> a codec run (encode, decode, fine-tune, '
      'export-encodec)',
      from_help='the folder EncodecModel.save_pretrained wrote (e.g. a '
      'download of facebook/encodec_32khz or encodec_24khz)',
      config_help='our codec config of the model (file or shipped name, e.g. '
      "codec/encodec_32khz); default: built from the folder's config.json")
  _export_parser(sub, 'export-encodec', "EnCodec's", 'EncodecModel',
                 'import-encodec')
  e = sub.add_parser('export-musicgen', help='a run made by import-musicgen '
                     "(fine-tuned or not) -> a folder transformers' "
                     'MusicgenForConditionalGeneration.from_pretrained loads')
  e.add_argument('--workdir', required=True, help='the LM run')
  e.add_argument('--out', required=True, metavar='DIR',
                 help='the folder to write (config.json, model.safetensors, '
                 'generation_config.json, the tokenizer files)')
  e.add_argument('--codec-workdir', default=None,
                 help='the EnCodec run (default: RUN/codec, made by the import)')
  e.add_argument('--step', type=int, default=None,
                 help='checkpoint step (default: the latest)')
  return {'import-encodec': import_encodec, 'export-encodec': export_encodec,
          'import-heartmula': import_heartmula, 'import-dac': import_dac,
          'export-dac': export_dac, 'import-musicgen': import_musicgen,
          'export-musicgen': export_musicgen}


def _export_parser(sub, verb: str, arch: str, cls: str, importer: str) -> None:
  """An export verb: --workdir (a codec run), --out, --step."""
  e = sub.add_parser(verb, help=f'a codec run of {arch} architecture -> a '
                     f"folder transformers' {cls}.from_pretrained loads")
  e.add_argument('--workdir', required=True, help='the codec run (e.g. one '
                 f'made by {importer} and fine-tuned)')
  e.add_argument('--out', required=True, metavar='DIR',
                 help='the folder to write (config.json + model.safetensors)')
  e.add_argument('--step', type=int, default=None,
                 help='checkpoint step (default: the latest)')


def _run(module: str, fn: str, *args, **kwargs) -> int:
  """Joins the processes of a multi-host job, then imports `module` (lazily,
  so `musicjax --help` stays fast, and only after the join: jax must not
  start its backends first), calls its `fn` and prints the JSON result."""
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  result = getattr(importlib.import_module(module), fn)(*args, **kwargs)
  print(json.dumps(result))
  return 0


def export_musicgen(args, overrides: list[str]) -> int:
  if overrides:
    from musicjax.errors import UserError
    raise UserError('export-musicgen takes no --config overrides: the run '
                    'and its released config.json fix the folder')
  return _run('musicjax.export.released.musicgen_export', 'export_workdir',
              args.workdir, args.out, args.step, args.codec_workdir)


def import_heartmula(args, overrides: list[str]) -> int:
  return _run('musicjax.export.import_heartmula', 'import_folder',
              args.from_dir, args.workdir, args.config, overrides)


def import_musicgen(args, overrides: list[str]) -> int:
  return _run('musicjax.export.import_musicgen', 'import_folder',
              args.from_dir, args.workdir, overrides)


def import_dac(args, overrides: list[str]) -> int:
  return _run('musicjax.export.import_codec', 'import_folder',
              args.from_dir, args.workdir, args.config, overrides)


def export_dac(args, overrides: list[str]) -> int:
  return _run('musicjax.export.released.dac_export', 'export_workdir',
              args.workdir, args.out, args.step, overrides)


def import_encodec(args, overrides: list[str]) -> int:
  return _run('musicjax.export.import_codec', 'import_folder', args.from_dir,
              args.workdir, args.config, overrides, family='encodec')


def export_encodec(args, overrides: list[str]) -> int:
  return _run('musicjax.export.released.encodec_export', 'export_workdir',
              args.workdir, args.out, args.step, overrides)
