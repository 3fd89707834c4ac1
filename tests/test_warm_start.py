"""Warm start (musicjax/train/warm_start.py): one implementation for every
task. A fresh run takes the weights of `config.init.workdir`'s latest
checkpoint (optimizer fresh); the network must match, except for named,
checked differences; a resumed run ignores `init`."""
import copy
import os

import jax
import numpy as np
import pytest
from flax import nnx

import codec_fixtures as CF
import lm_fixtures as F
from musicjax.config import ConfigError
from musicjax.lm import dpo
from musicjax.parallel import rules as rules_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import new_run
from musicjax.train import trainer
from musicjax.train import warm_start


def _pure(state):
  return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(state)))


def _write_run(config, workdir, seed):
  """A run like an import's: `config`, one checkpoint (step 0) of a fresh
  state initialised with `seed`."""
  c = copy.deepcopy(config)
  c.train.seed = seed
  s = trainer.setup(c)
  with jax.set_mesh(s.mesh):
    state = trainer.init_state(s)
    pure = _pure(state)
    new_run.write(workdir, c, state, 0)
  return pure


def _warm(config):
  """The state a fresh run of `config` starts from (the trainer's path)."""
  s = trainer.setup(config)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    return s, _pure(s.task.warm_start(trainer.init_state(s), s.state_shardings))


def _fresh(config):
  s = trainer.setup(config)
  with jax.set_mesh(s.mesh):
    return _pure(trainer.init_state(s))


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _differs(a, b):
  return any(np.any(x != y) for x, y in zip(jax.tree.leaves(a),
                                             jax.tree.leaves(b)))


def _lm_config():
  c = F.small_config()
  c.model.backbone.num_layers = c.model.local.num_layers = 1
  c.train.steps = 2
  c.data.batch_size = c.data.eval_batch_size = 8   # one per forced CPU device
  return c


def _codec_config():
  c = CF.small_config()
  c.data.batch_size = c.data.eval_batch_size = 8
  return c


@pytest.fixture(scope='module')
def lm_old(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('warm') / 'old_lm')
  return wd, _write_run(_lm_config(), wd, seed=7)


def test_lm_starts_from_the_runs_weights_with_a_fresh_optimizer(lm_old):
  wd, old = lm_old
  c = _lm_config()
  # Loss weights, learning rate, data and train keys differ freely; so do
  # the model keys that change neither shapes nor function.
  c.optim.lr = 1e-2
  c.loss.global_weight = 2.0
  c.data.batch_size = 16
  c.train.steps = 50
  c.model.backbone.remat = 'full'
  c.init.workdir = wd
  _, got = _warm(c)
  _equal(got['model'], old['model'])
  fresh = _fresh(c)
  assert _differs(fresh['model'], old['model'])    # really restored
  _equal(got['opt'], fresh['opt'])                  # optimizer fresh
  assert int(got['step']) == 0
  # Without init.workdir nothing is read.
  c.init.workdir = ''
  _, same = _warm(c)
  _equal(same, fresh)


def test_another_network_is_a_config_error_before_compile(lm_old, tmp_path):
  wd, _ = lm_old
  c = _lm_config()
  c.init.workdir = wd
  c.model.backbone.num_layers = 2
  new = str(tmp_path / 'new')
  with pytest.raises(ConfigError) as e:
    trainer.train(c, new)
  msg = str(e.value)
  assert msg.startswith('config.model.backbone.num_layers = 2, but the run in '
                        f'{wd} (config.init.workdir) was trained with 1'), msg
  assert 'init.model_changes' in msg
  assert not os.path.exists(os.path.join(new, metrics_lib.METRICS_FILE))
  # A run of another task.
  a = _codec_config()
  a.init.workdir = wd
  with pytest.raises(ConfigError, match='config.init.workdir .* is an LM run'):
    warm_start.plan(trainer.setup(a).task)
  # A key named as changed must exist.
  c = _lm_config()
  c.init.workdir = wd
  c.init.model_changes = ('backbone.num_layer',)
  with pytest.raises(ConfigError, match="model_changes names 'backbone.num_layer'"):
    warm_start.plan(trainer.setup(c).task)


def test_new_heads_start_fresh_only_when_named(lm_old, tmp_path):
  wd, old = lm_old
  c = _lm_config()
  c.init.workdir = wd
  c.model.uncond_embedding = True      # adds model/uncond_embed
  with pytest.raises(ConfigError, match=r'config\.model\.uncond_embedding = True'):
    _warm(c)
  c.init.model_changes = ('uncond_embedding',)
  with pytest.raises(ConfigError) as e:
    _warm(c)
  assert 'model/uncond_embed' in str(e.value)
  assert 'config.init.new_params' in str(e.value)
  c.init.new_params = ('model/uncond*', 'model/head0')   # a slip: not new
  with pytest.raises(ConfigError, match="pattern 'model/head0' matches none"):
    _warm(c)
  c.init.new_params = ('model/uncond*',)
  s, got = _warm(c)
  fresh = _fresh(c)
  new = got['model'].pop('uncond_embed')
  np.testing.assert_array_equal(new, fresh['model']['uncond_embed'])
  _equal(got['model'], old['model'])
  # The other way round, weights would be dropped: an error naming them.
  wd2 = str(tmp_path / 'with_uncond')
  _write_run(c, wd2, seed=3)
  back = _lm_config()
  back.init.workdir = wd2
  back.init.model_changes = ('uncond_embedding',)
  with pytest.raises(ConfigError, match='lacks: model/uncond_embed'):
    _warm(back)
  # A changed shape is named with both shapes.
  wide = _lm_config()
  wide.init.workdir = wd
  wide.model.codebook_size = 32
  wide.init.model_changes = ('codebook_size',)
  with pytest.raises(ConfigError, match=r'weight model/\S+ has shape'):
    _warm(wide)


def test_resumed_run_ignores_init(lm_old, tmp_path):
  wd, _ = lm_old
  c = _lm_config()
  c.train.steps = c.train.log_every = c.train.checkpoint_every = 1
  c.train.eval_every = 0
  c.checkpoint.async_save = False
  c.init.workdir = wd
  run = str(tmp_path / 'run')
  trainer.train(c, run)
  c.train.steps = 2
  c.init.workdir = str(tmp_path / 'gone')     # would fail on a fresh run
  trainer.train(c, run)
  steps = [r['step'] for r in metrics_lib.read_jsonl(
      os.path.join(run, metrics_lib.METRICS_FILE))]
  assert steps == [1, 2]


def test_codec_takes_generator_and_discriminator(tmp_path):
  old_c = _codec_config()
  wd = str(tmp_path / 'codec')
  old = _write_run(old_c, wd, seed=5)
  c = _codec_config()
  c.init.workdir = wd
  c.optim.g_lr = 3e-4                     # not the network
  c.loss.mel_weight = 5.0
  _, got = _warm(c)
  for k in ('generator', 'discriminator'):
    _equal(got[k], old[k])
  fresh = _fresh(c)
  assert _differs(fresh['generator'], old['generator'])
  _equal(got['g_opt'], fresh['g_opt'])
  bad = _codec_config()
  bad.init.workdir = wd
  bad.disc.period_channels = (4, 16)      # the discriminator is checked too
  with pytest.raises(ConfigError, match=r'config\.disc\.period_channels'):
    _warm(bad)


@pytest.mark.slow   # 25 s: the tiny HeartCodec's init compiles
def test_heartcodec_takes_its_model(tmp_path):
  from musicjax import config as config_lib
  tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), 'configs', 'codec', 'heartcodec_train_tiny.py')
  over = ['data.batch_size=8', 'data.eval_batch_size=8']
  wd = str(tmp_path / 'hc')
  old = _write_run(config_lib.load(tiny, over), wd, seed=5)
  c = config_lib.load(tiny, over + [f'init.workdir={wd}', 'optim.lr=3e-5',
                                    'model.quantizer.kmeans_init=false'])
  _, got = _warm(c)
  _equal(got['model'], old['model'])
  assert _differs(_fresh(c)['model'], old['model'])


def test_dpo_init_workdir_is_the_older_name_of_init_workdir():
  from musicjax.config import for_task
  c = for_task('lm_dpo')
  c.dpo.init_workdir = 'runs/lm'
  assert dpo.init_source(c) == ('runs/lm', 'config.dpo.init_workdir')
  c.init.workdir = 'runs/lm'
  assert dpo.init_source(c) == ('runs/lm', 'config.init.workdir')
  c.init.workdir = 'runs/other'
  with pytest.raises(ConfigError, match='config.init.workdir=.*differ'):
    dpo.init_source(c)
  c.init.workdir = c.dpo.init_workdir = ''
  with pytest.raises(ConfigError, match='DPO fine-tunes a trained LM'):
    dpo.init_source(c)
