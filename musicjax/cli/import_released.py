"""`musicjax import-heartmula` / `import-dac` / `export-dac`: released
checkpoints of other projects <-> musicjax runs."""
from __future__ import annotations

import json


def _import_parser(sub, verb: str, summary: str, from_help: str,
                   config_help: str) -> None:
  """An import verb: --from, --workdir (a new run) and --config."""
  p = sub.add_parser(verb, help=summary)
  p.add_argument('--from', dest='from_dir', required=True, metavar='DIR',
                 help=from_help)
  p.add_argument('--workdir', required=True,
                 help='the new run directory (must not exist, or be empty)')
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

  e = sub.add_parser('export-dac', help='a codec run of DAC\'s architecture -> '
                     "a folder transformers' DacModel.from_pretrained loads")
  e.add_argument('--workdir', required=True, help='the codec run (e.g. one '
                 'made by import-dac and fine-tuned)')
  e.add_argument('--out', required=True, metavar='DIR',
                 help='the folder to write (config.json + model.safetensors)')
  e.add_argument('--step', type=int, default=None,
                 help='checkpoint step (default: the latest)')
  return {'import-heartmula': import_heartmula, 'import-dac': import_dac,
          'export-dac': export_dac}


def import_heartmula(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.export import import_heartmula as import_lib
  print(json.dumps(import_lib.import_folder(args.from_dir, args.workdir,
                                            args.config, overrides)))
  return 0


def import_dac(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.export import import_codec
  print(json.dumps(import_codec.import_folder(args.from_dir, args.workdir,
                                              args.config, overrides)))
  return 0


def export_dac(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.export.released import dac_export
  print(json.dumps(dac_export.export_workdir(args.workdir, args.out,
                                             args.step, overrides)))
  return 0
