"""The audio-token LM through the generic trainer: it learns synthetic Markov
songs down to their exact entropy, shards like one device, resumes exactly,
and logs per-codebook metrics with the configured loss weights."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lm_fixtures as F
from musicjax.config import for_task
from musicjax.lm import synthetic
from musicjax.parallel import rules as rules_lib
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer


def _records(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def _pure(state):
  return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(state)))


# ------------------------------------------------------- exact-entropy floor
def _markov_config(variant, steps):
  c = for_task('lm')
  d = c.data
  d.kind = 'synthetic'
  d.max_frames = 32
  d.max_text_tokens = 1           # the '<audio>' slot only
  d.batch_size = 8
  d.eval_batch_size = 16
  d.markov_branching = 2
  d.markov_noise = (2, 1)         # codebook 2 is a function of codebook 0
  m = c.model
  m.variant = variant
  m.pattern = 'delay'
  m.num_codebooks = 3
  m.codebook_size = 16
  m.text_vocab_size = 4
  m.max_seq_len = 64
  for t in (m.backbone, m.local):
    t.dim, t.num_heads, t.num_kv_heads, t.mlp_dim = 64, 4, 2, 128
  m.backbone.num_layers = 2
  m.local.num_layers = 1
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  tr = c.train
  tr.steps = tr.log_every = tr.eval_every = tr.checkpoint_every = steps
  tr.eval_steps = 4
  tr.eval_at_start = True
  c.checkpoint.async_save = False
  return c


@pytest.mark.parametrize('variant', ['global_local', 'single_stream'])
def test_training_reaches_the_exact_entropy_of_markov_songs(tmp_path, variant):
  c = _markov_config(variant, steps=300)
  d, m = c.data, c.model
  spec = synthetic.MarkovSpec(m.codebook_size, m.num_codebooks,
                              d.markov_branching, tuple(d.markov_noise),
                              d.markov_seed)
  # Exact CE floor per codebook over a window; the first frame is predicted
  # from the '<audio>' slot alone (log V), which `entropies` accounts for.
  h = spec.entropies(d.max_frames)
  # L = λ0 H0 + mean_k λk Hk with λ0 = 1 and uniform λk = 1.
  assert c.loss.global_weight == 1.0 and c.loss.local_weighting == 'uniform'
  floor = h[0] + np.mean(h[1:])
  trainer.train(c, str(tmp_path))
  recs = _records(str(tmp_path))
  assert [r['step'] for r in recs] == [0, c.train.steps]
  before, ev = recs[0], recs[-1]
  assert before['eval/loss'] > 2 * floor          # it started far away
  loss = ev['eval/loss']
  assert floor - 0.02 <= loss <= 1.02 * floor, (loss, floor, h)
  for k in range(m.num_codebooks):
    ce = ev[f'eval/ce/{k}']
    # A model cannot beat the entropy (up to the eval sample's noise) ...
    assert ce >= h[k] - 0.02, (k, ce, h[k])
    # ... and this one reaches it: within 2%, or 0.02 nats where it is 0.
    assert ce <= (1.02 * h[k] if h[k] > 0 else 0.02), (k, ce, h[k])


# ------------------------------------------------------------------ sharding
def _shard_config(data, fsdp, tensor, axis_type='auto'):
  c = F.small_config()
  c.data.batch_size = c.data.eval_batch_size = 8
  c.model.backbone.mlp_dim = c.model.local.mlp_dim = 64
  # Full-size updates from step 1, so the params are compared after real moves.
  c.optim.lr, c.optim.warmup_steps = 1e-2, 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.mesh.axis_type = axis_type
  return c


def _three_steps(config, devices):
  s = trainer.setup(config, devices)
  spec = s.task.batch_spec(config.data.batch_size)
  it = iter(s.task.dataset('train', 0, 1))
  losses = []
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    init = _pure(state)['model']['head0']   # fetched before donation
    step_fn = trainer.make_train_step(s)
    for i in range(1, 4):
      batch = trainer.global_batch(next(it), spec, s.batch_shardings)
      state, m, bad = step_fn(state, batch, np.int32(i))
      assert not bool(bad)
      losses.append(float(m['loss']))
  return s, state, losses, init


@pytest.fixture(scope='module')
def one_device_steps():
  _, state, losses, init = _three_steps(_shard_config(1, 1, 1),
                                        jax.devices()[:1])
  # The steps changed the parameters (so comparisons are not of two inits).
  assert np.abs(_pure(state)['model']['head0'] - init).max() > 1e-2
  return _pure(state), losses


@pytest.mark.parametrize('sizes', [(2, 2, 2), (1, 4, 2), (4, 1, 2)])
def test_lm_train_step_sharded_matches_one_device(sizes, one_device_steps):
  want_params, want_losses = one_device_steps
  data, fsdp, tensor = sizes
  s, state, losses, _ = _three_steps(_shard_config(data, fsdp, tensor), None)
  # Parameters really are split: the MLP hidden dim over 'tensor', its
  # 'embed' dim over 'fsdp' (when fsdp > 1), and Adam's moments alike.
  specs = rules_lib.describe(s.state_shardings)
  gate = str(P(None, 'fsdp' if fsdp > 1 else None, 'tensor'))
  assert specs['model/backbone/layers/mlp/gate'] == gate, specs
  assert specs['model/local/layers/mlp/up'] == gate, specs
  moments = [v for k, v in specs.items()
             if k.startswith('opt/') and k.endswith('backbone/layers/mlp/gate')]
  assert len(moments) == 2 and set(moments) == {gate}, specs   # mu and nu
  assert specs['model/audio_embed'] == str(
      P(None, 'tensor', 'fsdp' if fsdp > 1 else None)), specs
  arr = state['model']['backbone']['layers']['mlp']['gate'][...]
  assert str(arr.sharding.spec) == gate
  shard = arr.addressable_shards[0].data.shape
  assert shard[2] == arr.shape[2] // tensor and shard[1] == arr.shape[1] // fsdp

  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert len(set(losses)) == 3                     # three different batches
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               _pure(state), want_params)


# config.mesh.axis_type='explicit': shardings are part of the types, and the
# model reshards weights itself (rules.shard_activation); same numbers.
def test_lm_train_step_on_explicit_mesh_matches_one_device(one_device_steps):
  want_params, want_losses = one_device_steps
  _, state, losses, _ = _three_steps(_shard_config(1, 4, 2, 'explicit'), None)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               _pure(state), want_params)


# ------------------------------------------ resume, metrics and loss weights
STEPS = 6


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory):
  """A straight 6-step run, SFT loss weights, every step logged.

  One step per log window and one eval batch: like every metric, ppl/k is
  averaged over a window, so ppl/k == exp(ce/k) only holds per step.
  """
  c = F.small_config()
  c.data.batch_size = c.data.eval_batch_size = 8
  c.loss.local_weighting = 'sft'
  c.loss.global_weight = 2.0
  c.train.steps = STEPS
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.eval_every = STEPS
  c.train.eval_steps = 1
  c.checkpoint.keep = 5
  wd = str(tmp_path_factory.mktemp('straight'))
  trainer.train(c, wd)
  recs = _records(wd)
  assert [r['step'] for r in recs] == list(range(1, STEPS + 1))
  return c, wd, recs


def _final_params(config, workdir):
  s = trainer.setup(config)
  manager = ckpt_lib.make_manager(workdir, 5, False)
  try:
    assert manager.latest_step() == STEPS
    with jax.set_mesh(s.mesh):
      return _pure(ckpt_lib.restore(manager, STEPS, s.abstract_state,
                                    s.state_shardings))
  finally:
    manager.close()


def test_resume_from_step_3_is_bit_identical(sft_run, tmp_path):
  c, full, recs = sft_run
  # A run stopped right after its step-3 checkpoint (with a stale step-4 line
  # in metrics.jsonl, as after kill -9), resumed in the same workdir.
  part = str(tmp_path / 'part')
  os.makedirs(os.path.join(part, 'checkpoints'))
  shutil.copytree(os.path.join(full, 'checkpoints', '3'),
                  os.path.join(part, 'checkpoints', '3'))
  with open(os.path.join(part, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in recs[:4])
  trainer.train(c, part)
  resumed = _records(part)
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'steps_per_sec'}
                      for r in rs]
  assert [r['step'] for r in resumed] == list(range(1, STEPS + 1))
  assert strip(resumed) == strip(recs)
  assert len({r['loss'] for r in recs}) == STEPS   # the losses do move
  jax.tree.map(np.testing.assert_array_equal, _final_params(c, part),
               _final_params(c, full))


def test_metrics_have_ce_and_ppl_per_codebook(sft_run):
  c, _, recs = sft_run
  k = c.model.num_codebooks
  train_tokens = c.data.batch_size * c.data.max_frames * k
  for prefix, rows in (('', recs), ('eval/', recs[-1:])):
    for r in rows:
      ces = [r[f'{prefix}ce/{i}'] for i in range(k)]
      for i in range(k):
        assert r[f'{prefix}ppl/{i}'] == pytest.approx(math.exp(ces[i]),
                                                      rel=1e-6)
      assert f'{prefix}ce/{k}' not in r and f'{prefix}ppl/{k}' not in r
      # Every codebook has one target per frame here: the token-weighted mean
      # is the plain mean.
      assert r[f'{prefix}ce/mean'] == pytest.approx(np.mean(ces), rel=1e-5)
  assert all(r['tokens'] == train_tokens for r in recs)


def test_reported_loss_uses_the_configured_weights(sft_run):
  c, _, recs = sft_run
  kk = c.model.num_codebooks
  assert c.loss.global_weight == 2.0 and c.loss.local_weighting == 'sft'
  for prefix, rows in (('', recs), ('eval/', recs[-1:])):
    for r in rows:
      ce = [r[f'{prefix}ce/{i}'] for i in range(kk)]
      # L = 2 L0 + 1/(K-1) Σ_k (K - k)/10 Lk
      want = 2.0 * ce[0] + np.mean([(kk - i) / 10 * ce[i]
                                    for i in range(1, kk)])
      assert r[f'{prefix}loss'] == pytest.approx(want, rel=1e-5)
      uniform = ce[0] + np.mean(ce[1:])
      assert abs(r[f'{prefix}loss'] - uniform) > 0.1


# ----------------------------------------------------------------- batches
def test_two_batch_sizes_in_one_process():
  devices = jax.devices()[:2]
  init = None
  runs = []
  for b in (2, 4):
    c = F.small_config()
    c.data.batch_size = c.data.eval_batch_size = b
    s = trainer.setup(c, devices)
    assert s.mesh.shape['data'] == 2
    spec = s.task.batch_spec(b)
    it = iter(s.task.dataset('train', 0, 1))
    with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
      if init is None:   # the state does not depend on the batch size
        init = trainer.init_state(s)
      state = jax.tree.map(jnp.copy, init)   # the step donates its input
      step_fn = trainer.make_train_step(s)
      batch = trainer.global_batch(next(it), spec, s.batch_shardings)
      assert batch['audio'].shape[0] == b
      state, m, bad = step_fn(state, batch, np.int32(1))
    assert not bool(bad) and np.isfinite(float(m['loss']))
    assert int(state['step'][...]) == 1
    # The step used the whole batch: one target per frame and codebook.
    assert float(m['tokens']) == b * c.data.max_frames * c.model.num_codebooks
    runs.append((s, state, step_fn, it, spec))
  # The first config still steps after the second was built and compiled.
  s, state, step_fn, it, spec = runs[0]
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    batch = trainer.global_batch(next(it), spec, s.batch_shardings)
    state, m, bad = step_fn(state, batch, np.int32(2))
  assert not bool(bad) and int(state['step'][...]) == 2
