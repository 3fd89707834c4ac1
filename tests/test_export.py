"""`musicjax export` / `import-torch` on the JAX side: every family's state
survives export -> import bit for bit, sharded state exports like unsharded,
and bad export directories fail with errors naming the file or tensor."""
import json
import os
import stat

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import lm_fixtures as LF
from musicjax import cli
from musicjax import tasks
from musicjax.export import export as E
from musicjax.export import files
from musicjax.export import import_torch as I
from musicjax.errors import UserError
from musicjax.export import mapping as M
from musicjax.parallel import rules as rules_lib
from musicjax.train import runs
from musicjax.train import trainer
from tests import codec_fixtures as CF
from tests.test_accomp_train import small_config as accomp_config


def _codec_config():
  c = CF.small_config()
  c.model.up_kernel_multiple = 3      # conv_t with several taps per phase
  return c


def _accomp_config():
  c = accomp_config()
  c.model.conv_kernel = 3
  return c


CONFIGS = {
    'codec': _codec_config,
    'lm_global_local': lambda: LF.small_config('global_local', 'interleaved'),
    'lm_single_stream': lambda: LF.small_config('single_stream'),
    'accomp': _accomp_config,
}


def _model(config, seed):
  task = tasks.get(config.task)(config)
  with nnx.use_eager_sharding(False):
    return task.inference_model(task.create_state(nnx.Rngs(seed)))


def _same(a, b):
  pa, pb = E.state_paths(a), E.state_paths(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    x, y = np.asarray(pa[k]), np.asarray(pb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_export_then_import_is_bit_identical(name, tmp_path):
  c = CONFIGS[name]()
  src, dst = _model(c, 0), _model(c, 1)
  out = str(tmp_path / 'export')
  summary = E.export_model(src, c, out, step=5, max_shard_bytes=20_000)
  assert len(summary['files']) > 2          # sharded + index
  meta = json.load(open(os.path.join(out, 'config.json')))
  assert meta['family'] == E.family(c) and meta['step'] == 5
  # Every tensor is in the PyTorch layout of its rule.
  get, names = files.reader(out)
  assert len(names) == summary['tensors']
  I.load_into(dst, E.family(c), out)
  _same(src, dst)


@pytest.mark.parametrize('max_shard_bytes', [20_000, 2 ** 31])
def test_export_files_are_readable_like_any_new_file(tmp_path, max_shard_bytes):
  """Every file has the mode open() gives under the umask (safetensors alone
  writes 0600, which a serving job under another user cannot read), and no
  temporary file is left behind."""
  c = CONFIGS['lm_single_stream']()
  out = tmp_path / 'export'
  summary = E.export_model(_model(c, 0), c, str(out),
                           max_shard_bytes=max_shard_bytes)
  plain = tmp_path / 'plain'
  plain.write_text('')
  want = stat.S_IMODE(os.stat(plain).st_mode)
  assert sorted(os.listdir(out)) == sorted(summary['files'] +
                                           ['README.md', 'config.json'])
  for name in os.listdir(out):
    assert stat.S_IMODE(os.stat(out / name).st_mode) == want, name


def test_layouts_are_the_pytorch_ones():
  """Spot checks against PyTorch conventions, by value."""
  x = np.arange(2 * 3 * 4).reshape(2, 3, 4)                 # [k, in, out]
  w = M.to_torch('conv', x)
  assert w.shape == (4, 3, 2) and w[3, 1, 0] == x[0, 1, 3]  # [out, in, k]
  q = np.arange(5 * 2 * 3).reshape(5, 2, 3)                 # [E, H, D]
  wq = M.to_torch('proj_in', q)
  assert wq.shape == (6, 5) and wq[1 * 3 + 2, 4] == q[4, 1, 2]
  # conv_t: polyphase tap i, phase j -> transposed-conv tap (m-1-i)*s + j.
  v = np.arange(3 * 2 * 4 * 5).reshape(3, 2, 4, 5)          # [m, in, s, out]
  t = M.to_torch('conv_t', v)
  assert t.shape == (2, 5, 12) and t[1, 4, (3 - 1 - 0) * 4 + 3] == v[0, 1, 3, 4]
  for layout, shape in (('conv_t', (3, 2, 4, 5)), ('proj_out', (2, 3, 5)),
                        ('depthwise', (3, 7)), ('linear', (4, 6))):
    a = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_array_equal(
        M.from_torch(layout, M.to_torch(layout, a), shape), a)


def test_bfloat16_export_rounds_once(tmp_path):
  c = CONFIGS['lm_global_local']()
  src, dst = _model(c, 0), _model(c, 1)
  E.export_model(src, c, str(tmp_path), dtype='bfloat16')
  get, _ = files.reader(str(tmp_path))
  assert get('head0.weight').dtype == ml_dtypes.bfloat16
  I.load_into(dst, 'lm', str(tmp_path))
  for k, x in E.state_paths(src).items():
    want = np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(E.state_paths(dst)[k]), want)


def test_sharded_state_exports_like_one_device(tmp_path):
  """Parameters split over data x fsdp x tensor on 8 devices are gathered
  and written exactly as from one device."""
  c = LF.small_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  s = trainer.setup(c)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    module = nnx.merge(s.graphdef, state)
    model = s.task.inference_model(module)
    wq = model.backbone.layers.attn.wq[...]
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    E.export_model(model, c, str(tmp_path / 'sharded'))
  plain = jax.device_get(E.state_paths(model))
  get, names = files.reader(str(tmp_path / 'sharded'))
  ref = {}
  for path, x in plain.items():
    ref.update(M.export_arrays('lm', path, np.asarray(x)))
  assert sorted(ref) == names
  for n in names:
    np.testing.assert_array_equal(get(n), ref[n], err_msg=n)


# ----------------------------------------------------------------- bad input
@pytest.fixture(scope='module')
def lm_export(tmp_path_factory):
  c = CONFIGS['lm_global_local']()
  out = str(tmp_path_factory.mktemp('lm') / 'export')
  E.export_model(_model(c, 0), c, out)
  return c, out


def _rewrite(src_dir, dst_dir, edit):
  from safetensors.numpy import save_file
  get, names = files.reader(src_dir)
  tensors = edit({n: get(n) for n in names})
  os.makedirs(dst_dir)
  save_file(tensors, os.path.join(dst_dir, files.SINGLE))
  with open(os.path.join(src_dir, 'config.json')) as f, \
       open(os.path.join(dst_dir, 'config.json'), 'w') as g:
    g.write(f.read())


def test_truncated_file_names_the_file(lm_export, tmp_path):
  c, out = lm_export
  bad = tmp_path / 'bad'
  _rewrite(out, str(bad), lambda t: t)
  path = bad / files.SINGLE
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(files.ExportFileError, match='model.safetensors'):
    I.load_into(_model(c, 1), 'lm', str(bad))


@pytest.mark.parametrize('edit,message', [
    (lambda t: {k: v for k, v in t.items() if k != 'head0.weight'},
     "tensor 'head0.weight' is missing"),
    (lambda t: {**t, 'head0.weight': t['head0.weight'][:, :-1]},
     r"tensor 'head0.weight' \(for head0\): shape"),
    (lambda t: {**t, 'extra.weight': np.zeros((2,), np.float32)},
     'does not have: extra.weight'),
])
def test_bad_tensors_are_named(lm_export, tmp_path, edit, message):
  c, out = lm_export
  _rewrite(out, str(tmp_path / 'bad'), edit)
  with pytest.raises(ValueError, match=message):
    I.load_into(_model(c, 1), 'lm', str(tmp_path / 'bad'))


def test_not_an_export_directory(tmp_path):
  with pytest.raises(I.ImportError_, match='config.json: missing'):
    I.read_meta(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"format": "other"}')
  with pytest.raises(I.ImportError_, match='is not .musicjax-export.'):
    I.read_meta(str(tmp_path))
  with pytest.raises(files.ExportFileError, match='no model.safetensors'):
    files.reader(str(tmp_path))


def test_an_out_path_that_cannot_hold_an_export_is_named(tmp_path):
  """Checked before the (possibly long) restore: a file in the way, a
  bucket URL (os.makedirs would make a local 'gs:' folder)."""
  c = CONFIGS['codec']()
  model = _model(c, 0)
  (tmp_path / 'taken').write_text('')
  with pytest.raises(UserError, match='taken is a file, not a directory'):
    E.export_model(model, c, str(tmp_path / 'taken' / 'export'))
  with pytest.raises(UserError, match='export locally, then copy'):
    E.export_workdir(c, str(tmp_path / 'no_run'), 'gs://bucket/export')
  assert sorted(os.listdir(tmp_path)) == ['taken']


# -------------------------------------------------------------- CLI, a run
def test_cli_export_import_and_continue_training(tmp_path):
  """A trained run -> `musicjax export` -> `musicjax import-torch` -> the
  imported run restores the same weights and keeps training."""
  c = accomp_config(steps=2)
  run, out, back = (str(tmp_path / n) for n in ('run', 'export', 'back'))
  trainer.train(c, run)
  assert cli.main(['export', '--workdir', run, '--out', out]) == 0
  assert json.load(open(os.path.join(out, 'config.json')))['step'] == 2
  assert cli.main(['import-torch', '--from', out, '--workdir', back]) == 0
  a = runs.load_run(run, config=c).model
  from musicjax import config as config_lib
  c2 = config_lib.load_saved(back)
  _same(a, runs.load_run(back).model)
  # Importing twice into one run is refused (nothing is overwritten).
  assert cli.main(['import-torch', '--from', out, '--workdir', back]) == 2
  c2.train.steps = 3
  c2.data = c.data
  trainer.train(c2, back)
  recs = [json.loads(l) for l in open(os.path.join(back, 'metrics.jsonl'))]
  assert recs[-1]['step'] == 3 and np.isfinite(recs[-1]['loss'])


def test_import_refuses_a_config_of_another_model(lm_export, tmp_path):
  c, out = lm_export
  other = CONFIGS['lm_global_local']()
  other.model.backbone.num_layers = 3
  meta = I.read_meta(out)
  with pytest.raises(I.ImportError_, match='another model'):
    I.run_config(meta, str(tmp_path / 'run'), other)
  assert I.run_config(meta, str(tmp_path / 'run2'), c).model == c.model
