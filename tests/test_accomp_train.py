"""The accompaniment task through the generic trainer: RTD gradients reach the
backbone, the sampler conditions like training, one pair can be memorised,
training learns the vocal-to-accompaniment alignment, shards like one device
and resumes exactly; the 'ar' ablation trains and decodes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax.accomp import model as model_lib
from musicjax.accomp import sample as sample_lib
from musicjax.accomp import synthetic
from musicjax.accomp import task as task_lib
from musicjax.config import ConfigError, for_task
from musicjax.parallel import rules as rules_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer


def small_config(steps=4, k=2, frames=16):
  c = for_task('accomp')
  m = c.model
  m.num_codebooks = k
  m.codebook_size = 16
  m.text_vocab_size = 8
  b = m.backbone
  b.num_layers, b.dim, b.num_heads, b.num_kv_heads, b.mlp_dim = 2, 64, 4, 2, 128
  b.scan_layers = False
  d = c.data
  d.kind = 'synthetic'
  d.max_frames = frames
  d.synthetic_min_frames = frames // 2
  d.reference_frames = 4
  d.max_text_tokens = 4
  d.batch_size = d.eval_batch_size = 8
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 5
  tr = c.train
  tr.steps = tr.log_every = tr.eval_every = tr.checkpoint_every = steps
  tr.eval_steps = 2
  c.sample.steps = 8
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  exs = [synthetic.example(config, rng) for _ in range(config.data.batch_size)]
  return {k: jnp.asarray(np.stack([e[k] for e in exs])) for k in exs[0]}


def _model(config, seed=0):
  with nnx.use_eager_sharding(False):
    return model_lib.AccompModel(config.model, nnx.Rngs(seed))


def _records(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def _pure(state):
  return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(state)))


# ----------------------------------------------------------------- RTD grads
@pytest.mark.parametrize('backbone_grad', [True, False])
def test_rtd_loss_gradient_reaches_the_backbone_only_when_asked(backbone_grad):
  c = small_config()
  c.loss.rtd_backbone_grad = backbone_grad
  model, batch = _model(c), _batch(c)
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  yes = jnp.ones((c.data.batch_size,), bool)

  def rtd_term(p):
    _, m = task_lib.diffusion_loss(nnx.merge(gdef, p, rest), batch, 3,
                                   jax.random.key(0), c.loss, yes, yes)
    return m['rtd']

  grads = nnx.to_pure_dict(jax.grad(rtd_term)(params))
  backbone = max(float(jnp.abs(g).max())
                 for g in jax.tree.leaves(grads['backbone']))
  head = float(jnp.abs(grads['rtd_head']).max())
  assert head > 0
  if backbone_grad:
    assert backbone > 1e-6       # ours: the detection loss shapes the backbone
  else:
    assert backbone == 0.0       # the released code's behaviour


def test_total_loss_is_mlm_plus_weighted_rtd():
  c = small_config()
  model, batch = _model(c), _batch(c)
  yes = jnp.ones((c.data.batch_size,), bool)
  loss, m = task_lib.diffusion_loss(model, batch, 0, jax.random.key(1), c.loss,
                                    yes, yes)
  np.testing.assert_allclose(float(loss), float(m['mlm'] + 0.2 * m['rtd']),
                             rtol=1e-6)
  c.loss.rtd_weight = 0.0
  loss0, m0 = task_lib.diffusion_loss(model, batch, 0, jax.random.key(1), c.loss,
                                      yes, yes)
  assert 'rtd' not in m0
  np.testing.assert_allclose(float(loss0), float(m['mlm']), rtol=1e-6)


def test_masks_follow_the_sobol_times_of_the_step():
  """The masked fraction of each row is t = cos(pi r / 2) of its Sobol r."""
  c = small_config(k=4, frames=256)
  c.data.synthetic_min_frames = 256
  c.data.batch_size = 4
  model, batch = _model(c), _batch(c)
  yes = jnp.ones((4,), bool)
  from musicjax.accomp import diffusion
  for step in (0, 5):
    t = diffusion.cosine_mask_ratio(diffusion.sobol_r(step, 4, 0))
    _, m = task_lib.diffusion_loss(model, batch, step, jax.random.key(2), c.loss,
                                   yes, yes)
    np.testing.assert_allclose(float(m['t_mean']), float(jnp.mean(t)), rtol=1e-6)
    # 1024 tokens per row: the realised fraction is within a few % of t.
    assert abs(float(m['masked_fraction']) - float(jnp.mean(t))) < 0.05


# -------------------------------------------------- training = sampling order
def test_sampler_conditions_exactly_like_training():
  """One greedy sampler step from all-MASK commits argmax of the same logits
  the training path computes for an all-masked input: same prefix order
  ([text, reference]), same tracks, same padding."""
  c = small_config()
  model, batch = _model(c, seed=3), _batch(c, seed=3)
  b, t, k = batch['accomp'].shape
  v = c.model.codebook_size
  yes = jnp.ones((b,), bool)
  prefix = sample_lib.prefix_of(model, batch, yes, yes)
  tv = task_lib.token_valid(batch)
  inp = jnp.where(tv, model_lib.mask_id(v), model_lib.pad_id(v))
  want = jnp.argmax(model.logits(model.hidden(batch['vocal'], inp,
                                              batch['valid'], prefix)), -1)
  s = sample_lib.Sampling(steps=1, temperature=1e-4, top_k=1, top_p=1.0,
                          mask_temperature=0.0)
  got = sample_lib.accompany(model, batch['vocal'], batch['valid'], prefix,
                             jax.random.key(0), s)
  np.testing.assert_array_equal(np.where(tv, got, -1), np.where(tv, want, -1))
  # Swapping the prefix order changes the logits: order matters.
  lg = model.logits(model.hidden(batch['vocal'], inp, batch['valid'], prefix))
  swapped = model.logits(model.hidden(batch['vocal'], inp, batch['valid'],
                                      prefix[:, ::-1]))
  assert float(jnp.abs(lg - swapped).max()) > 1e-4
  # Text is prefix token 0, reference token 1.
  no_text = sample_lib.prefix_of(model, batch, ~yes, yes)
  np.testing.assert_array_equal(no_text[:, 1], prefix[:, 1])
  np.testing.assert_array_equal(no_text[:, 0],
                                jnp.broadcast_to(model.null_prefix[0], (b, 64)))


# ------------------------------------------------------ memorise / learn
def _train_steps(c, batch_fn, steps):
  task = task_lib.AccompTask(c)
  with nnx.use_eager_sharding(False):
    state = task.create_state(nnx.Rngs(0))

  @nnx.jit
  def step(state, batch, rng):
    return task.train_step(state, batch, rng)

  out = []
  for i in range(steps):
    out.append(step(state, batch_fn(i), jax.random.fold_in(jax.random.key(9), i)))
  return state, out


def test_a_single_pair_is_memorised():
  """Overfit one (vocal, accompaniment) pair whose accompaniment is random
  (not a function of the vocal); the 8-step sampler then reproduces it."""
  c = small_config(k=2, frames=16)
  c.data.batch_size = 8
  c.optim.lr = 3e-3
  c.cond.drop_text = c.cond.drop_reference = 0.0
  one = _batch(c, seed=5)
  rng = np.random.default_rng(7)
  accomp = np.asarray(one['accomp']).copy()
  valid = np.asarray(one['valid'])
  accomp[0][valid[0]] = rng.integers(0, 16, (int(valid[0].sum()), 2))
  pair = {key: jnp.broadcast_to(val[:1], val.shape) for key, val in one.items()}
  pair['accomp'] = jnp.broadcast_to(jnp.asarray(accomp[:1]), accomp.shape)
  state, metrics = _train_steps(c, lambda i: pair, 300)
  last = np.mean([float(m['ce_masked']) for m in metrics[-20:]])
  assert last < 0.1, last
  model = state.model
  yes = jnp.ones((1,), bool)
  first = {key: val[:1] for key, val in pair.items()}
  prefix = sample_lib.prefix_of(model, first, yes, yes)
  s = sample_lib.Sampling(steps=8, top_k=0, top_p=1.0)
  got = np.asarray(sample_lib.accompany(model, first['vocal'], first['valid'],
                                        prefix, jax.random.key(0), s))[0]
  want = np.asarray(first['accomp'])[0]
  ok = np.asarray(first['valid'])[0]
  assert np.mean(got[ok] == want[ok]) > 0.95


@pytest.mark.slow
def test_training_learns_the_frame_alignment(tmp_path):
  """Synthetic accompaniment = per-codebook permutation of the vocal at the
  same frame: the eval masked CE falls far below log V (what a model that
  ignores the vocal gets), and giving each window another window's vocal
  raises it by most of log V (`vocal_gain`)."""
  c = small_config(steps=300, k=2, frames=32)
  c.train.eval_steps = 4
  trainer.train(c, str(tmp_path))
  recs = _records(str(tmp_path))
  ev = [r for r in recs if 'eval/ce_masked' in r]
  assert ev[-1]['eval/ce_masked'] < 0.2 * np.log(16), ev[-1]
  np.testing.assert_allclose(ev[-1]['eval/vocal_gain'],
                             ev[-1]['eval/ce_other_vocal'] -
                             ev[-1]['eval/ce_masked'], rtol=1e-4)
  assert ev[-1]['eval/vocal_gain'] > 0.5 * np.log(16), ev[-1]


def test_chain_examples_follow_the_previous_frame_and_ignore_the_vocal():
  c = small_config(k=2, frames=32)
  c.data.synthetic_task = 'chain'
  ex = synthetic.example(c, np.random.default_rng(0))
  perm = synthetic.permutations(2, 16)
  n = int(ex['valid'].sum())
  a = ex['accomp']
  assert n >= 16 and (a[n:] == -1).all() and (ex['vocal'][n:] == -1).all()
  np.testing.assert_array_equal(a[1:n], perm[np.arange(2), a[:n - 1]])
  other = synthetic.example(c, np.random.default_rng(0))
  np.testing.assert_array_equal(other['accomp'], a)   # seeded


def test_masked_model_learns_from_neighbouring_frames(tmp_path):
  """The chain task: only the track's own unmasked neighbours tell a masked
  token. A bidirectional model that reads them gets far below log V; the
  vocal is noise here, so giving another window's vocal changes nothing."""
  c = small_config(steps=300, k=1, frames=32)
  c.data.synthetic_task = 'chain'
  c.train.eval_steps = 4
  trainer.train(c, str(tmp_path))
  ev = [r for r in _records(str(tmp_path)) if 'eval/ce_masked' in r][-1]
  # Without context the best is log V = 2.77 (the chain's codes are uniform).
  # With Sobol-stratified t many neighbours are masked too, so the floor is
  # well above 0 (about 1.6 after these steps).
  assert ev['eval/ce_masked'] < 0.7 * np.log(16), ev
  assert abs(ev['eval/vocal_gain']) < 0.05, ev


# -------------------------------------------------------- trainer: sharding
def _shard_config(data, fsdp, tensor):
  c = small_config(steps=3)
  c.data.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


def _three_steps(config, devices):
  s = trainer.setup(config, devices)
  spec = s.task.batch_spec(config.data.batch_size)
  it = iter(s.task.dataset('train', 0, 1))
  losses = []
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    step_fn = trainer.make_train_step(s)
    for i in range(1, 4):
      batch = trainer.global_batch(next(it), spec, s.batch_shardings)
      state, m, bad = step_fn(state, batch, np.int32(i))
      assert not bool(bad)
      losses.append(float(m['loss']))
  return s, state, losses


@pytest.fixture(scope='module')
def one_device_steps():
  _, state, losses = _three_steps(_shard_config(1, 1, 1), jax.devices()[:1])
  return _pure(state), losses


@pytest.mark.parametrize('sizes', [(2, 2, 2), (8, 1, 1)])
def test_sharded_training_matches_one_device(sizes, one_device_steps):
  want_params, want_losses = one_device_steps
  s, state, losses = _three_steps(_shard_config(*sizes), None)
  specs = rules_lib.describe(s.state_shardings)
  if sizes[2] > 1:
    assert 'tensor' in specs['model/backbone/layers/mlp/gate'], specs
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  assert len(set(losses)) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               _pure(state), want_params)


def test_explicit_mesh_trains_and_evaluates_like_one_device(one_device_steps):
  """config.mesh.axis_type='explicit' (data 2 x fsdp 2 x tensor 2): the same
  three steps as one device, and the eval step (which rolls the vocals over
  the batch) runs and agrees with an Auto mesh. Both failed to trace before
  (the prefix projection's output duplicated the fsdp axis)."""
  want_params, want_losses = one_device_steps
  c = _shard_config(2, 2, 2)
  c.mesh.axis_type = 'explicit'
  s, state, losses = _three_steps(c, None)
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               _pure(state), want_params)
  evals = {}
  for axis_type in ('explicit', 'auto'):
    c.mesh.axis_type = axis_type
    s = trainer.setup(c)
    spec = s.task.batch_spec(c.data.eval_batch_size)
    batch = next(iter(s.task.dataset('eval', 0, 1)))
    with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
      st = trainer.init_state(s)
      m = trainer.make_eval_step(s)(st, trainer.global_batch(
          batch, spec, s.batch_shardings), jax.random.key(0))
    evals[axis_type] = {k: float(v) for k, v in m.items()}
  assert set(evals['explicit']) == set(evals['auto'])
  for k, v in evals['auto'].items():
    np.testing.assert_allclose(evals['explicit'][k], v, rtol=2e-5, err_msg=k)
  assert 'ce_other_vocal' in evals['auto']


# ------------------------------------------------------------------ resume
def test_resume_is_bit_identical(tmp_path):
  c = small_config(steps=6)
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.checkpoint.keep = 5
  straight = str(tmp_path / 'straight')
  trainer.train(c, straight)
  resumed = str(tmp_path / 'resumed')
  c3 = small_config(steps=6)
  c3.train.log_every = 1
  c3.train.checkpoint_every = 3
  c3.checkpoint.keep = 5
  # Train to 3, then continue to 6 in a second call (a restart).
  c3.train.steps = 3
  trainer.train(c3, resumed)
  c3.train.steps = 6
  trainer.train(c3, resumed)
  a = {r['step']: r['loss'] for r in _records(straight) if 'loss' in r}
  b = {r['step']: r['loss'] for r in _records(resumed) if 'loss' in r}
  assert [a[i] for i in range(4, 7)] == [b[i] for i in range(4, 7)]


# ------------------------------------------------------------------ ablation
def test_ar_ablation_is_causal_trains_and_decodes():
  c = small_config()
  c.model.decode = 'ar'
  c.model.conv_kernel = 3           # the frame convolution is causal too
  with pytest.raises(ConfigError, match='rtd_weight'):
    task_lib.AccompTask(c)
  c.loss.rtd_weight = 0.0
  state, metrics = _train_steps(c, lambda i: _batch(c, seed=i), 3)
  assert np.isfinite(float(metrics[-1]['loss']))
  model, batch = state.model, _batch(c)
  yes = jnp.ones((c.data.batch_size,), bool)
  prefix = sample_lib.prefix_of(model, batch, yes, yes)
  # Causal: changing the last frames leaves earlier hidden states unchanged
  # (and changes the later ones).
  h = model.hidden(batch['vocal'], batch['accomp'], batch['valid'], prefix)
  acc2 = batch['accomp'].at[:, -3:].set(0)
  h2 = model.hidden(batch['vocal'], acc2, batch['valid'], prefix)
  np.testing.assert_allclose(h[:, :-3], h2[:, :-3], atol=1e-6)
  assert float(jnp.abs(h[:, -3:] - h2[:, -3:]).max()) > 1e-4
  s = sample_lib.Sampling(steps=1, top_k=0, top_p=1.0)
  out = sample_lib.accompany_ar(model, batch['vocal'], batch['valid'], prefix,
                                jax.random.key(0), s)
  tv = np.asarray(task_lib.token_valid(batch))
  o = np.asarray(out)
  assert ((o >= 0) & (o < 16))[tv].all()
  assert (o[~tv] == model_lib.pad_id(16)).all()


def test_ar_logits_of_a_frame_never_see_its_own_accompaniment():
  """The AR ablation's training input (shift_right) and causal model together:
  changing frame t's accompaniment changes the logits of frames > t only, so
  its low next-frame CE is not a leak."""
  c = small_config(frames=16)
  c.model.decode = 'ar'
  c.loss.rtd_weight = 0.0
  model, batch = _model(c), _batch(c)
  yes = jnp.ones((c.data.batch_size,), bool)
  prefix = sample_lib.prefix_of(model, batch, yes, yes)

  def logits(accomp):
    inp = task_lib.shift_right(accomp, model_lib.mask_id(16))
    return model.logits(model.hidden(batch['vocal'], inp, batch['valid'], prefix))

  t = 7
  changed = batch['accomp'].at[:, t].set((batch['accomp'][:, t] + 5) % 16)
  diff = np.abs(np.asarray(logits(changed) - logits(batch['accomp']))).max(axis=(0, 2, 3))
  assert diff[:t + 1].max() == 0.0, diff
  assert diff[t + 1] > 1e-4, diff


def test_frame_convolution_mixes_neighbours_both_ways():
  c = small_config()
  c.model.conv_kernel = 3
  model, batch = _model(c), _batch(c)
  yes = jnp.ones((c.data.batch_size,), bool)
  prefix = sample_lib.prefix_of(model, batch, yes, yes)
  x = model.hidden(batch['vocal'], batch['accomp'], batch['valid'], prefix)
  assert x.shape == (8, 16, 64)
  # The input embedding of frame 5 depends on frames 4 and 6 only through
  # the convolution: with it, frame 5's embedding-level mix sees both.
  e = jnp.ones((1, 7, 64))
  e = e.at[0, 3].set(5.0)
  y = model._local_mix(e)
  changed = np.where(np.abs(np.asarray(y - model._local_mix(jnp.ones((1, 7, 64))))
                            ).max(-1)[0] > 0)[0]
  assert changed.tolist() == [2, 3, 4]
  with pytest.raises(ValueError, match='odd'):
    c.model.conv_kernel = 4
    _model(c)


def test_bad_configs_name_the_key():
  c = small_config()
  c.loss.weighting = 'one_over_t'
  with pytest.raises(ConfigError, match='loss.weighting'):
    task_lib.AccompTask(c)
  c = small_config()
  c.model.backbone.dim = 63
  with pytest.raises(ConfigError, match='dim'):
    task_lib.AccompTask(c)
  c = small_config()
  c.data.synthetic_task = 'loop'
  with pytest.raises(ConfigError, match='data.synthetic_task'):
    task_lib.AccompTask(c)


def test_stage_two_starts_from_stage_one_weights(tmp_path):
  c1 = small_config(steps=2)
  stage1 = str(tmp_path / 's1')
  trainer.train(c1, stage1)
  c2 = small_config(steps=1)
  c2.init.workdir = stage1
  c2.data.max_frames = 32          # longer windows: same weights shapes
  def warm(config):
    s = trainer.setup(config)
    with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
      return s.task.warm_start(trainer.init_state(s), s.state_shardings)

  state = warm(c2)
  s1 = trainer.setup(c1)
  from musicjax.train import checkpoint as ckpt_lib
  restored, step = ckpt_lib.restore_subtree(stage1, 3, 'model',
                                            s1.abstract_state['model'],
                                            s1.state_shardings['model'])
  assert step == 2
  got = _pure(state)['model']
  jax.tree.map(np.testing.assert_array_equal, got,
               jax.tree.map(np.asarray, restored))
  fresh = small_config(steps=1)
  s = trainer.setup(fresh)
  with jax.set_mesh(s.mesh):
    init = _pure(trainer.init_state(s))['model']
  assert np.abs(init['heads'] - got['heads']).max() > 1e-4   # really restored
  c2.model.backbone.num_layers = 3
  with pytest.raises(ConfigError, match='num_layers'):
    warm(c2)
