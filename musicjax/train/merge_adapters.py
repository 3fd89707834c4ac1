"""`musicjax merge-lora`: a LoRA run's adapters folded into its base, as a
plain run (config.lora.rank 0, no init run) that every command takes:
`export` to PyTorch, `export-musicgen`, a further fine-tuning stage, DPO.

The base is read in float32 from `init.workdir` even when the LoRA run
trained on an int8/int4 copy of it (QLoRA): the merged weights are the
released weights plus the adapters' update, not a dequantized base's.
"""
from __future__ import annotations

import copy
import os
import shutil

import jax
import ml_collections
from flax import nnx

from musicjax import config as config_lib
from musicjax.config import ConfigError
from musicjax.nn import lora
from musicjax.parallel import distributed
from musicjax.train import new_run
from musicjax.train import runs
from musicjax.train import trainer


def plain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` of a LoRA run as the config of its merged, stand-alone run."""
  c = copy.deepcopy(config)
  c.lora = config_lib.base_config().lora
  c.init = config_lib.base_config().init
  return c


def merged(workdir: str, step: int | None = None, *, verb: str = 'merge-lora'
           ) -> tuple[ml_collections.ConfigDict, trainer.Setup, nnx.State, int]:
  """(the merged run's config, its Setup, its state, the LoRA run's step
  merged) of the LoRA run in
  `workdir`: the model with the adapters folded in, the rest fresh (a new
  run's optimizer). Run it with no mesh set; arrays are on the Setup's."""
  config = runs.saved_config(workdir, verb=verb)
  if not lora.enabled(config):
    raise ConfigError(f'--workdir {workdir} is not a LoRA run '
                      f'(config.lora.rank={config.lora.rank}): its weights '
                      'are already plain; export or train it directly')
  config.lora.base = 'float'           # the released base, not its int copy
  run = runs.load_run(workdir, step, config=config, verb=verb)
  keys = tuple(run.task.warm_start_subtrees)
  for key in keys:
    lora.merge(getattr(run.state, key))
  pure = nnx.to_pure_dict(nnx.state(run.state))
  plain = plain_config(config)
  s = trainer.setup(plain)
  with jax.set_mesh(s.mesh):
    state = new_run.state_with_model(s, pure[keys[0]], key=keys[0])
  return plain, s, state, run.step


# Folders of an imported base that `generate` / `export-*` read beside the
# weights (import_heartmula, import_musicgen): the released files and a
# MusicGen's EnCodec run. The merged run keeps copies, so it stands alone.
BESIDE = ('released', 'codec')


def merge_run(workdir: str, out: str, step: int | None = None) -> dict:
  """Writes the merged run of `workdir` to the new run `out` (atomically),
  with copies of its base's released files (a LoRA run of an imported
  HeartMuLa or MusicGen merges into a run like the import)."""
  base = os.path.expanduser(runs.saved_config(workdir).init.workdir)
  plain, _, state, step = merged(workdir, step)
  with new_run.atomic_workdir(out) as tmp:
    kept = [n for n in BESIDE if os.path.isdir(os.path.join(base, n))]
    if 'released' in kept and not plain.model.text_extra_tokens:
      # The released text layout's tokenizer, now the merged run's copy.
      plain.data.tokenizer = os.path.join(os.path.abspath(out), 'released',
                                          'tokenizer.json')
    new_run.write(tmp, plain, state, 0)
    if distributed.is_primary():
      for name in kept:
        shutil.copytree(os.path.join(base, name), os.path.join(tmp, name))
  return {'workdir': out, 'from': workdir, 'step': step, 'task': plain.task,
          'kept': kept}
