"""The transformer's MusicGen switches (norm 'layer', mlp 'gelu', positions
'none' plus sinusoidal inputs, cross_attention) compute transformers'
MusicgenDecoder: a tiny random decoder, its weights copied into our stack,
the same codes and text-encoder states in, the same hidden states out, in
a full forward and in a cached token-by-token decode."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from musicjax.nn import transformer as T

transformers = pytest.importorskip('transformers')

B, K, L, S, E, H, F, V = 2, 3, 10, 7, 32, 4, 48, 16
# float32 on both sides, hidden states of unit scale after the last
# LayerNorm: the gap is summation order (measured 7.2e-7, forward and
# cached decode, 2026-12-07).
TOL = 2e-5


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  config = transformers.MusicgenDecoderConfig(
      vocab_size=V, max_position_embeddings=64, num_hidden_layers=2,
      ffn_dim=F, num_attention_heads=H, hidden_size=E, num_codebooks=K,
      activation_function='gelu', dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, layerdrop=0.0)
  config._attn_implementation = 'eager'
  model = transformers.models.musicgen.modeling_musicgen.MusicgenDecoder(
      config).eval()
  with torch.no_grad():   # norms away from 1 / 0, so a missed one shows
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.uniform_(0.5, 1.5) if name.endswith('weight') else p.uniform_(-.5, .5)
  return model


def _config() -> ml_collections.ConfigDict:
  c = T.default_config()
  c.num_layers, c.dim, c.num_heads, c.num_kv_heads, c.mlp_dim = 2, E, H, H, F
  c.norm, c.mlp, c.positions, c.cross_attention = 'layer', 'gelu', 'none', True
  c.scan_layers = True
  return c


def _ours(model):
  """Our stack holding the decoder's weights, and its code embeddings."""
  with nnx.use_eager_sharding(False):
    stack = T.Transformer(_config(), nnx.Rngs(0))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  d = E // H

  def per_layer(fmt, fn):
    return jnp.asarray(np.stack([fn(sd[fmt.format(i)]) for i in range(2)]))

  qkv_in = lambda w: w.T.reshape(E, H, d)
  out = lambda w: w.T.reshape(H, d, E)
  lay = stack.layers
  for ours, theirs in ((lay.attn, 'self_attn'), (lay.cross, 'encoder_attn')):
    for name, proj, fn in (('wq', 'q_proj', qkv_in), ('wk', 'k_proj', qkv_in),
                           ('wv', 'v_proj', qkv_in), ('wo', 'out_proj', out)):
      getattr(ours, name)[...] = per_layer(f'layers.{{}}.{theirs}.{proj}.weight', fn)
  for ours, theirs in ((lay.attn_norm, 'self_attn_layer_norm'),
                       (lay.cross_norm, 'encoder_attn_layer_norm'),
                       (lay.mlp_norm, 'final_layer_norm')):
    ours.scale[...] = per_layer(f'layers.{{}}.{theirs}.weight', lambda w: w)
    ours.bias[...] = per_layer(f'layers.{{}}.{theirs}.bias', lambda w: w)
  lay.mlp.up[...] = per_layer('layers.{}.fc1.weight', lambda w: w.T)
  lay.mlp.down[...] = per_layer('layers.{}.fc2.weight', lambda w: w.T)
  stack.norm.scale[...] = jnp.asarray(sd['layer_norm.weight'])
  stack.norm.bias[...] = jnp.asarray(sd['layer_norm.bias'])
  tables = np.stack([sd[f'embed_tokens.{k}.weight'] for k in range(K)])
  return stack, jnp.asarray(tables)


def _inputs():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, V + 1, size=(B, K, L))       # V: the pad / start id
  states = rng.normal(size=(B, S, E)).astype(np.float32)
  valid = np.ones((B, S), bool)
  valid[1, 4:] = False                                 # a shorter text
  return codes, states, valid


def _embed(tables, codes, start=0):
  x = sum(tables[k][codes[:, k]] for k in range(K))
  pos = jnp.broadcast_to(jnp.arange(start, start + codes.shape[-1]),
                         codes.shape[::2])
  return x + T.sinusoidal(pos, E), pos


def _theirs(model, codes, states, valid):
  with torch.no_grad():
    return model(input_ids=torch.tensor(codes.reshape(B * K, -1)),
                 encoder_hidden_states=torch.tensor(states),
                 encoder_attention_mask=torch.tensor(valid.astype(np.int64)),
                 use_cache=False).last_hidden_state.numpy()


def test_forward_equals_musicgen_decoder(reference):
  codes, states, valid = _inputs()
  want = _theirs(reference, codes, states, valid)
  stack, tables = _ours(reference)
  x, pos = _embed(tables, jnp.asarray(codes))
  mask = T.causal_mask(jnp.ones((B, L), bool))
  got, _ = stack(x, pos, mask, context=T.Context(jnp.asarray(states),
                                                 jnp.asarray(valid)))
  err = float(np.abs(np.asarray(got) - want).max())
  print('forward max abs error', err)
  assert err < TOL, err
  # The context matters: another text moves the output far.
  other, _ = stack(x, pos, mask, context=T.Context(jnp.asarray(states[::-1]),
                                                   jnp.asarray(valid[::-1])))
  assert float(np.abs(np.asarray(other) - want).max()) > 100 * TOL


def test_fused_cached_decode_equals_the_forward(reference):
  """Prefill 4 slots, then 6 one-token steps through the fused decode
  blocks: each step's hidden state is the full forward's at that slot."""
  codes, states, valid = _inputs()
  want = _theirs(reference, codes, states, valid)
  stack, tables = _ours(reference)
  ctx = T.Context(jnp.asarray(states), jnp.asarray(valid))
  blocks = T.fuse(stack)
  cache = stack.init_cache(B, L, per_layer=True)
  key_valid = jnp.ones((B, L), bool)
  got = []
  for start, n in ((0, 4),) + tuple((i, 1) for i in range(4, L)):
    x, pos = _embed(tables, jnp.asarray(codes[:, :, start:start + n]), start)
    h, cache = T.run_fused(blocks, stack.norm, x, pos,
                           T.cache_mask(key_valid, start, n), cache, start, ctx)
    got.append(np.asarray(h))
  err = float(np.abs(np.concatenate(got, 1) - want).max())
  print('decode max abs error', err)
  assert err < TOL, err


def test_switches_are_checked():
  c = _config()
  c.norm = 'batch'
  with pytest.raises(T.ConfigError, match="config.backbone.norm must be one of"):
    T.check_config(c, 'backbone')


def test_cross_attention_needs_its_context(reference):
  stack, tables = _ours(reference)
  codes, _, _ = _inputs()
  x, pos = _embed(tables, jnp.asarray(codes))
  with pytest.raises(ValueError, match='pass its context'):
    stack(x, pos, T.causal_mask(jnp.ones((B, L), bool)))
