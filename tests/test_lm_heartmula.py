"""The released HeartMuLa's structure as config: heartlib's tiny checkpoint
(tests/fixtures/heartmula_tiny, written by heartlib's own code; see its
README) loaded into our AudioLM gives heartlib's logits; the loader's errors;
the released model's size; our own configs' parameters unchanged."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax import config as cfg
from musicjax.config import ConfigError
from musicjax.export.released import heartmula as hw
from musicjax.export.released import reader
from musicjax.lm import layout
from musicjax.lm import task as task_lib
from musicjax.nn import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'heartmula_tiny')
TINY = os.path.join(REPO, 'configs', 'lm', 'heartmula_tiny.py')
OSS = os.path.join(REPO, 'configs', 'lm', 'heartmula_oss_3b.py')
# float32 on both sides, O(1) weights and activations (|logits| up to 4.3):
# the gap is summation order (measured on jax 0.10.2 and 0.12: hidden
# 1.4e-6, codebook-0 logits 1.3e-6, local logits 1.5e-6 at most).
TOL = 2e-5
# heartlib's HeartMuLa() on the meta device: 289 tensors, this many values.
RELEASED_PARAMS = 3_938_113_536


@pytest.fixture(scope='module')
def ref():
  with np.load(os.path.join(FIXTURE, 'reference.npz')) as f:
    return dict(f)


@pytest.fixture(scope='module')
def loaded():
  return hw.load(FIXTURE, cfg.load(TINY))


def _batch(ref, k):
  """heartlib's tokens [B, S, K+1] + tokens_mask as our slot batch."""
  tokens, mask = ref['tokens'], ref['tokens_mask']
  text = np.where(mask[..., -1], tokens[..., -1], layout.EMPTY)
  text[:, int(ref['ref_slot'])] = layout.REF_SLOT
  audio = np.where(mask[..., :k], tokens[..., :k], layout.EMPTY)
  b, s = text.shape
  return {'text': jnp.asarray(text, jnp.int32),
          'audio': jnp.asarray(audio, jnp.int32),
          'positions': jnp.asarray(ref['positions'], jnp.int32),
          'valid': jnp.ones((b, s), bool),
          'ref_embed': jnp.asarray(ref['muq']),
          'ref_valid': jnp.ones((b,), bool),
          'uncond': jnp.asarray(ref['uncond_mask'])}


def _close(got, want, what):
  err = float(np.max(np.abs(np.asarray(got) - want)))
  assert err < TOL, f'{what}: max abs error {err}'
  return err


def test_hidden_and_logits_equal_heartlib(ref, loaded):
  model, c = loaded
  batch = _batch(ref, c.model.num_codebooks)
  x = model.embed(batch['text'], batch['audio'], None,
                  model.reference_embedding(batch['ref_embed']),
                  batch['ref_valid'], batch['uncond'])
  hidden, _ = model.backbone(x, batch['positions'],
                             transformer.causal_mask(batch['valid']))
  _close(hidden, ref['hidden'], 'backbone hidden states')
  # The local transformer runs on the slots before the F frames.
  p, f = int(ref['prompt_len']), ref['local_logits'].shape[1]
  out = model(batch, f)
  # Codebook 0 at every slot, conditional (row 0) and unconditional (row 1).
  _close(out['global'], ref['codebook0_logits'], 'codebook-0 logits')
  np.testing.assert_array_equal(np.asarray(out['local_index']),
                                np.arange(p - 1, p - 1 + f)[None].repeat(2, 0))
  _close(jnp.moveaxis(out['local'], 0, 2), ref['local_logits'], 'local logits')


def test_conditions_matter(ref, loaded):
  """The comparisons above would be weak if the unconditional row or the
  reference slot changed nothing: each changes the logits by far more than
  the tolerance."""
  c0 = ref['codebook0_logits']
  assert np.max(np.abs(c0[0] - c0[1])) > 100 * TOL
  model, c = loaded
  batch = _batch(ref, c.model.num_codebooks)
  moved = dict(batch, ref_embed=batch['ref_embed'] + 1.0)
  out = np.asarray(model(moved)['global'])
  slot = int(ref['ref_slot'])
  assert np.max(np.abs(out[0, slot:] - c0[0, slot:])) > 100 * TOL
  np.testing.assert_allclose(out[0, :slot], c0[0, :slot], atol=TOL)
  # The unconditional row ignores the reference (heartlib: replaced by the
  # unconditional row).
  np.testing.assert_allclose(out[1], c0[1], atol=TOL)


def test_greedy_frame_of_heartlibs_decode_step(ref, loaded):
  """heartlib's generate_frame with top-k 1 and guidance picked these codes;
  they are the argmax of our guided teacher-forced logits."""
  model, c = loaded
  batch = _batch(ref, c.model.num_codebooks)
  p, s = int(ref['prompt_len']), float(ref['greedy_cfg_scale'])
  want = ref['greedy_frame']
  # The prompt's last hidden state, then the local transformer on it and
  # the frame's codes (heartlib's greedy codes include specials >= 16,
  # which the training path's frame rows leave out).
  x = model.embed(batch['text'][:, :p], batch['audio'][:, :p], None,
                  model.reference_embedding(batch['ref_embed']),
                  batch['ref_valid'], batch['uncond'])
  h, _ = model.backbone(x, batch['positions'][:, :p],
                        transformer.causal_mask(batch['valid'][:, :p]))
  h = h[:, -1]
  codes = jnp.asarray(np.stack([want, want]), jnp.int32)
  k = c.model.num_codebooks
  out, _ = model.local(model.local_inputs(h, codes),
                       jnp.broadcast_to(jnp.arange(k), (2, k)),
                       transformer.causal_mask(jnp.ones((2, k), bool)))
  local = np.asarray(model.local_logits(out[:, 1:]))       # [B, K-1, V]
  guide = lambda l: l[1] + (l[0] - l[1]) * s
  got = [int(np.argmax(guide(np.asarray(model.global_logits(h)))))]
  got += [int(np.argmax(guide(local[:, i]))) for i in range(k - 1)]
  assert got == want.tolist()


# ---- the loader's errors -------------------------------------------------------
def _write(path, tensors):
  """A safetensors file of float32 arrays."""
  header, offset, blobs = {}, 0, []
  for name, a in tensors.items():
    raw = np.ascontiguousarray(a, np.float32).tobytes()
    header[name] = {'dtype': 'F32', 'shape': list(a.shape),
                    'data_offsets': [offset, offset + len(raw)]}
    offset += len(raw)
    blobs.append(raw)
  head = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(len(head).to_bytes(8, 'little') + head + b''.join(blobs))


def _tensors():
  r = reader.Reader(FIXTURE)
  return {name: r.get(name) for name in r.names}


def _copy(tmp_path, tensors=None):
  out = tmp_path / 'hm'
  shutil.copytree(FIXTURE, out)
  if tensors is not None:
    _write(out / hw.SINGLE, tensors)
  return str(out)


def _error(folder, *needles):
  with pytest.raises(hw.HeartMuLaWeightsError) as err:
    hw.load(folder, cfg.load(TINY))
  for needle in needles:
    assert needle in str(err.value), str(err.value)


def test_sharded_folder_loads_the_same(tmp_path, loaded):
  tensors = _tensors()
  out = tmp_path / 'sharded'
  out.mkdir()
  shutil.copy(os.path.join(FIXTURE, hw.CONFIG), out)
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[:10],
            'model-00002-of-00002.safetensors': names[10:]}
  for fname, part in shards.items():
    _write(out / fname, {n: tensors[n] for n in part})
  (out / hw.INDEX).write_text(json.dumps({'metadata': {}, 'weight_map': {
      n: fname for fname, part in shards.items() for n in part}}))
  model, _ = hw.load(str(out), cfg.load(TINY))
  want = jax.tree.leaves(nnx.state(loaded[0], nnx.Param))
  got = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_tensor(tmp_path):
  t = _tensors()
  del t['decoder.layers.1.mlp.w3.weight']
  _error(_copy(tmp_path, t), hw.SINGLE, "'decoder.layers.1.mlp.w3.weight'",
         'missing')


def test_extra_tensor(tmp_path):
  t = _tensors()
  t['backbone.output.weight'] = np.zeros((3, 32), np.float32)
  _error(_copy(tmp_path, t), hw.SINGLE, "backbone.output.weight",
         'does not have')


def test_wrong_shape(tmp_path):
  t = _tensors()
  t['projection.weight'] = np.zeros((16, 33), np.float32)
  _error(_copy(tmp_path, t), hw.SINGLE, "'projection.weight'", '(16, 33)',
         '(16, 32)')


def test_wrong_model_type(tmp_path):
  folder = _copy(tmp_path)
  path = os.path.join(folder, hw.CONFIG)
  with open(path) as f:
    d = json.load(f)
  d['model_type'] = 'heartcodec'
  with open(path, 'w') as f:
    json.dump(d, f)
  _error(folder, hw.CONFIG, "'heartcodec'", "'heartmula'")


def test_truncated_file(tmp_path):
  folder = _copy(tmp_path)
  path = os.path.join(folder, hw.SINGLE)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size - 100)
  _error(folder, hw.SINGLE, 'truncated')


def test_config_of_another_model(tmp_path):
  c = cfg.load(TINY, ['--config.model.text_vocab_size=65'])
  with pytest.raises(hw.HeartMuLaWeightsError, match='text_vocab_size = 64'):
    hw.load(FIXTURE, c)
  # Without a config, the flavors pick one: the tiny ones are not ours.
  with pytest.raises(hw.HeartMuLaWeightsError, match='llama-tiny-bb'):
    hw.load(FIXTURE)


# ---- the released model and our own configs ---------------------------------
def test_released_model_layout_and_size():
  """heartmula_oss_3b maps every tensor of heartlib's released model (names
  and shapes from heartlib's HeartMuLa(), see the fixture README) exactly
  once, and has its parameter count."""
  c = cfg.load(OSS)
  task_lib.check_config(c)
  with open(os.path.join(FIXTURE, 'heartlib_oss_3b_shapes.json')) as f:
    shapes = {k: tuple(v) for k, v in json.load(f).items()}
  assert sum(int(np.prod(s)) for s in shapes.values()) == RELEASED_PARAMS
  hw.check_layout(c, shapes)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
        lambda: task_lib.model_lib.AudioLM(c.model, nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == RELEASED_PARAMS
  # A wrong number in the config is caught by the layout check.
  bad = cfg.load(OSS, ['--config.model.local.num_kv_heads=8'])
  with pytest.raises(hw.HeartMuLaWeightsError, match='decoder.layers.0.attn.k_proj'):
    hw.check_layout(bad, shapes)


def _param_shapes(config_path):
  c = cfg.load(config_path)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
        lambda: task_lib.model_lib.AudioLM(c.model, nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  return {'/'.join(map(str, k)): tuple(v.value.shape) for k, v in flat}


# configs/lm/tiny.py's parameters before the HeartMuLa options (old
# checkpoints restore only into the same tree).
TINY_PARAMS = {
    'audio_embed': (4, 258, 128), 'text_embed': (8198, 128),
    'melody_embed': (14, 128), 'ref_proj': (128, 128), 'head0': (128, 257),
    'local_proj': (128, 128), 'local_heads': (3, 128, 256),
}


def test_our_configs_keep_their_parameters():
  got = _param_shapes(os.path.join(REPO, 'configs', 'lm', 'tiny.py'))
  top = {k: v for k, v in got.items() if '/' not in k}
  assert top == TINY_PARAMS
  stacks = {k.split('/', 1)[0] for k in got if '/' in k}
  assert stacks == {'backbone', 'local'}


@pytest.mark.parametrize('override, key', [
    ('--config.model.audio_vocab_size=16', 'audio_vocab_size'),
    ('--config.model.end_id=21', 'end_id'),
    ('--config.model.end_id=5', 'end_id'),
    ("--config.model.reference=pooledx", 'reference'),
    ('--config.model.reference_dim=0', 'reference_dim'),
])
def test_config_check_names_the_key(override, key):
  c = cfg.load(TINY, [override])
  with pytest.raises(ConfigError, match=f'config.model.{key}'):
    task_lib.check_config(c)
