"""`musicjax import-heartmula`: heartlib's released folder layout (built here
from the tiny HeartMuLa fixture, tests/fixtures/heartmula_tiny) -> a normal
LM run that restores the loader's model exactly, streams onto the rules'
shardings, fine-tunes, evaluates and exports; bad input names the file and
tensor and leaves no run behind."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from musicjax import cli
from musicjax import config as cfg
from musicjax.export import import_heartmula as I
from musicjax.export.released import heartmula as hw
from musicjax.export.released import reader
from musicjax.lm import layout
from musicjax.parallel import rules as rules_lib
from musicjax.train import new_run
from musicjax.train import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'heartmula_tiny')
TINY = 'lm/heartmula_tiny'
# What a training or eval command overrides: synthetic data that the tiny
# model's 8 x 16 codes fit, batches of the 8 test devices' data axis.
SYNTHETIC = ['--config.data.kind=synthetic', '--config.data.batch_size=8',
             '--config.data.eval_batch_size=8', '--config.summary.seconds=0']


def released(root) -> str:
  """heartlib's released layout of the tiny fixture: DIR/HeartMuLa-oss-tiny/
  (config.json + safetensors), DIR/HeartCodec-oss/ (a stand-in), and the
  fixture's tokenizer.json and gen_config.json."""
  root = str(root)
  model = os.path.join(root, 'HeartMuLa-oss-tiny')
  os.makedirs(model)
  for name in (hw.CONFIG, hw.SINGLE):
    shutil.copy(os.path.join(FIXTURE, name), model)
  os.makedirs(os.path.join(root, 'HeartCodec-oss'))
  for name in I.EXTRAS:
    shutil.copy(os.path.join(FIXTURE, name), root)
  return root


def _import(src, run, *extra) -> int:
  return cli.main(['import-heartmula', '--from', src, '--workdir', run,
                   '--config', TINY, *extra])


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """(released DIR, the run imported from it)."""
  tmp = tmp_path_factory.mktemp('import')
  src, run = released(tmp / 'released'), str(tmp / 'run')
  assert _import(src, run) == 0
  return src, run


@pytest.fixture(scope='module')
def loaded():
  return hw.load(FIXTURE, cfg.load(TINY))


def _params(model) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(
              nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


def _batch(k: int) -> dict:
  """Two rows of teacher-forced slots (text prompt, reference slot, frames),
  the second unconditional."""
  rng = np.random.default_rng(0)
  s, p = 12, 6
  text = np.full((2, s), layout.EMPTY, np.int32)
  text[:, :p] = rng.integers(0, 64, p)
  text[:, 2] = layout.REF_SLOT
  audio = np.full((2, s, k), layout.EMPTY, np.int32)
  audio[:, p:] = rng.integers(0, 16, (s - p, k))
  return {'text': jnp.asarray(text), 'audio': jnp.asarray(audio),
          'positions': jnp.broadcast_to(jnp.arange(s), (2, s)),
          'valid': jnp.ones((2, s), bool),
          'ref_embed': jnp.asarray(rng.normal(size=(2, 8)), jnp.float32),
          'ref_valid': jnp.ones((2,), bool),
          'uncond': jnp.asarray([False, True])}


def test_the_run_restores_the_loaders_model(imported, loaded):
  src, run_dir = imported
  run = runs.load_run(run_dir, expect='lm')
  model, c = loaded
  assert run.step == 0 and run.config.model == c.model
  got, want = _params(run.model), _params(model)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  batch = _batch(c.model.num_codebooks)
  out_want = model(batch, 6)
  with run.activate():
    out_got = run.model(batch, 6)
  for key in ('global', 'local'):
    np.testing.assert_array_equal(np.asarray(out_got[key]),
                                  np.asarray(out_want[key]), err_msg=key)
  # A fresh optimizer: Adam's moments at zero, no step counted.
  opt = nnx.to_pure_dict(nnx.state(run.state))['opt']
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(opt))
  # The released files travel with the run; HeartCodec's folder is recorded.
  for name in I.EXTRAS:
    with open(os.path.join(src, name), 'rb') as a, open(
        os.path.join(run_dir, I.RELEASED, name), 'rb') as b:
      assert a.read() == b.read()
  with open(os.path.join(run_dir, I.RELEASED, I.RECORD)) as f:
    record = json.load(f)
  assert record['heartcodec'] == os.path.join(src, 'HeartCodec-oss')
  assert record['heartmula'] == os.path.join(src, 'HeartMuLa-oss-tiny')
  assert not os.path.exists(new_run.staging_dir(run_dir))


def test_from_may_name_the_heartmula_folder(tmp_path):
  src = released(tmp_path / 'released')
  direct = I.find(os.path.join(src, 'HeartMuLa-oss-tiny'))
  assert direct == I.find(src)
  assert direct.codec == os.path.join(src, 'HeartCodec-oss')
  assert sorted(direct.extras) == sorted(I.EXTRAS)
  # A bare model folder (no tokenizer, no codec) imports too.
  bare = I.find(FIXTURE)
  assert bare.model == FIXTURE and bare.codec is None


def test_streams_onto_the_rules_shardings(tmp_path, monkeypatch, loaded):
  """On 8 devices with fsdp x tensor = 4 x 2, every array of the written state
  lies as the trainer's rules say, split arrays are never whole on one
  device, and the values are the single-device load's."""
  written = {}
  real_write = new_run.write

  def spy(workdir, config, state, step):
    written['state'], written['config'] = state, config
    real_write(workdir, config, state, step)

  monkeypatch.setattr(new_run, 'write', spy)
  src = released(tmp_path / 'released')
  assert _import(src, str(tmp_path / 'run'), '--config.mesh.data=1',
                 '--config.mesh.fsdp=4', '--config.mesh.tensor=2') == 0
  from musicjax.train import trainer
  s = trainer.setup(written['config'])
  assert dict(s.mesh.shape) == {'data': 1, 'fsdp': 4, 'tensor': 2}
  state = nnx.to_pure_dict(written['state'])
  want = nnx.to_pure_dict(s.state_shardings)
  for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(state),
                           jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(sh, x.ndim), jax.tree_util.keystr(path)
  specs = rules_lib.describe(s.state_shardings)
  split = [k for k, v in specs.items() if k.startswith('model')
           and ('fsdp' in v or 'tensor' in v)]
  assert len(split) > 10, specs
  params = _params(loaded[0])
  for path, x in jax.tree_util.tree_leaves_with_path(state['model']):
    key = jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), params[key], err_msg=key)
  sharded = [x for x in jax.tree.leaves(state['model'])
             if not x.sharding.is_fully_replicated]
  assert sharded and all(s.data.size < x.size for x in sharded
                         for s in x.addressable_shards)


def test_train_resumes_eval_and_export(imported, tmp_path):
  """Fine-tuning is resuming the imported run (its step 0) on any data;
  eval and export take it like any run."""
  _, src_run = imported
  run = str(tmp_path / 'run')
  shutil.copytree(src_run, run)
  assert cli.main(['eval', '--workdir', run, '--num-batches', '1',
                   *SYNTHETIC]) == 0
  assert cli.main(['train', '--workdir', run, '--config.train.steps=2',
                   *SYNTHETIC]) == 0
  recs = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  assert recs[-1]['step'] == 2 and np.isfinite(recs[-1]['loss'])
  tuned = runs.load_run(run)
  assert tuned.step == 2
  before = _params(runs.load_run(src_run).model)
  after = _params(tuned.model)
  assert any(np.any(before[k] != after[k]) for k in before)
  out = str(tmp_path / 'export')
  assert cli.main(['export', '--workdir', src_run, '--out', out]) == 0
  with open(os.path.join(out, 'config.json')) as f:
    meta = json.load(f)
  assert meta['family'] == 'lm' and meta['step'] == 0
  # The export reads back into the same weights (import-torch).
  back = str(tmp_path / 'back')
  assert cli.main(['import-torch', '--from', out, '--workdir', back]) == 0
  got = _params(runs.load_run(back).model)
  for key in before:
    np.testing.assert_array_equal(got[key], before[key], err_msg=key)


# ---- bad input: named, and no run left behind -----------------------------------
def _fails(capsys, src, run, *needles):
  assert _import(src, run) == 2
  err = capsys.readouterr().err
  for needle in needles:
    assert needle in err, err
  assert not os.path.exists(run)
  assert not os.path.exists(new_run.staging_dir(run))


def test_truncated_file(tmp_path, capsys):
  src = released(tmp_path / 'released')
  path = os.path.join(src, 'HeartMuLa-oss-tiny', hw.SINGLE)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  _fails(capsys, src, str(tmp_path / 'run'), path)


def test_missing_tensor(tmp_path, capsys):
  src = released(tmp_path / 'released')
  r = reader.Reader(FIXTURE)
  tensors = {n: r.get(n) for n in r.names
             if n != 'backbone.layers.1.attn.k_proj.weight'}
  path = os.path.join(src, 'HeartMuLa-oss-tiny', hw.SINGLE)
  save_file(tensors, path)
  _fails(capsys, src, str(tmp_path / 'run'), path,
         "'backbone.layers.1.attn.k_proj.weight'", 'missing')


def test_a_failure_after_writing_leaves_no_run(tmp_path, monkeypatch):
  """A failure once the checkpoint is on disk still removes everything."""
  src = released(tmp_path / 'released')
  run = str(tmp_path / 'run')

  def boom(*args):
    raise OSError('disk full')

  monkeypatch.setattr(shutil, 'copyfile', boom)
  with pytest.raises(OSError, match='disk full'):
    I.import_folder(src, run, TINY)
  assert sorted(os.listdir(tmp_path)) == ['released']


def test_an_existing_run_is_refused(tmp_path, capsys):
  src = released(tmp_path / 'released')
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'notes.txt').write_text('mine')
  assert _import(src, str(run)) == 2
  assert 'already exists and is not empty' in capsys.readouterr().err
  assert os.listdir(run) == ['notes.txt']


def test_not_a_released_folder(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  _fails(capsys, str(tmp_path / 'empty'), str(tmp_path / 'run'),
         'HeartMuLa-oss-*')


def test_flavors_without_a_config_of_ours(tmp_path, capsys):
  """The tiny fixture's flavors are the test's own: without --config the
  error names config.json and the flavors."""
  src = released(tmp_path / 'released')
  assert cli.main(['import-heartmula', '--from', src, '--workdir',
                   str(tmp_path / 'run')]) == 2
  err = capsys.readouterr().err
  assert 'config.json' in err and 'llama-tiny-bb' in err, err
  assert not os.path.exists(tmp_path / 'run')


def test_a_config_of_another_model(tmp_path, capsys):
  src = released(tmp_path / 'released')
  assert _import(src, str(tmp_path / 'run'),
                 '--config.model.backbone.num_layers=3') == 2
  assert 'backbone.layers.2.' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'run')
