"""musicjax.train.runs: loading a trained run, and the same-model check."""
import copy
import os

import jax
import numpy as np
import pytest
from flax import nnx

import audio_fixtures as fx
import codec_fixtures as cf
import lm_fixtures as lf
from musicjax import config as config_lib
from musicjax.codec import chunked
from musicjax.codec.model import CodecModel
from musicjax.config import ConfigError
from musicjax.lm.model import AudioLM
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import runs
from musicjax.train import trainer

SR = 8000
LM_TASKS = ('lm', 'lm_dpo')


def _params(module) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


@pytest.fixture(scope='module')
def codec_wd(tmp_path_factory):
  """A tiny codec trained 2 steps, with checkpoints at steps 1 and 2."""
  tmp = tmp_path_factory.mktemp('codec')
  data = str(tmp / 'data')
  fx.good_folder(data, 4, seconds=1.0, sample_rate=SR)
  c = cf.folder_run_config(data)
  c.train.checkpoint_every = 1
  wd = str(tmp / 'run')
  trainer.train(c, wd)
  return wd


@pytest.fixture(scope='module')
def lm_wd(tmp_path_factory):
  """A tiny LM on synthetic tokens, trained 1 step."""
  c = lf.small_config()
  c.data.batch_size = c.data.eval_batch_size = 8   # one per forced CPU device
  c.train.steps = c.train.checkpoint_every = c.train.log_every = 1
  c.train.eval_every = 1000
  wd = str(tmp_path_factory.mktemp('lm') / 'run')
  trainer.train(c, wd)
  return wd


def test_codec_run_loads_from_its_config_json(codec_wd):
  run = runs.load_run(codec_wd, expect='codec')
  assert run.step == 2 and run.workdir == codec_wd
  assert run.config.task == 'codec'
  assert run.config.to_dict() == config_lib.load_saved(codec_wd).to_dict()
  assert isinstance(run.model, CodecModel)
  assert run.model is run.state.generator     # the task's inference model
  wave = cf.tone_mix(0.25, SR)[0]
  with run.activate():
    codes = chunked.encode_array(run.model, wave, progress=False)
  k = run.config.model.rvq.num_codebooks
  assert codes.shape == (-(-len(wave) // run.model.hop_length), k)
  assert codes.min() >= 0 and codes.max() < run.config.model.rvq.codebook_size


def test_step_selection(codec_wd):
  first = runs.load_run(codec_wd, 1)
  last = runs.load_run(codec_wd)
  assert (first.step, last.step) == (1, 2)
  # Two different checkpoints: the step's own weights were restored.
  assert any(not np.array_equal(a, b) for a, b in
             zip(_params(first.model), _params(last.model)))
  again = runs.load_run(codec_wd, 2, config=config_lib.load_saved(codec_wd))
  for a, b in zip(_params(again.model), _params(last.model)):
    np.testing.assert_array_equal(a, b)
  changed = runs.load_run(codec_wd, overrides=['--config.train.steps=9'])
  assert changed.config.train.steps == 9 and changed.step == 2
  with pytest.raises(ConfigError, match=r'checkpoint step 7 not in .*'
                     r'checkpoints; available: \[1, 2\]'):
    runs.load_run(codec_wd, 7)


def test_lm_run_loads_the_trained_weights(lm_wd):
  run = runs.load_run(lm_wd, expect=LM_TASKS)
  assert run.step == 1 and run.config.task == 'lm'
  assert isinstance(run.model, AudioLM)
  assert len(run.mesh.devices.flat) == len(jax.devices())
  s = trainer.setup(run.config)
  want, step = ckpt_lib.restore_subtree(
      lm_wd, run.config.checkpoint.keep, 'model', s.abstract_state['model'],
      s.state_shardings['model'])
  assert step == 1
  got = nnx.to_pure_dict(nnx.state(run.model))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got),
               jax.tree.map(np.asarray, want))


def test_wrong_kind_names_both_kinds(codec_wd, lm_wd):
  with pytest.raises(ConfigError) as e:
    runs.load_run(lm_wd, expect='codec')
  msg = str(e.value)
  assert msg.startswith(f"--workdir {lm_wd} is an LM run (config.task 'lm' in "
                        f'{lm_wd}/config.json), but a codec run '
                        "(config.task 'codec') is needed"), msg
  assert 'configs/codec/' in msg, msg
  with pytest.raises(ConfigError) as e:
    runs.load_run(codec_wd, expect=LM_TASKS, verb='generate',
                  flag='--codec-workdir')
  msg = str(e.value)
  assert f'--codec-workdir {codec_wd} is a codec run' in msg, msg
  assert ("`musicjax generate` needs an LM run (config.task 'lm' or "
          "'lm_dpo')") in msg, msg
  # A config of another kind than the run's, given with it.
  with pytest.raises(ConfigError, match=f"the config given for --workdir "
                     f"{codec_wd} has config.task 'lm'"):
    runs.load_run(codec_wd, config=lf.small_config(), expect='codec')


def test_missing_empty_and_untrained_workdirs(tmp_path):
  nowhere = str(tmp_path / 'nowhere')
  with pytest.raises(ConfigError, match=f'--workdir {nowhere} has no '
                     r'config.json \(no such directory\)'):
    runs.load_run(nowhere, expect='codec')
  assert not os.path.exists(nowhere)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ConfigError) as e:
    runs.load_run(str(empty), expect='lm', flag='--codec-workdir')
  msg = str(e.value)
  assert f'--codec-workdir {empty} has no config.json' in msg, msg
  assert 'configs/lm/' in msg, msg
  with pytest.raises(ConfigError, match='--workdir is empty'):
    runs.load_run('')
  with pytest.raises(ConfigError, match='--workdir is empty'):
    runs.load_run('', config=lf.small_config())
  config_lib.save(lf.small_config(), str(empty))
  with pytest.raises(ConfigError, match=f'--workdir {empty} has no checkpoint'):
    runs.load_run(str(empty))
  assert os.listdir(empty) == ['config.json']   # nothing created in it


def test_same_model_check(tmp_path):
  old = lf.small_config()
  wd = str(tmp_path / 'old')
  config_lib.save(old, wd)
  free = ('backbone.remat',)
  new = copy.deepcopy(old)
  new.optim.lr = old.optim.lr * 10              # not the network
  new.model.backbone.remat = 'full'             # a free key
  back = runs.check_same_model(new, wd, expect=LM_TASKS,
                               flag='config.dpo.init_workdir', free_keys=free)
  assert back.to_dict() == config_lib.load_saved(wd).to_dict()
  # Without it among the free keys, remat counts as a difference.
  with pytest.raises(ConfigError, match=r'config\.model\.backbone\.remat'):
    runs.check_same_model(new, wd, expect=LM_TASKS, flag='config.init.workdir')
  deeper = copy.deepcopy(new)
  deeper.model.backbone.num_layers = 3
  with pytest.raises(ConfigError) as e:
    runs.check_same_model(deeper, wd, expect=LM_TASKS,
                          flag='config.dpo.init_workdir', free_keys=free)
  msg = str(e.value)
  assert msg.startswith('config.model.backbone.num_layers = 3, but the run in '
                        f'{wd} (config.dpo.init_workdir) was trained with 2'), msg
  assert '--config.model.backbone.num_layers=2' in msg, msg
  # An earlier run of another task.
  with pytest.raises(ConfigError) as e:
    runs.check_same_model(new, wd, expect='accomp', flag='config.init.workdir')
  msg = str(e.value)
  assert f'config.init.workdir {wd} is an LM run' in msg, msg
  assert "an accompaniment run (config.task 'accomp') is needed" in msg, msg
