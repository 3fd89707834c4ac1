"""Gradient accumulation (config.train.grad_accum, musicjax/train/accumulate.py):
a step in 4 micro-batches gives the loss, metrics, gradient norm and updated
parameters of the same step on the whole batch, also where the micro-batches
hold different numbers of tokens (the LM's loss is a per-codebook token
mean), and on a mesh whose batch axis is sharded.

Tolerance: float32, rtol 1e-5 / atol 1e-6 on metrics, 1e-5 on parameters
after 3 Adam steps (only the summation order differs)."""
import copy

import jax
import numpy as np
import pytest
from flax import nnx

import codec_fixtures as CF
import lm_fixtures as F
from musicjax.config import ConfigError, for_task
from musicjax.lm import dpo
from musicjax.lm import task as lm_task
from musicjax.parallel import rules as rules_lib
from musicjax.train import accumulate
from musicjax.train import trainer

B, N = 8, 4   # batch rows, micro-batches


def _pure(state):
  return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(state)))


def _lm_config(accum, data=1):
  c = F.small_config()
  c.data.batch_size = c.data.eval_batch_size = B
  c.model.backbone.num_layers = c.model.local.num_layers = 1
  c.optim.lr, c.optim.warmup_steps = 1e-2, 1
  c.mesh.data = data
  c.train.grad_accum = accum
  return c


def _ragged(batch, step):
  """Rows cut to different lengths, so micro-batch i (rows i, i + 4) holds
  other token counts than its neighbours."""
  out = dict(batch)
  valid = np.array(batch['valid'])
  s = valid.shape[1]
  for r in range(valid.shape[0]):
    valid[r, s - ((3 * r + step) % 7) * 2:] = False
  out['valid'] = valid
  return out


def _lm_batches(config, n=3):
  it = iter(lm_task.LMTask(config).dataset('train', 0, 1))
  return [_ragged(next(it), i) for i in range(n)]


def _steps(config, batches, devices):
  s = trainer.setup(config, devices)
  spec = s.task.batch_spec(config.data.batch_size)
  metrics = []
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    step_fn = trainer.make_train_step(s)
    for i, b in enumerate(batches, 1):
      state, m, bad = step_fn(state, trainer.global_batch(b, spec,
                                                          s.batch_shardings),
                              np.int32(i))
      assert not bool(bad)
      metrics.append(jax.device_get(m))
  return metrics, _pure(state)


def _assert_same(got, want):
  (gm, gp), (wm, wp) = got, want
  for a, b in zip(gm, wm):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5), gp, wp)


@pytest.fixture(scope='module')
def lm_whole_batch():
  c = _lm_config(1)
  batches = _lm_batches(c)
  return batches, _steps(c, batches, jax.devices()[:1])


def test_lm_accumulation_equals_the_whole_batch(lm_whole_batch):
  batches, want = lm_whole_batch
  c = _lm_config(N)
  # The micro-batches really hold different token counts, and the mean of
  # their losses is not the batch's: a naive accumulation would fail here.
  task = lm_task.LMTask(c)
  with nnx.use_eager_sharding(False):
    model = task.create_state(nnx.Rngs(0)).model
  b = {k: jax.numpy.asarray(v) for k, v in batches[0].items()}
  micro = [jax.tree.map(lambda x, i=i: x[i::N], b) for i in range(N)]
  sums = [task._loss_sums(model, m) for m in micro]   # pylint: disable=protected-access
  tokens = [float(np.sum(s['tokens'])) for s in sums]
  assert len(set(tokens)) > 1, tokens
  whole, _ = task._loss(model, b)                      # pylint: disable=protected-access
  naive = np.mean([float(task._loss(model, m)[0]) for m in micro])  # pylint: disable=protected-access
  assert abs(naive - float(whole)) > 1e-3, (naive, float(whole))
  total = jax.tree.map(lambda *x: sum(x), *sums)
  np.testing.assert_allclose(task._loss_from_sums(total)[0], whole, rtol=1e-6)  # pylint: disable=protected-access

  got = _steps(c, batches, jax.devices()[:1])
  _assert_same(got, want)
  assert got[0][0]['optim/grad_norm'] > 0


def test_lm_accumulation_on_a_sharded_batch(lm_whole_batch):
  """2 devices along 'data': each micro-batch (2 rows) keeps one row per
  device, and the result is still the one-device whole batch's."""
  batches, want = lm_whole_batch
  got = _steps(_lm_config(N, data=2), batches, jax.devices()[:2])
  _assert_same(got, want)


def test_split_keeps_micro_batches_sharded():
  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  rules = rules_lib.normalize_rules((('batch', 'data'),))
  x = jax.device_put(np.arange(B * 3).reshape(B, 3),
                     jax.sharding.NamedSharding(mesh, jax.P('data')))
  with jax.set_mesh(mesh), rules_lib.use_rules(rules):
    y = jax.jit(lambda x: accumulate.split({'x': x}, N)['x'])(x)
  np.testing.assert_array_equal(y, np.stack([np.asarray(x)[i::N]
                                             for i in range(N)]))
  assert y.sharding.spec == jax.P(None, 'data')
  # Micro-batch 0 (rows 0 and 4) has one row on each device.
  assert {s.data.shape for s in y.addressable_shards} == {(N, 1, 3)}


@pytest.mark.slow   # 25 s: two compiles of a wider LM step
def test_accumulation_keeps_one_micro_batch_live():
  """The point of it: XLA's scratch memory for a step shrinks with the
  micro-batch (XLA:CPU, jax 0.10.2: 21.0 -> 5.8 MB for 32 rows in 4)."""
  temp = {}
  for n in (1, N):
    c = _lm_config(n)
    c.data.batch_size = c.data.eval_batch_size = 32
    c.model.codebook_size, c.data.max_frames, c.model.max_seq_len = 256, 32, 64
    s = trainer.setup(c, jax.devices()[:1])
    spec = s.task.batch_spec(32)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=s.batch_shardings[k])
             for k, v in spec.items()}
    with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
      state = trainer.init_state(s)
      compiled = trainer.make_train_step(s).lower(
          state, batch, np.int32(1)).compile()
    temp[n] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[N] < 0.5 * temp[1], temp


def _dpo_config(accum):
  c = for_task('lm_dpo')
  small = _lm_config(accum)
  for section in ('model', 'data', 'optim', 'mesh'):
    c[section].update(small[section].to_dict())
  c.train.grad_accum = accum
  c.dpo.beta = 0.5
  return c


def _dpo_batches(config, n=2):
  lm = _lm_batches(_lm_config(1), 2 * n)
  out = []
  for i in range(n):
    w, l = lm[2 * i], lm[2 * i + 1]
    out.append({f'{side}/{k}': src[k] for side, src in (('winner', w),
                                                         ('loser', l))
                for k in dpo.SEQ_KEYS})
  return out


def test_dpo_accumulation_equals_the_whole_batch():
  batches = _dpo_batches(_dpo_config(1))
  want = _steps(_dpo_config(1), batches, jax.devices()[:1])
  got = _steps(_dpo_config(N), batches, jax.devices()[:1])
  _assert_same(got, want)
  # Policy and reference start apart (no warm start here): a real loss.
  assert abs(float(want[0][0]['dpo/reward_margin'])) > 1e-4


def _accomp_config(accum, **model_loss):
  c = for_task('accomp')
  m = c.model
  m.num_codebooks, m.codebook_size, m.text_vocab_size = 2, 16, 8
  bb = m.backbone
  bb.num_layers, bb.dim, bb.num_heads, bb.num_kv_heads, bb.mlp_dim = 1, 32, 4, 2, 64
  d = c.data
  d.kind, d.max_frames, d.synthetic_min_frames = 'synthetic', 16, 6  # ragged rows
  d.reference_frames, d.max_text_tokens = 4, 4
  d.batch_size = d.eval_batch_size = B
  c.optim.lr, c.optim.warmup_steps = 1e-2, 1
  c.mesh.data = 1
  c.train.grad_accum = accum
  for k, v in model_loss.items():
    section, key = k.split('__')
    c[section][key] = v
  return c


@pytest.mark.parametrize('keys', [
    {'loss__weighting': 'elbo', 'loss__rtd_weight': 0.2},   # weighted MLM + RTD
    {'model__decode': 'ar', 'loss__rtd_weight': 0.0},       # the 'ar' ablation
], ids=['diffusion', 'ar'])
def test_accomp_accumulation_equals_the_whole_batch(keys):
  """The step's random masks, times and condition dropout are drawn for the
  whole batch and split with it, so micro-batches see what it would."""
  from musicjax.accomp import task as accomp_task
  it = iter(accomp_task.AccompTask(_accomp_config(1, **keys)).dataset(
      'train', 0, 1))
  batches = [next(it) for _ in range(3)]
  want = _steps(_accomp_config(1, **keys), batches, jax.devices()[:1])
  got = _steps(_accomp_config(N, **keys), batches, jax.devices()[:1])
  _assert_same(got, want)


def test_bad_accumulation_configs_name_the_key():
  c = _lm_config(3)
  with pytest.raises(ConfigError, match=r'config\.data\.batch_size=8 is not '
                     r'divisible by config\.train\.grad_accum=3'):
    trainer.setup(c, jax.devices()[:1])
  c = _lm_config(4, data=2)         # 8 rows / 4 = 2 per micro-batch, on 2 devices
  trainer.setup(c, jax.devices()[:2])
  c = copy.deepcopy(c)
  c.mesh.data = 4                   # 2 rows cannot split over 4 devices
  with pytest.raises(ConfigError, match=r'grad_accum=4 x the data-parallel size 4'):
    trainer.setup(c, jax.devices()[:4])
  codec = CF.small_config()
  codec.data.batch_size = codec.data.eval_batch_size = 8
  codec.train.grad_accum = 2
  with pytest.raises(ConfigError, match=r"config\.train\.grad_accum=2: task "
                     r"'codec' does not accumulate"):
    trainer.setup(codec)
  c = _lm_config(0)
  with pytest.raises(ConfigError, match=r'config\.train\.grad_accum must be > 0'):
    from musicjax import config as config_lib
    config_lib.validate(c, for_task('lm'))
