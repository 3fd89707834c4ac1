"""HeartMuLa's training recipe (seed 001 §3.3) as a chain of runs on one tiny
model, each a fresh run of the trainer warm-started from the last, as
`musicjax train` runs them (docs/training.md, "HeartMuLa's recipe"):

  pretrain  λ0 = 1, λk = 1
  SFT       λ0 = 2, λk = (K - k) / 10, another learning rate
  DPO       policy and frozen reference from the SFT run

Each stage's first step must see the previous stage's final weights bit for
bit, with a fresh optimizer and step counter."""
import math
import os
import types

import jax
import numpy as np
import pytest
from flax import nnx

import test_lm_dpo as D
from musicjax import config as config_lib
from musicjax.config import ConfigError
from musicjax.data import text as text_lib
from musicjax.lm import dpo as dpo_lib
from musicjax.lm import model as model_lib
from musicjax.lm import task as task_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import runs
from musicjax.train import trainer

PRETRAIN_LR, SFT_LR, DPO_LR = 1e-2, 3e-3, 1e-3
SFT_LAMBDA0 = 2.0                     # seed 001 §3.3.2


def _pure(tree):
  return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(tree)))


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _differs(a, b):
  return any(np.any(x != y) for x, y in zip(jax.tree.leaves(a),
                                             jax.tree.leaves(b)))


def _stage(task, tokenizer, lr, steps, **sections):
  c = D._config(task, tokenizer)  # pylint: disable=protected-access
  c.data.batch_size = c.data.eval_batch_size = 8   # one per forced CPU device
  c.optim.lr, c.optim.warmup_steps = lr, 1
  c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, 1, steps
  c.train.eval_every = 1000
  c.summary.seconds = 0
  for section, keys in sections.items():
    c[section].update(keys)
  return c


def _records(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))


def _final_model(workdir):
  return _pure(nnx.state(runs.load_run(workdir).state.model))


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """The three runs, and the state each one's first step started from (as the
  trainer made it: `_initial_state`, copied to the host before the step
  donates it)."""
  root = tmp_path_factory.mktemp('recipe')
  tokenizer = str(root / 'tokenizer.json')
  text_lib.TextTokenizer.train([D.TAGS, D.LYRICS] * 4, D.TOKENIZER_VOCAB,
                               tokenizer)
  wd = {k: str(root / k) for k in ('pretrain', 'sft', 'dpo')}
  pre = _stage('lm', tokenizer, PRETRAIN_LR, 3)
  sft = _stage('lm', tokenizer, SFT_LR, 2, init={'workdir': wd['pretrain']},
               loss={'global_weight': SFT_LAMBDA0, 'local_weighting': 'sft'})
  pairs = D._write_pairs(str(root / 'pairs.jsonl'), sft, 6)  # pylint: disable=protected-access
  dpo = _stage('lm_dpo', tokenizer, DPO_LR, 2, init={'workdir': wd['sft']},
               dpo={'pairs': pairs})
  starts = {}
  real = trainer._initial_state  # pylint: disable=protected-access
  with pytest.MonkeyPatch.context() as mp:
    for name, c in (('pretrain', pre), ('sft', sft), ('dpo', dpo)):
      def spy(*args, name=name, **kwargs):
        state, start, counters = real(*args, **kwargs)
        starts[name] = (start, _pure(state))
        return state, start, counters
      mp.setattr(trainer, '_initial_state', spy)
      trainer.train(c, wd[name])
  return types.SimpleNamespace(wd=wd, config={'pretrain': pre, 'sft': sft},
                               starts=starts)


def test_sft_starts_from_the_pretrained_weights_with_a_fresh_optimizer(chain):
  pre_step, pre0 = chain.starts['pretrain']
  sft_step, sft0 = chain.starts['sft']
  pretrained = _final_model(chain.wd['pretrain'])
  assert pre_step == sft_step == 0
  _equal(sft0['model'], pretrained)
  assert _differs(pre0['model'], pretrained)   # pretraining moved them
  # Fresh: the optimizer as a new run makes it (Adam moments and count 0),
  # not the pretrained run's moments.
  _equal(sft0['opt'], pre0['opt'])
  pre_opt = _pure(nnx.state(runs.load_run(chain.wd['pretrain']).state.opt))
  assert _differs(pre_opt, pre0['opt'])
  assert int(sft0['step']) == 0
  assert [r['step'] for r in _records(chain.wd['sft'])] == [1, 2]
  assert _differs(_final_model(chain.wd['sft']), pretrained)


def test_sft_loss_has_the_sft_codebook_weights(chain):
  """The SFT run's step-1 loss (on the pretrained weights, before the update)
  is λ0 L0 + 1/(K-1) Σ λk Lk with λ0 = 2, λk = (K - k) / 10 (seed 001 eq. 8),
  recomputed here from the pretrained weights and the run's first batch."""
  c = chain.config['sft']
  k = c.model.num_codebooks
  batch = next(iter(task_lib.LMTask(c).dataset('train', 0, 1)))
  model = runs.load_run(chain.wd['pretrain']).state.model
  _, m = nnx.jit(lambda mo, b: model_lib.loss_and_metrics(
      mo, b, 1.0, 'uniform', c.data.max_frames))(model, batch)
  ce = np.array([float(m[f'ce/{i}']) for i in range(k)], np.float64)
  lam = np.array([(k - i) / 10 for i in range(1, k)])    # 0.2, 0.1 for K = 3
  want = SFT_LAMBDA0 * ce[0] + np.sum(lam * ce[1:]) / (k - 1)
  pretrain_weights = ce[0] + np.mean(ce[1:])
  got = _records(chain.wd['sft'])[0]
  np.testing.assert_allclose([got[f'ce/{i}'] for i in range(k)], ce, rtol=1e-5)
  np.testing.assert_allclose(got['loss'], want, rtol=1e-5)
  assert abs(want - pretrain_weights) > 1e3 * 1e-5 * want   # a real change
  # The pretraining run logged its loss with λ0 = 1, λk = 1.
  first = _records(chain.wd['pretrain'])[0]
  np.testing.assert_allclose(
      first['loss'], first['ce/0'] + np.mean(
          [first[f'ce/{i}'] for i in range(1, k)]), rtol=1e-5)


def test_dpo_policy_and_reference_are_the_sft_model(chain):
  step, dpo0 = chain.starts['dpo']
  sft_final = _final_model(chain.wd['sft'])
  assert step == 0 and int(dpo0['step']) == 0
  _equal(dpo0['model'], sft_final)
  _equal(dpo0['ref'], sft_final)
  # A fresh optimizer: every Adam moment and count is 0.
  assert not any(np.any(x) for x in jax.tree.leaves(dpo0['opt']))
  recs = _records(chain.wd['dpo'])
  assert [r['step'] for r in recs] == [1, 2]
  # Step 1 ran with policy == reference: -log σ(0) = log 2, margins 0.
  assert recs[0]['dpo/loss'] == pytest.approx(math.log(2), abs=1e-5)
  assert recs[0]['dpo/reward_margin'] == pytest.approx(0.0, abs=1e-5)
  # After the steps the reference is still the SFT model; the policy moved.
  st = runs.load_run(chain.wd['dpo']).state
  _equal(_pure(nnx.state(st.ref)), sft_final)
  assert _differs(_pure(nnx.state(st.model)), sft_final)


def test_dpo_tiny_takes_the_sft_run_from_the_command_line():
  """configs/lm/dpo_tiny.py names its LM run with the older key: the docs'
  DPO command overrides that key; naming the new one as well is refused with
  the flag that clears the file's value, which then works."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), 'configs', 'lm', 'dpo_tiny.py')
  c = config_lib.load(path, ['dpo.init_workdir=runs/recipe/sft'])
  assert dpo_lib.init_source(c) == ('runs/recipe/sft', 'config.dpo.init_workdir')
  c = config_lib.load(path, ['init.workdir=runs/recipe/sft'])
  with pytest.raises(ConfigError) as e:
    dpo_lib.init_source(c)
  assert "config.dpo.init_workdir='runs/demo/lm' differ" in str(e.value)
  assert "--config.dpo.init_workdir=''" in str(e.value)
  c = config_lib.load(path, ['init.workdir=runs/recipe/sft', 'dpo.init_workdir='])
  assert dpo_lib.init_source(c) == ('runs/recipe/sft', 'config.init.workdir')
