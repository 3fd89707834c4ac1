"""The codec's whole state (generator, discriminator, both optimizers, RVQ EMA
buffers, step counter) and its data position survive a checkpoint exactly."""
import json
import os
import shutil

import pytest

from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf


@pytest.mark.slow
def test_resumed_codec_run_is_bit_identical(tmp_path):
  data = str(tmp_path / 'data')
  fx.good_folder(data, 4, seconds=1.0, sample_rate=8000)
  c = cf.small_config()
  c.data.kind, c.data.path, c.data.eval_fraction = 'folder', data, 0.25
  c.data.batch_size = c.data.eval_batch_size = 8
  c.loss.adv_start_step = 2  # the discriminator starts before the checkpoint
  c.loss.mel_windows, c.loss.mel_bins = (64,), (10,)
  c.train.steps, c.train.log_every = 4, 1
  c.train.eval_every, c.train.eval_steps = 4, 1
  c.train.checkpoint_every = 2
  c.checkpoint.keep = 5

  full = str(tmp_path / 'full')
  trainer.train(c, full)
  # A run that stopped at step 2: the same checkpoint, as if killed right after.
  part = str(tmp_path / 'part')
  os.makedirs(os.path.join(part, 'checkpoints'))
  shutil.copytree(os.path.join(full, 'checkpoints', '2'),
                  os.path.join(part, 'checkpoints', '2'))
  lines = metrics_lib.read_jsonl(os.path.join(full, 'metrics.jsonl'))
  with open(os.path.join(part, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in lines[:3])  # incl. a stale step 3
  trainer.train(c, part)
  resumed = metrics_lib.read_jsonl(os.path.join(part, 'metrics.jsonl'))
  drop = ('steps_per_sec',)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
  assert [r['step'] for r in resumed] == [1, 2, 3, 4]
  assert strip(resumed) == strip(lines)
  assert lines[-1]['loss/adv_d'] != 0.0  # the GAN really ran
