"""`musicjax export` / `import-torch`: a run <-> safetensors for PyTorch;
`merge-lora`: a LoRA run -> a plain run."""
from __future__ import annotations

import json

from musicjax.cli import configs
from musicjax.cli import flags


def register(sub) -> dict:
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
  flags.add_config(ex, required=False)

  it = sub.add_parser('import-torch', help='an export (e.g. fine-tuned in '
                      'PyTorch) -> a checkpoint in a new WORKDIR')
  it.add_argument('--from', dest='from_dir', required=True, metavar='DIR',
                  help='directory written by `musicjax export` or '
                  'musicjax_torch.save_pretrained')
  it.add_argument('--workdir', required=True, help='new run directory')
  flags.add_config(it, required=False)
  me = sub.add_parser('merge-lora', help='a LoRA run\'s adapters folded into '
                      'its base -> a plain run in a new OUT (for export, '
                      'DPO, a next stage)')
  me.add_argument('--workdir', required=True, help='a LoRA run '
                  '(config.lora.rank > 0)')
  me.add_argument('--out', required=True, metavar='RUN', help='new run directory')
  me.add_argument('--step', type=int, default=None,
                  help='checkpoint step (default: the latest)')
  return {'export': export, 'import-torch': import_torch,
          'merge-lora': merge_lora}


def export(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  config = configs.load_config(args, overrides)
  from musicjax.export import export as export_lib
  print(json.dumps(export_lib.export_workdir(
      config, args.workdir, args.out, dtype=args.dtype, step=args.step,
      max_shard_bytes=int(args.max_shard_gb * 1e9))))
  return 0


def import_torch(args, overrides: list[str]) -> int:
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.export import import_torch as import_lib
  config = configs.load_config(args, overrides) if args.config else None
  print(json.dumps(import_lib.import_export(args.from_dir, args.workdir,
                                            config)))
  return 0


def merge_lora(args, overrides: list[str]) -> int:
  del overrides
  from musicjax.parallel import distributed
  distributed.maybe_initialize()
  from musicjax.train import merge_adapters
  print(json.dumps(merge_adapters.merge_run(args.workdir, args.out, args.step)))
  return 0
