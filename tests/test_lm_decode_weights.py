"""sample.backbone_weights: the stacked decode (the backbone's weights read in
place, no per-layer copies) generates what the fused one does, and holds
less memory while it runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax import config as cfg
from musicjax.config import ConfigError
from musicjax.lm import generate as G
from musicjax.lm import heartmula_prompt as hp
from musicjax.lm import task as task_lib

TINY = 'lm/heartmula_tiny'
FRAMES = 12


def _model(c):
  with nnx.use_eager_sharding(False):
    return task_lib.LMTask(c).create_state(nnx.Rngs(3)).model


def _run(model, c, weights: str, record=True):
  sampling = G.sampling_from_config(
      c.sample, top_k=1, max_frames=FRAMES, min_frames=FRAMES,
      backbone_weights=weights, **G.model_classes(c.model))
  inputs = hp.build(c.model, [1, 2, 3, 4], [5, 6, 7], cfg=True)
  fn = jax.jit(lambda m, pr, r, rv: G.generate(
      m, pr, rng=jax.random.key(0), sampling=sampling, num_cond=1,
      ref_codes=r, ref_valid=rv, record_logits=record))
  args = (model, {k: jnp.asarray(v) for k, v in inputs['prompt'].items()},
          jnp.asarray(inputs['ref_embed']), jnp.asarray(inputs['ref_valid']))
  return fn, args


def test_stacked_decode_equals_fused():
  c = cfg.load(TINY)
  model = _model(c)
  outs = {}
  for weights in ('fused', 'stacked'):
    fn, args = _run(model, c, weights)
    outs[weights] = {k: np.asarray(v) for k, v in fn(*args).items()}
  np.testing.assert_array_equal(outs['fused']['codes'], outs['stacked']['codes'])
  for key in ('logits_global', 'logits_local'):
    a, b = outs['fused'][key], outs['stacked'][key]
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))  # masks
    ok = np.isfinite(a)
    assert float(np.abs(a[ok] - b[ok]).max()) < 1e-5


def test_stacked_decode_holds_no_weight_copies():
  """Compiled temporaries: the fused loop holds a copy of every backbone
  weight, the stacked one does not (XLA's memory analysis, CPU)."""
  c = cfg.load(TINY, ['--config.model.backbone.num_layers=4',
                      '--config.model.backbone.dim=64',
                      '--config.model.backbone.mlp_dim=512'])
  model = _model(c)
  temp = {}
  for weights in ('fused', 'stacked'):
    fn, args = _run(model, c, weights, record=False)
    temp[weights] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
  bb = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(model.backbone,
                                                          nnx.Param)))
  assert temp['fused'] - temp['stacked'] > 0.5 * bb, (temp, bb)


def test_stacked_needs_xla_attention():
  with pytest.raises(ConfigError, match="backbone_weights 'stacked'"):
    task_lib.check_config(cfg.load(
        TINY, ['--config.sample.backbone_weights=stacked',
               '--config.sample.attention=pallas']))
  with pytest.raises(ConfigError, match='backbone_weights must be one of'):
    task_lib.check_config(cfg.load(
        TINY, ['--config.sample.backbone_weights=paged']))
