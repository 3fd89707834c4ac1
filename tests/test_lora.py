"""LoRA and QLoRA (musicjax/nn/lora.py, musicjax/train/adapter_runs.py,
musicjax/train/merge_adapters.py): the adapted weight is base + alpha/rank
A B; a LoRA run trains and checkpoints only its adapters on a base read from
config.init.workdir (quantized by qwix for QLoRA), resumes bit for bit, and
merges into a plain run that generates, exports and loads in PyTorch like
the LoRA model computes."""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx

import lm_fixtures as F
import musicjax_torch
import test_torch_lm as T
from musicjax import cli
from musicjax.config import ConfigError
from musicjax.lm import generate as G
from musicjax.nn import lora
from musicjax.nn import transformer
from musicjax.train import adapter_runs
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import new_run
from musicjax.train import runs
from musicjax.train import trainer

RANK, ALPHA = 4, 8.0
# Attention and MLP of both stacks, and the LM's heads and local projection.
TARGETS = ('*/attn/wq', '*/attn/wv', '*/attn/wo', '*/mlp/*')
LM_TARGETS = TARGETS + ('head0', 'local_heads', 'local_proj')
# A run long enough for the adapters to move, resumed half way.
STEPS, HALF = 4, 2
# The merged run against the LoRA model, both JAX float32: max |diff| <=
# MERGED_REL * max |logit| (measured 0).
MERGED_REL = 1e-6
# Greedy decode length and guidance far from 1 (the null rows matter).
FRAMES, CFG = 12, 3.0


def _config():
  c = F.small_config()
  c.data.batch_size = c.data.eval_batch_size = 8   # one per forced CPU device
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = HALF
  c.summary.seconds = 0.0
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 1
  return c


def _lora_config(base: str, quant: str = 'float', steps: int = STEPS):
  c = _config()
  c.init.workdir = base
  c.lora.rank, c.lora.alpha, c.lora.targets = RANK, ALPHA, LM_TARGETS
  c.lora.base = quant
  c.lora.int4_group = 16
  c.train.steps = steps
  return c


def _pure(tree) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(tree)))


def _tree(meta) -> dict:
  """Orbax's tree metadata as plain nested dicts."""
  if hasattr(meta, 'keys'):
    return {k: _tree(meta[k]) for k in meta.keys()}
  return meta


def _flat(tree, prefix='') -> dict:
  out = {}
  for k, v in tree.items():
    p = f'{prefix}/{k}' if prefix else str(k)
    out.update(_flat(v, p) if isinstance(v, dict) else {p: v})
  return out


@pytest.fixture(scope='module')
def base(tmp_path_factory) -> str:
  """An imported-like run: one checkpoint (step 0) of a random LM."""
  wd = str(tmp_path_factory.mktemp('lora') / 'base')
  c = _config()
  c.train.seed = 7
  s = trainer.setup(c)
  with jax.set_mesh(s.mesh):
    new_run.write(wd, c, trainer.init_state(s), 0)
  return wd


@pytest.fixture(scope='module')
def tuned(base, tmp_path_factory) -> str:
  """A QLoRA (int8 base) run of STEPS steps on `base`."""
  wd = str(tmp_path_factory.mktemp('lora') / 'tuned')
  trainer.train(_lora_config(base, 'int8'), wd)
  return wd


# ------------------------------------------------------------- the weights
def _stack():
  c = transformer.default_config()
  c.num_layers, c.dim, c.num_heads, c.num_kv_heads, c.mlp_dim = 2, 32, 4, 2, 64
  with nnx.use_eager_sharding(False):
    return transformer.Transformer(c, nnx.Rngs(0))


def _inputs(t=5):
  x = jax.random.normal(jax.random.key(1), (2, t, 32))
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  return x, pos, jnp.tril(jnp.ones((t, t), bool))[None].repeat(2, 0)


def _lora_section(quant='float', targets=TARGETS):
  c = ml_collections.ConfigDict()
  c.lora = ml_collections.ConfigDict(dict(
      rank=RANK, alpha=ALPHA, targets=targets, base=quant, int4_group=16))
  return c


def test_adapted_weight_is_base_plus_scaled_product():
  """Every read of an adapted weight (the scanned layers and the fused decode
  blocks) uses W + alpha/rank A B, computed here independently; a fresh B is
  zero, so the float model starts exactly as the base."""
  t = _stack()
  x, pos, mask = _inputs()
  before, _ = t(x, pos, mask)
  wq = np.asarray(t.layers.attn.wq[...])
  lora.apply(t, _lora_section(), nnx.Rngs(3))
  np.testing.assert_array_equal(np.asarray(t(x, pos, mask)[0]), before)
  b = jax.random.normal(jax.random.key(4), t.layers.attn.wq_lora_b.shape)
  t.layers.attn.wq_lora_b[...] = b
  a = np.asarray(t.layers.attn.wq_lora_a[...])            # [L, E, r]
  want = wq + ALPHA / RANK * np.einsum('ler,lrhd->lehd', a, np.asarray(b))
  np.testing.assert_allclose(np.asarray(lora.read(t.layers.attn, 'wq')), want,
                             rtol=1e-6, atol=1e-6)
  adapted, _ = t(x, pos, mask)
  assert np.max(np.abs(np.asarray(adapted) - before)) > 1e-2
  # The same weights as plain Params (a model built from `want`).
  plain = _stack()
  plain.layers.attn.wq[...] = want
  for name in ('wv', 'wo'):
    getattr(plain.layers.attn, name)[...] = getattr(t.layers.attn, name)[...]
  np.testing.assert_allclose(np.asarray(plain(x, pos, mask)[0]), adapted,
                             rtol=1e-5, atol=1e-5)
  # The fused decode blocks read the same weights: one step over the cache.
  cache = t.init_cache(2, 5, per_layer=True)
  fused, _ = transformer.run_fused(transformer.fuse(t), t.norm, x, pos, mask,
                                   cache, 0)
  np.testing.assert_allclose(np.asarray(fused), adapted, rtol=1e-5, atol=1e-5)
  # Merging folds them into plain Params that compute the same.
  lora.merge(t)
  assert type(t.layers.attn.wq) is nnx.Param
  assert not hasattr(t.layers.attn, 'wq_lora_a')
  np.testing.assert_allclose(np.asarray(t(x, pos, mask)[0]), adapted,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('quant,levels', [('int8', 127.5), ('int4', 7.5)])
def test_quantized_base_scales_per_output_channel(quant, levels):
  """int8: one scale per output channel (and layer); int4: one per 16
  contracted values too. Every dequantized value is within half a step of
  the float weight, and only the scales are floats."""
  t = _stack()
  w = np.asarray(t.layers.attn.wq[...])                   # [L, E, H, D]
  lora.apply(t, _lora_section(quant), nnx.Rngs(3))
  q = t.layers.attn.wq
  # int4 is stored two values to a byte along the output axis.
  assert isinstance(q, lora.Quantized) and q[...].dtype == jnp.int8
  assert q.shape == w.shape[:-1] + (w.shape[-1] // (2 if quant == 'int4' else 1),)
  scale = np.asarray(t.layers.attn.wq_scale[...])
  groups = 1 if quant == 'int8' else w.shape[1] // 16
  assert scale.shape == (w.shape[0], groups) + w.shape[2:]
  got = np.asarray(lora.read(t.layers.attn, 'wq'))
  step = np.repeat(scale, w.shape[1] // groups, axis=1)
  assert np.all(np.abs(got - w) <= step / 2 + 1e-7)
  # The scale maps the group's largest magnitude to the integer range's
  # half-width (qwix's symmetric absmax: [-128, 127] spans 255 steps).
  peak = np.abs(w).reshape(w.shape[0], groups, -1, *w.shape[2:]).max(axis=2)
  np.testing.assert_allclose(scale, peak / levels, rtol=1e-6)


def test_int4_packing_round_trips_every_value():
  # Odd widths pad one nibble; every int4 value in both nibbles comes back.
  v = jnp.asarray(np.arange(-8, 8).tolist() * 3 + [-8, 7, 5], jnp.int4
                  ).reshape(3, 17)
  p = lora.pack_int4(v)
  assert p.dtype == jnp.int8 and p.shape == (3, 9)
  np.testing.assert_array_equal(np.asarray(lora.unpack_int4(p, 17)),
                                np.asarray(v.astype(jnp.int8)))


# ---------------------------------------------------------------- the runs
def test_a_lora_run_trains_and_checkpoints_only_its_adapters(base, tuned):
  """The frozen weights stay the base run's, bit for bit; the adapters
  moved; the checkpoint and the optimizer hold nothing else."""
  c = runs.saved_config(tuned)
  run = runs.load_run(tuned)
  base_model = _flat(_pure(nnx.state(runs.load_run(base).model)))
  adapters = _flat(_pure(nnx.state(run.model, nnx.LoRAParam)))
  frozen = _flat(_pure(nnx.state(run.model, nnx.Param)))  # LoRAParams too
  assert adapters and set(adapters) < set(frozen)
  for path, value in frozen.items():
    if path not in adapters:
      np.testing.assert_array_equal(value, base_model[path], err_msg=path)
  assert all(np.any(v != 0) for p, v in adapters.items() if p.endswith('_b'))
  # The int8 base came from the base run's floats.
  wq = base_model['backbone/layers/attn/wq']
  np.testing.assert_allclose(
      np.asarray(lora.read(run.model.backbone.layers.attn, 'wq')
                 - (ALPHA / RANK) * jnp.einsum(
                     'ler,lrhd->lehd',
                     run.model.backbone.layers.attn.wq_lora_a[...],
                     run.model.backbone.layers.attn.wq_lora_b[...])),
      wq, atol=np.abs(wq).max() / 255 + 1e-7)
  opt = _flat(_pure(nnx.state(run.state.opt)))
  moments = {p for p in opt if '/mu/' in p or '/nu/' in p}
  assert moments and all(p.split('/mu/')[-1].split('/nu/')[-1] in adapters
                         for p in moments), sorted(moments)[:4]
  # What is on disk: adapters, optimizer and counters only.
  saved = ocp.PyTreeCheckpointer().metadata(os.path.join(
      ckpt_lib.checkpoint_dir(tuned), str(STEPS), 'state')).item_metadata
  assert set(_flat(_tree(saved['model']))) == set(adapters)
  assert set(saved) == {'model', 'opt', 'step'}
  with open(os.path.join(tuned, adapter_runs.BASE_RECORD)) as f:
    assert json.load(f) == {'workdir': os.path.abspath(base), 'step': 0}
  assert c.lora.base == 'int8'


def test_resuming_continues_bit_for_bit(base, tmp_path):
  """STEPS steps at once, or HALF then a restart: the same adapters."""
  whole, halves = str(tmp_path / 'whole'), str(tmp_path / 'halves')
  trainer.train(_lora_config(base, 'int4'), whole)
  trainer.train(_lora_config(base, 'int4', HALF), halves)
  trainer.train(_lora_config(base, 'int4'), halves)
  a = _pure(nnx.state(runs.load_run(whole).model, nnx.LoRAParam))
  b = _pure(nnx.state(runs.load_run(halves).model, nnx.LoRAParam))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_merged_run_generates_and_exports_what_the_lora_model_computes(
    tuned, tmp_path):
  """merge-lora folds the adapters into the float base (not the int8 copy
  the run trained on): its logits are the LoRA model's on that base, greedy
  CFG decoding gives the same codes, and its PyTorch export (also straight
  from the LoRA run) matches."""
  merged = str(tmp_path / 'merged')
  assert cli.main(['merge-lora', '--workdir', tuned, '--out', merged]) == 0
  m = runs.load_run(merged)
  assert m.config.lora.rank == 0 and not m.config.init.workdir
  c = runs.saved_config(tuned)
  c.lora.base = 'float'
  lr = runs.load_run(tuned, config=c)
  batch = T.training_batch(c, 'prefix')
  with lr.activate():
    want = lr.model(T.to_jax(batch))
  with m.activate():
    got = m.model(T.to_jax(batch))
  for key in want:   # W + s A B summed once at merge, or at every read
    T.assert_close(got[key], want[key], MERGED_REL, key)
  prompt = T.cfg_prompt(c, np.random.default_rng(0))
  sampling = G.Sampling(temperature=0.0, top_k=0, cfg_scale=CFG,
                        max_frames=FRAMES)
  melody = {'melody': np.zeros((2, FRAMES), np.int32)}
  with lr.activate():
    a = T.jax_generate(lr.model, prompt, sampling, **melody)
  with m.activate():
    b = T.jax_generate(m.model, prompt, sampling, **melody)
  np.testing.assert_array_equal(np.asarray(a['codes']), np.asarray(b['codes']))
  out = str(tmp_path / 'export')
  assert cli.main(['export', '--workdir', tuned, '--out', out]) == 0
  torch_model = musicjax_torch.from_pretrained(out)
  with torch.no_grad():
    T.assert_same_logits(torch_model(T.to_torch(batch)), want)


# ------------------------------------------------------------- bad configs
def test_bad_lora_configs_are_named_before_compiling(base, tmp_path):
  c = _lora_config(base)
  c.lora.targets = ('*/attn/wq', '*/attention/query')
  with pytest.raises(ConfigError, match=r"config.lora.targets pattern "
                     r"'\*/attention/query'.*backbone/layers/attn/wq"):
    trainer.setup(c)
  c = _lora_config(base)
  c.init.workdir = ''
  with pytest.raises(ConfigError, match='config.init.workdir'):
    trainer.setup(c)
  c = _lora_config(base)
  c.lora.base = 'int3'
  with pytest.raises(ConfigError, match='config.lora.base'):
    trainer.setup(c)
  import codec_fixtures as CF
  c = CF.small_config()
  c.lora.rank = 4
  c.init.workdir = base
  with pytest.raises(ConfigError, match="task 'codec' does not take adapters"):
    trainer.setup(c)


def test_a_base_that_moved_on_is_refused(base, tmp_path):
  """Resuming (or loading) a LoRA run whose base run has a newer checkpoint
  would pair its adapters with other weights: refused, naming both steps."""
  moving = str(tmp_path / 'moving')
  c = _config()
  c.train.steps = 1
  trainer.train(c, moving)
  run = str(tmp_path / 'run')
  trainer.train(_lora_config(moving, steps=HALF), run)
  c.train.steps = 2
  trainer.train(c, moving)
  with pytest.raises(ConfigError, match='at step 1.*now at step 2'):
    runs.load_run(run)


def test_merge_lora_refuses_a_plain_run(base, tmp_path, capsys):
  assert cli.main(['merge-lora', '--workdir', base,
                   '--out', str(tmp_path / 'x')]) == 2
  assert 'not a LoRA run' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'x')


# ------------------------------------------------------------------- DPO
def test_lora_dpo_reference_is_the_base(tmp_path):
  """DPO with adapters keeps no reference copy: the reference is the policy
  with its adapters at zero, which is the base. So the first step's loss is
  log 2 (policy = reference), the base stays bit for bit, and a LoRA run is
  refused as a starting point until it is merged."""
  import test_lm_dpo as D
  from musicjax.data import text as text_lib
  from musicjax.train import metrics as metrics_lib
  tok = str(tmp_path / 'tokenizer.json')
  text_lib.TextTokenizer.train([D.TAGS, D.LYRICS] * 4, D.TOKENIZER_VOCAB, tok)
  base = str(tmp_path / 'base')
  c = D._config('lm', tok)  # pylint: disable=protected-access
  c.data.batch_size = c.data.eval_batch_size = 8
  s = trainer.setup(c)
  with jax.set_mesh(s.mesh):
    new_run.write(base, c, trainer.init_state(s), 0)
  pairs = D._write_pairs(str(tmp_path / 'pairs.jsonl'), c, 6)  # pylint: disable=protected-access
  d = D._config('lm_dpo', tok, pairs=pairs)  # pylint: disable=protected-access
  d.data.batch_size = d.data.eval_batch_size = 8
  d.init.workdir = base
  d.lora.rank, d.lora.alpha, d.lora.targets = RANK, ALPHA, LM_TARGETS
  d.optim.lr, d.optim.warmup_steps = 1e-2, 1
  d.train.steps, d.train.log_every, d.train.checkpoint_every = 2, 1, 2
  d.train.eval_every, d.summary.seconds = 0, 0.0
  run = str(tmp_path / 'dpo')
  trainer.train(d, run)
  first = metrics_lib.read_jsonl(os.path.join(run, metrics_lib.METRICS_FILE))[0]
  assert abs(first['loss'] - np.log(2)) < 1e-6, first
  tuned = runs.load_run(run)
  assert not hasattr(tuned.state, 'ref')
  before = _flat(_pure(nnx.state(runs.load_run(base).model)))
  adapters = _flat(_pure(nnx.state(tuned.model, nnx.LoRAParam)))
  for path, value in _flat(_pure(nnx.state(tuned.model, nnx.Param))).items():
    if path not in adapters:
      np.testing.assert_array_equal(value, before[path], err_msg=path)
  assert any(np.any(v != 0) for p, v in adapters.items() if p.endswith('_b'))
  # The next stage starts from the merged run, not from the adapters alone.
  nxt = copy.deepcopy(d)
  nxt.init.workdir = run
  with pytest.raises(ConfigError, match='is a LoRA run.*merge-lora'):
    trainer.train(nxt, str(tmp_path / 'next'))
  merged = str(tmp_path / 'merged')
  assert cli.main(['merge-lora', '--workdir', run, '--out', merged]) == 0
  nxt.init.workdir = merged
  trainer.train(nxt, str(tmp_path / 'next'))


# ------------------------------------------------------------ accompaniment
def test_accompaniment_takes_adapters(tmp_path):
  """The accompaniment model's backbone takes adapters like the LM's (one
  Transformer): only they move, and the checkpoint holds only them."""
  import test_accomp_train as A
  base = str(tmp_path / 'base')
  c = A.small_config(steps=2)
  s = trainer.setup(c)
  with jax.set_mesh(s.mesh):
    new_run.write(base, c, trainer.init_state(s), 0)
  t = A.small_config(steps=2)
  t.init.workdir = base
  t.lora.rank, t.lora.alpha, t.lora.targets = RANK, ALPHA, TARGETS + ('heads',)
  t.lora.base = 'int8'
  t.optim.lr, t.optim.warmup_steps = 1e-2, 1
  run = str(tmp_path / 'tuned')
  out = trainer.train(t, run)
  assert np.isfinite(out['loss'])
  tuned = runs.load_run(run)
  before = _flat(_pure(nnx.state(runs.load_run(base).model)))
  adapters = _flat(_pure(nnx.state(tuned.model, nnx.LoRAParam)))
  assert {p.rsplit('/', 1)[-1] for p in adapters} >= {'wq_lora_a', 'up_lora_b',
                                                      'heads_lora_a'}
  for path, value in _flat(_pure(nnx.state(tuned.model, nnx.Param))).items():
    if path not in adapters:
      np.testing.assert_array_equal(value, before[path], err_msg=path)
  assert any(np.any(v != 0) for p, v in adapters.items() if p.endswith('_b'))
  saved = ocp.PyTreeCheckpointer().metadata(os.path.join(
      ckpt_lib.checkpoint_dir(run), '2', 'state')).item_metadata
  assert set(_flat(_tree(saved['model']))) == set(adapters)


# --------------------------------------------------- quantized inference
def test_weight_only_quantized_inference(base):
  """config.sample.weights=int8 / int4: `generate`'s model holds the stacks'
  weights as integers (heads float), computes close to the float model, and
  `bench lm-quant` reports what it costs and saves beside the float one."""
  from musicjax.bench import quant
  plain = runs.load_run(base)
  batch = T.to_jax(T.training_batch(plain.config, 'prefix'))
  with plain.activate():
    want = plain.model(batch)['global']
  # Max |logit change| over the peak logit, measured 0.013 (int8) and 0.37
  # (int4: 16 levels per output channel of a 32-wide random layer).
  for weights, rel in (('int8', 0.03), ('int4', 0.6)):
    c = runs.saved_config(base)
    c.sample.weights = weights
    run = runs.serving(runs.load_run(base, config=c))
    attn = run.model.backbone.layers.attn
    assert isinstance(attn.wq, lora.Quantized)
    assert attn.wq[...].dtype == jnp.int8
    assert type(run.model.head0) is nnx.Param
    with run.activate():
      got = run.model(batch)['global']
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert 0 < err < rel, (weights, err)
  c = runs.saved_config(base)
  c.sample.weights = 'bfloat16'
  run = runs.serving(runs.load_run(base, config=c))
  assert run.model.backbone.layers.attn.wq[...].dtype == jnp.bfloat16
  with run.activate():
    got = run.model(batch)['global']
  assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 0.03
  c = runs.saved_config(base)
  c.sample.weights = 'int2'
  with pytest.raises(ConfigError, match='config.sample.weights'):
    runs.serving(runs.load_run(base, config=c))
  out = quant.run(base, repeats=1, frames=4, eval_batches=1)
  f, q8 = out['cases']['float'], out['cases']['int8']
  assert f['greedy_code_agreement_vs_float'] == 1.0
  assert 0 < q8['bytes_vs_float'] < 0.7
  assert abs(q8['eval_loss_change']) < 0.05
  assert out['cases']['int4']['model_bytes'] < q8['model_bytes']


# ---------------------------------------------------------------- sharding
def _lora_steps(base, sizes, devices):
  """A QLoRA run's first steps on a (data, fsdp, tensor) mesh: (the
  adapters' shardings, losses, adapters)."""
  from musicjax.parallel import rules as rules_lib
  c = _lora_config(base, 'int8')
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = sizes
  s = trainer.setup(c, devices)
  spec = s.task.batch_spec(c.data.batch_size)
  it = iter(s.task.dataset('train', 0, 1))
  losses = []
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = s.task.warm_start(trainer.init_state(s), s.state_shardings)
    step_fn = trainer.make_train_step(s)
    for i in range(1, 3):
      batch = trainer.global_batch(next(it), spec, s.batch_shardings)
      state, m, bad = step_fn(state, batch, np.int32(i))
      assert not bool(bad)
      losses.append(float(m['loss']))
  specs = rules_lib.describe(s.state_shardings)
  model = nnx.merge(s.graphdef, state).model
  return specs, losses, _pure(nnx.state(model, nnx.LoRAParam))


def test_adapters_shard_over_the_mesh_rules(base):
  """The adapters and the int8 base take the weights' logical axes: A the
  input side's, B the output side's; a (2, 2, 2) mesh trains as one device."""
  _, want_losses, want = _lora_steps(base, (1, 1, 1), jax.devices()[:1])
  specs, losses, got = _lora_steps(base, (2, 2, 2), None)
  assert 'tensor' in specs['model/backbone/layers/attn/wq_lora_b'], specs
  assert 'tensor' in specs['model/backbone/layers/mlp/down_lora_a'], specs
  assert 'fsdp' in specs['model/backbone/layers/attn/wq'], specs
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), got, want)
