"""`musicjax import-heartmula`: a released HeartMuLa folder -> a new LM run."""
from __future__ import annotations

import json


def register(sub) -> dict:
  p = sub.add_parser('import-heartmula', help="heartlib's released HeartMuLa "
                     'folder -> an LM run (generate, fine-tune, eval, export)')
  p.add_argument('--from', dest='from_dir', required=True, metavar='DIR',
                 help='the released folder (HeartMuLa-oss-3B/, HeartCodec-oss/,'
                 ' tokenizer.json, gen_config.json) or its HeartMuLa-oss-* '
                 'folder')
  p.add_argument('--workdir', required=True,
                 help='the new run directory (must not exist, or be empty)')
  p.add_argument('--config', default=None, metavar='PATH',
                 help='our LM config of the model (file or shipped name); '
                 "default: the shipped one of the folder's flavors "
                 '(lm/heartmula_oss_3b). Overrides: --config.a.b=value.')
  return {'import-heartmula': import_heartmula}


def import_heartmula(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.export import import_heartmula as import_lib
  print(json.dumps(import_lib.import_folder(args.from_dir, args.workdir,
                                            args.config, overrides)))
  return 0
