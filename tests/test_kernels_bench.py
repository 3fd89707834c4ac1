"""`musicjax bench decode-attention`: what it times, the bytes and fractions
it reports, and the errors a user sees. Tiny shapes; the real run is in the
Makefile's bench target."""
import collections
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import pytest

from musicjax import cli
from musicjax.bench import kernels as bench
from musicjax.kernels import decode_attention as kernel
from musicjax.kernels import decode_reference
from musicjax.kernels import shipped
from musicjax.kernels import targets

TINY = dict(batch=(1,), seq=256, q_heads=4, kv_heads=2, head_dim=16,
            block_k=16, splits=2, rotate=2, calls=2, repeats=2)
TINY_FLAGS = ['--batch', '1', '--seq', '256', '--q-heads', '4', '--kv-heads',
              '2', '--head-dim', '16', '--block-k', '16', '--splits', '2',
              '--rotate', '1', '--calls', '1', '--repeats', '1']


def test_tiny_run_times_xla_and_interpreter_and_counts_kv_bytes():
  out = bench.run(bench.Options(**TINY, impl='interpret', dtype='float32',
                                peak_gbs=10.0))
  assert out['implementations'] == ['xla', 'interpret']
  assert out['peak_source'] == '--peak-gbs' and out['peak_bytes_per_s'] == 10e9
  assert out['machine']['platform'] == 'cpu' and 'decode attention' in out['benchmark']
  assert {'load_1min_start', 'load_1min_end', 'busy'} <= set(out['machine'])
  (case,) = out['cases']
  # K and V, each slot once: 2 * B * Hkv * S * D * 4 bytes (float32).
  assert case['kv_bytes_per_call'] == 2 * 1 * 2 * 256 * 16 * 4
  assert case['rotate'] == 2 and case['calls'] == 2
  for impl, r in case['results'].items():
    assert r['seconds_per_call'] > 0, impl
    assert r['fraction_of_peak'] == pytest.approx(
        case['kv_bytes_per_call'] / r['seconds_per_call'] / 10e9, rel=1e-12)
    assert r['gb_per_s'] == pytest.approx(
        case['kv_bytes_per_call'] / r['seconds_per_call'] / 1e9, rel=1e-12)
  assert 'meaningless' in case['results']['interpret']['what']
  # No native kernel on CPU: no speed-up, and no H100 target.
  assert 'speedup_over_xla' not in case and 'target_fraction' not in case


def test_bytes_count_only_the_attended_length():
  out = bench.run(bench.Options(**{**TINY, 'batch': (2,)}, length=96,
                                impl='xla', peak_gbs=1.0))
  (case,) = out['cases']
  assert case['length'] == 96
  assert case['kv_bytes_per_call'] == 2 * 2 * 2 * 96 * 16 * 2   # bfloat16
  assert list(case['results']) == ['xla']


def test_sizes_the_kernel_cannot_take_name_the_fix():
  with pytest.raises(ValueError, match=r'block_k\*num_splits = 128\*8 = 1024; '
                     r'use --seq 1024'):
    bench.run(bench.Options(seq=1000))
  with pytest.raises(ValueError, match='multiple of --kv-heads'):
    bench.run(bench.Options(q_heads=6, kv_heads=4))
  with pytest.raises(ValueError, match='power of 2'):
    bench.run(bench.Options(**{**TINY, 'head_dim': 24}, impl='interpret'))
  with pytest.raises(ValueError, match='GPU or TPU'):
    bench.run(bench.Options(**TINY, sweep=True))


def test_default_rotation_exceeds_256_mb_within_bounds():
  mb32 = 2 * 1 * 8 * 8192 * 128 * 2           # B=1, S=8192, bf16: 33.6 MB
  assert bench.default_rotate(mb32) == 8 and 8 * mb32 > bench.COLD_TOTAL_BYTES
  assert bench.default_rotate(8 * mb32) == 1   # one B=8 cache is already cold
  assert bench.default_rotate(1024) == bench.MAX_ROTATE
  assert bench.default_calls(8) == 16 and bench.default_calls(1) == 8


@pytest.mark.parametrize('kind,peak', [
    ('NVIDIA H100 80GB HBM3', 3.35e12), ('NVIDIA H100 PCIe', 2.0e12),
    ('NVIDIA H200', 4.8e12), ('NVIDIA A100-SXM4-80GB', 2.039e12),
    ('NVIDIA A100-SXM4-40GB', 1.555e12), ('TPU v4', 1.2e12),
    ('TPU v5 lite', 8.19e11), ('TPU v5', 2.765e12), ('TPU v6 lite', 1.64e12),
    ('cpu', None), ('NVIDIA GeForce RTX 4090', None)])
def test_peak_table(kind, peak):
  assert bench.table_peak(kind) == peak


def test_targets_only_on_an_h100():
  h100 = 'NVIDIA H100 80GB HBM3'
  assert bench.target_fraction(h100, 1) == 0.60
  assert bench.target_fraction(h100, 8) == bench.target_fraction(h100, 32) == 0.85
  assert bench.target_fraction(h100, 4) is None
  assert bench.target_fraction('NVIDIA H200', 1) is None


def test_implementations_per_platform():
  o = bench.Options()
  assert bench.implementations(o, 'cpu') == (['xla'], None)
  assert bench.implementations(o, 'gpu') == (['xla', 'triton'], None)
  assert bench.implementations(o, 'tpu') == (['xla', 'tpu'], None)
  pallas = bench.Options(impl='pallas')
  assert bench.implementations(pallas, 'cpu')[0] == ['interpret']
  assert bench.implementations(pallas, 'gpu')[0] == ['triton']
  assert bench.implementations(bench.Options(impl='all'), 'gpu')[0] == [
      'xla', 'triton', 'interpret']
  # auto leaves out a kernel Triton cannot tile, and says why.
  impls, why = bench.implementations(bench.Options(head_dim=96), 'gpu')
  assert impls == ['xla'] and 'power of 2' in why


@pytest.mark.parametrize('impl,platform,target', [
    (i, p, t) for i, p, t in (('triton', 'cuda', '__gpu'),
                              ('tpu', 'tpu', 'tpu_custom_call'),
                              ('mosaic_gpu', 'cuda', 'mosaic_gpu_v2'))
    if i in kernel.AVAILABLE])
def test_timed_executable_lowers_one_kernel_per_call(impl, platform, target):
  """The GPU/TPU path without the hardware: each call is one kernel on its own
  cache argument (no dynamic slice copies a stacked cache)."""
  rotate, calls, b, hkv, s, d = 2, 3, 1, 2, 256, 128
  fn = bench.many_calls(bench.attend_fn(
      impl, kernel.KernelParams(block_k=128, num_splits=2)), rotate, calls)
  sds = jax.ShapeDtypeStruct
  args = [sds((b, 4, d), jnp.bfloat16), sds((b,), jnp.int32)] + [
      sds((b, hkv, s, d), jnp.bfloat16)] * (2 * rotate)
  with targets.lowering_target(platform):
    text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert collections.Counter(re.findall(r'custom_call @(\w+)', text))[target] == calls
  assert 'dynamic_slice' not in text


def test_cli_prints_json_without_config(capsys, monkeypatch):
  # A small streaming read: the measured-peak path, quickly.
  monkeypatch.setattr(bench, 'STREAM_BYTES', 4 * 2 ** 20)
  assert cli.main(['bench', 'decode-attention', *TINY_FLAGS]) == 0
  captured = capsys.readouterr()
  out = json.loads(captured.out.strip().splitlines()[-1])
  assert out['peak_source'] == 'measured streaming read' and out['peak_bytes_per_s'] > 0
  assert out['dtype'] == 'bfloat16' and out['implementations'] == ['xla']
  assert out['cases'][0]['results']['xla']['us_per_call'] > 0
  assert 'B=1 S=256' in captured.err                    # progress per case


def test_cli_bad_sizes_exit_2_with_the_fix(capsys):
  assert cli.main(['bench', 'decode-attention', '--seq', '1000']) == 2
  assert 'block_k*num_splits' in capsys.readouterr().err


SHIPPED_HERE = [n for n, why in shipped.available().items() if why is None]


def _decode_inputs(b=2, hq=8, hkv=2, s=1024, d=128, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, hq, d), dtype)
  k = jax.random.normal(keys[1], (b, hkv, s, d), dtype)
  v = jax.random.normal(keys[2], (b, hkv, s, d), dtype)
  return q, k, v, jnp.asarray([300, s][:b], jnp.int32)


def test_shipped_kernels_are_the_ones_this_jax_has():
  """jax <= 0.10 ships the Triton GQA decode kernel, 0.12 does not; tokamax
  installs only beside jax >= 0.11.1 on Python >= 3.12; the TPU paged kernel
  is in both."""
  have = shipped.available()
  assert have['jax_paged'] is None
  if jax.__version_info__ >= (0, 12):
    assert 'no longer ships' in have['jax_gqa']
  else:
    assert have['jax_gqa'] is None and 'not installed' in have['tokamax']


@pytest.mark.parametrize('name', SHIPPED_HERE)
def test_shipped_kernel_matches_the_reference_on_cpu(name):
  """Each shipped baseline in its CPU form (Pallas's interpreters, or
  tokamax's XLA path) against our reference on our cache, with lengths 300
  and 1024: the layout conversion and the call are what the bench times.
  bfloat16 in, the reference in float32 from the same values: the
  kernels' bfloat16 softmax weights and output allow 3e-3 + 2^-8 |ref|."""
  q, k, v, lengths = _decode_inputs()
  prepare, call = shipped.attend(name, native=False)
  out = jax.jit(call)(q, prepare(k, v), lengths).astype(jnp.float32)
  f32 = lambda x: x.astype(jnp.float32)
  ref = decode_reference.decode_attention_reference(f32(q), f32(k), f32(v),
                                                    lengths, None)
  assert out.shape == ref.shape
  assert bool(jnp.all(jnp.abs(out - ref) <= 3e-3 + 2 ** -8 * jnp.abs(ref)))


@pytest.mark.parametrize('name', SHIPPED_HERE)
def test_shipped_kernel_lowers_for_its_platform(name):
  """The native form lowers from this CPU to its accelerator's custom call
  (tokamax's own device check is lifted with its cross-compile option)."""
  q, k, v, lengths = _decode_inputs(b=1, hq=32, hkv=8, s=8192)
  prepare, call = shipped.attend(name, native=True)
  base = shipped.BASELINES[name]
  platform = {'gpu': 'cuda', 'tpu': 'tpu'}[base.native]
  sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  import contextlib
  ctx = shipped.cross_compile() if name == 'tokamax' else contextlib.nullcontext()
  with ctx:
    text = targets.lower_text(lambda q, k, v, l: call(q, prepare(k, v), l),
                              [sds(x) for x in (q, k, v, lengths)], platform)
  marker = '__gpu$xla.gpu.triton' if platform == 'cuda' else 'tpu_custom_call'
  assert marker in text


def test_bench_reports_shipped_kernels_with_their_error():
  """--shipped all on CPU: each shipped kernel's CPU form is timed on the same
  caches, labelled as not its speed, with its difference from XLA; the ones
  this install lacks are named with the reason."""
  opts = bench.Options(batch=(1,), seq=512, q_heads=4, kv_heads=2, head_dim=64,
                       block_k=64, splits=2, rotate=1, calls=1, repeats=1,
                       impl='xla', shipped='all', peak_gbs=10.0)
  out = bench.run(opts)
  assert out['implementations'] == ['xla'] + [n + bench.CPU_FORM
                                              for n in SHIPPED_HERE]
  missing = {n for n in shipped.BASELINES if n not in SHIPPED_HERE}
  assert set(out.get('shipped_not_run', {})) == missing
  (case,) = out['cases']
  assert case['results']['xla']['max_abs_err_vs_xla'] == 0.0
  for name in SHIPPED_HERE:
    r = case['results'][name + bench.CPU_FORM]
    assert 'not its speed' in r['what'] and r['seconds_per_call'] > 0
    assert 0.0 < r['max_abs_err_vs_xla'] < 2e-2, name
  native = bench.run(dataclasses.replace(opts, shipped='native'))
  assert native['implementations'] == ['xla']
  assert set(native['shipped_not_run']) == set(shipped.BASELINES)
