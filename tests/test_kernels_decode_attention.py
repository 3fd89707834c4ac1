"""The Pallas decode-attention kernel against its pure-JAX reference.

The kernel runs in Pallas's interpreters on CPU: the generic one for the
Triton wrapper, the TPU one (with race and out-of-bounds detection) for the
Mosaic wrapper, and (jax >= 0.11) the GPU one, which simulates shared memory,
TMA copies and WGMMA, for the Mosaic GPU wrapper. Lowering tests compile the
same calls for cuda and tpu from this CPU machine, which runs the
Pallas->Triton, Pallas->Mosaic GPU and Pallas->Mosaic lowerings (not the
GPU/TPU compilers behind them); from jax 0.11 on the GPU lowerings target an
abstract H100 (kernels/targets.py). Each wrapper is tested where the
installed jax has it (`K.AVAILABLE`).

Tolerances: float32 inputs agree with the float32 reference to 2e-6 absolute
(the sums are merely reordered). bfloat16 inputs are compared with the
reference computed in float32 from the same bfloat16 values. The kernel
rounds the softmax weights to bfloat16 before the PV matmul (as any bf16
kernel feeding a bf16 matmul does; up to ~2^-8 relative per weight, 3e-3
absolute here) and returns bfloat16 (half an ulp, 2^-8 relative):
|out - ref| <= 3e-3 + 2^-8 |ref|.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from musicjax.kernels import decode_attention as K
from musicjax.kernels import decode_reference as R
from musicjax.kernels import dispatch
from musicjax.kernels import targets
from musicjax.parallel import rules

GPU = [b for b in ('triton', 'mosaic_gpu') if b in K.AVAILABLE]
HAS_MOSAIC_GPU = 'mosaic_gpu' in K.AVAILABLE
mosaic_gpu_only = pytest.mark.skipif(
    not HAS_MOSAIC_GPU, reason=f'jax {jax.__version__} has no Mosaic GPU '
    'wrapper (jax >= 0.11); test_mosaic_gpu_is_named_unavailable covers it')

ATOL = {jnp.float32: 2e-6, jnp.bfloat16: 3e-3}
RTOL = {jnp.float32: 0.0, jnp.bfloat16: 2.0 ** -8}


def _inputs(b, hq, hkv, s, d, dtype, seed=0, holes=False):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((b, hq, d)), dtype)
  k = jnp.asarray(r.standard_normal((b, hkv, s, d)), dtype)
  # Values with a per-slot offset: a wrong slot or a dropped block moves the
  # average visibly.
  v = jnp.asarray(r.standard_normal((b, hkv, s, d)) +
                  np.linspace(-1, 1, s)[None, None, :, None], dtype)
  valid = jnp.asarray(r.random((b, s)) > 0.3) if holes else None
  return q, k, v, valid


def _reference(q, k, v, lengths, valid):
  f = lambda x: x.astype(jnp.float32)
  return R.decode_attention_reference(f(q), f(k), f(v), lengths, valid)


def _check(backend, b, hq, hkv, s, d, dtype, lengths, params, holes=False,
           interpret=True):
  q, k, v, valid = _inputs(b, hq, hkv, s, d, dtype, holes=holes)
  lengths = jnp.asarray(lengths, jnp.int32)
  run = jax.jit(functools.partial(K.decode_attention, backend=backend,
                                  params=params, interpret=interpret))
  out = run(q, k, v, lengths, valid)
  assert out.shape == (b, hq, d) and out.dtype == dtype
  ref = _reference(q, k, v, lengths, valid)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref),
                             atol=ATOL[dtype], rtol=RTOL[dtype])
  return np.asarray(out, np.float32)


@pytest.mark.parametrize('backend', ['triton', 'tpu'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lengths_in_one_batch_of_8(backend, dtype):
  """Batch 8, lengths 1, 127, 128, 513 and 4096 (a full cache) side by side,
  plus 0 (no key: zeros) and lengths that end inside a later split."""
  lengths = [1, 127, 128, 513, 4096, 0, 1025, 3000]
  out = _check(backend, 8, 8, 2, 4096, 128, dtype, lengths,
               K.KernelParams(block_k=128, num_splits=8))
  assert np.all(out[5] == 0)


@mosaic_gpu_only
def test_mosaic_gpu_lengths_gqa_and_holes():
  """The Mosaic GPU wrapper in the GPU interpreter (bfloat16, its one dtype):
  lengths 0, 1, 63, 64, 700 and a full cache in one batch, GQA groups of 4 and
  of 1, head dims 128 and 64, and holes inside the length."""
  params = K.KernelParams(block_k=64, num_splits=4)
  out = _check('mosaic_gpu', 6, 8, 2, 1024, 128, jnp.bfloat16,
               [0, 1, 63, 64, 700, 1024], params)
  assert np.all(out[0] == 0)
  _check('mosaic_gpu', 1, 2, 2, 512, 64, jnp.bfloat16, [300],
         K.KernelParams(block_k=128, num_splits=2))
  _check('mosaic_gpu', 2, 8, 2, 512, 64, jnp.bfloat16, [300, 512],
         K.KernelParams(block_k=64, num_splits=2), holes=True)


@pytest.mark.parametrize('backend,group', [('triton', 1), ('triton', 2),
                                           ('tpu', 4), ('triton', 8),
                                           ('tpu', 8)])
def test_gqa_ratios_batch_1(backend, group):
  """Query heads per KV head 1, 2, 4, 8 at head dim 64: the heads of a group
  share one program's KV reads and must each get their own output."""
  _check(backend, 1, 2 * group, 2, 1024, 64, jnp.float32, [513],
         K.KernelParams(block_k=128, num_splits=4))


@pytest.mark.parametrize('backend', ['triton', 'tpu'])
def test_holes_in_the_cache_are_skipped(backend):
  """`valid` holes (left padding, null-condition pads) inside the length."""
  _check(backend, 2, 8, 2, 512, 64, jnp.bfloat16, [300, 512],
         K.KernelParams(block_k=128, num_splits=2), holes=True)


@pytest.mark.parametrize('backend', ['triton', 'tpu'])
def test_splits_that_are_not_a_power_of_2_long(backend):
  """The decode loop rounds its cache to a multiple of block_k * splits, so
  a split is often 3 or 5 blocks long (S = 3072: 384 slots per split).
  Checked in the interpreter, and lowered for the hardware."""
  params = K.KernelParams(block_k=128, num_splits=2)
  _check(backend, 2, 8, 2, 768, 64, jnp.float32, [700, 300], params)
  sd = jax.ShapeDtypeStruct
  for be in (GPU if backend == 'triton' else ['tpu']):
    targets.lower_text(
        functools.partial(K.decode_attention, backend=be),
        (sd((1, 32, 128), jnp.bfloat16), sd((1, 8, 3072, 128), jnp.bfloat16),
         sd((1, 8, 3072, 128), jnp.bfloat16), sd((1,), jnp.int32),
         sd((1, 3072), jnp.bool_)), 'cuda' if be in GPU else 'tpu')


def test_small_gpu_blocks_and_single_split():
  """block_k 16 (Triton's minimum) with many splits, and one split."""
  for params in (K.KernelParams(block_k=16, num_splits=16),
                 K.KernelParams(block_k=64, num_splits=1)):
    _check('triton', 2, 4, 1, 256, 16, jnp.float32, [17, 256], params)


def test_tpu_interpreter_finds_no_race_or_out_of_bounds_access():
  """The TPU interpreter with race detection on two simulated cores, reads
  out of bounds raising, and uninitialised memory as NaN (a block the kernel
  forgot to write would surface as NaN in the output)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads='raise',
                                 uninitialized_memory='nan',
                                 num_cores_or_threads=2)
  out = _check('tpu', 2, 8, 2, 1024, 128, jnp.float32, [200, 1024],
               K.KernelParams(block_k=128, num_splits=4), interpret=params)
  assert np.all(np.isfinite(out))
  assert ipc.races is not None and not ipc.races.races_found


@pytest.mark.parametrize('params,backend,message', [
    (K.KernelParams(block_k=96), 'triton', 'power of 2'),
    (K.KernelParams(block_k=8), 'triton', '>= 16'),
    (K.KernelParams(block_k=64), 'tpu', 'multiple of 128'),
    (K.KernelParams(num_splits=3), 'triton', 'num_splits=3'),
] + ([(K.KernelParams(block_k=32), 'mosaic_gpu', '>= 64 for Mosaic GPU')]
     if HAS_MOSAIC_GPU else []))
def test_bad_parameters_are_named(params, backend, message):
  q, k, v, _ = _inputs(1, 4, 2, 1024, 64, jnp.float32)
  with pytest.raises(ValueError, match=message):
    K.decode_attention(q, k, v, jnp.array([5]), backend=backend, params=params,
                       interpret=True)


def test_bad_shapes_are_named():
  q, k, v, _ = _inputs(1, 4, 2, 1000, 64, jnp.float32)
  with pytest.raises(ValueError, match=r'cache_length\(1000, params\) = 1024'):
    K.decode_attention(q, k, v, jnp.array([5]), interpret=True)
  q, k, v, _ = _inputs(1, 3, 2, 1024, 64, jnp.float32)
  with pytest.raises(ValueError, match='multiple of KV heads'):
    K.decode_attention(q, k, v, jnp.array([5]), interpret=True)
  q, k, v, _ = _inputs(1, 4, 2, 1024, 96, jnp.float32)
  with pytest.raises(ValueError, match='head dim 96'):
    K.decode_attention(q, k, v, jnp.array([5]), interpret=True)
  q, k, v, _ = _inputs(1, 4, 2, 1024, 64, jnp.float32)
  with pytest.raises(ValueError, match='share a dtype'):
    K.decode_attention(q.astype(jnp.bfloat16), k, v, jnp.array([5]),
                       interpret=True)
  assert K.cache_length(1000, K.KernelParams()) == 1024
  assert K.cache_length(1024, K.KernelParams()) == 1024


@mosaic_gpu_only
def test_mosaic_gpu_names_what_it_cannot_take():
  q, k, v, _ = _inputs(1, 4, 2, 1024, 64, jnp.float32)
  with pytest.raises(ValueError, match='bfloat16 cache, got float32'):
    K.decode_attention(q, k, v, jnp.array([5]), backend='mosaic_gpu',
                       interpret=True)
  q, k, v, _ = _inputs(1, 4, 2, 1024, 32, jnp.bfloat16)
  with pytest.raises(ValueError, match='head dim 32 must be a multiple of 64'):
    K.decode_attention(q, k, v, jnp.array([5]), backend='mosaic_gpu',
                       interpret=True)


@pytest.mark.skipif(HAS_MOSAIC_GPU, reason='this jax has the Mosaic GPU '
                    'wrapper; the tests above run it')
def test_mosaic_gpu_is_named_unavailable():
  """On jax 0.10 asking for the Mosaic GPU wrapper says what it needs, and
  dispatch on a Hopper GPU falls back to Triton."""
  q, k, v, _ = _inputs(1, 4, 2, 1024, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"'mosaic_gpu' needs jax >= 0.11"):
    K.decode_attention(q, k, v, jnp.array([5]), backend='mosaic_gpu')
  assert dispatch.resolve('auto', 32, 8, 128, K.KernelParams(), platform='gpu',
                          arch=9.0) == 'triton'


LOWERINGS = [('triton', 'cuda', '__gpu$xla.gpu.triton', jnp.float32),
             ('triton', 'cuda', '__gpu$xla.gpu.triton', jnp.bfloat16),
             ('tpu', 'tpu', 'tpu_custom_call', jnp.float32),
             ('tpu', 'tpu', 'tpu_custom_call', jnp.bfloat16),
             ('mosaic_gpu', 'cuda', '@mosaic_gpu', jnp.bfloat16)]


@pytest.mark.parametrize('backend,platform,marker,dtype',
                         [c for c in LOWERINGS if c[0] in K.AVAILABLE])
def test_lowers_for_the_target_platform(backend, platform, marker, dtype):
  """Every wrapper the installed jax has: the issue's benchmark shape (B=1,
  S=8192, 8 KV heads, D=128, 32 query heads) and a batch-8, head-dim-64 MHA
  shape lower to the backend's custom call with the default parameters."""
  for b, hq, hkv, s, d in ((1, 32, 8, 8192, 128), (8, 8, 8, 2048, 64)):
    sd = jax.ShapeDtypeStruct
    text = targets.lower_text(
        functools.partial(K.decode_attention, backend=backend),
        (sd((b, hq, d), dtype), sd((b, hkv, s, d), dtype),
         sd((b, hkv, s, d), dtype), sd((b,), jnp.int32), sd((b, s), jnp.bool_)),
        platform)
    assert marker in text


def test_every_backend_of_this_jax_is_tested_for_lowering():
  """A wrapper the installed jax offers cannot miss its lowering test."""
  assert set(K.AVAILABLE) == {c[0] for c in LOWERINGS if c[0] in K.AVAILABLE}
  assert set(K.AVAILABLE) >= {'triton', 'tpu'} | (
      {'mosaic_gpu'} if jax.__version_info__ >= (0, 11) else set())


def test_resolve_picks_the_kernel_on_gpu_and_tpu_only():
  p = K.KernelParams()
  assert dispatch.resolve('auto', 32, 8, 128, p, platform='cpu') == 'xla'
  assert dispatch.resolve('auto', 32, 8, 128, p, platform='gpu',
                          arch=8.0) == 'triton'
  # Hopper: the Mosaic GPU wrapper where this jax has it.
  assert dispatch.resolve('auto', 32, 8, 128, p, platform='gpu', arch=9.0) == (
      'mosaic_gpu' if HAS_MOSAIC_GPU else 'triton')
  assert dispatch.resolve('auto', 32, 8, 128, p, platform='tpu') == 'tpu'
  assert dispatch.resolve('pallas', 32, 8, 128, p, platform='cpu') == 'interpret'
  assert dispatch.resolve('xla', 32, 8, 128, p, platform='gpu') == 'xla'
  # Shapes the Triton lowering cannot tile fall back under auto, fail loudly
  # when the kernel is forced.
  assert dispatch.resolve('auto', 12, 4, 96, p, platform='gpu',
                          arch=9.0) == 'xla'
  with pytest.raises(ValueError, match='head dim 96'):
    dispatch.resolve('pallas', 12, 4, 96, p, platform='gpu', arch=9.0)
  small = K.KernelParams(block_k=64)
  assert dispatch.resolve('auto', 32, 8, 128, small, platform='tpu') == 'xla'
  with pytest.raises(ValueError, match="one of \\('auto', 'xla', 'pallas'\\)"):
    dispatch.resolve('cudnn', 32, 8, 128, p)


def test_sharded_mesh_runs_the_kernel_per_shard():
  """On 8 devices (batch over data x fsdp, heads over tensor) the kernel runs
  under shard_map and equals the reference."""
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  table = rules.normalize_rules((('batch', ('data', 'fsdp')),
                                 ('heads', 'tensor'), ('kv_heads', 'tensor')))
  q, k, v, valid = _inputs(4, 8, 2, 512, 64, jnp.float32, holes=True)
  lengths = jnp.asarray([512, 77, 300, 1], jnp.int32)
  params = K.KernelParams(block_k=64, num_splits=2)
  with jax.set_mesh(mesh), rules.use_rules(table):
    assert dispatch._mesh_specs(q, k)[1] == P(('data', 'fsdp'), 'tensor', None,
                                               None)
    run = jax.jit(lambda *a: dispatch.attend_decode(*a, impl='interpret',
                                                    params=params))
    out = run(q, k, v, lengths, valid)
    hlo = run.lower(q, k, v, lengths, valid).as_text()
  assert 'shard_map' in hlo or 'sdy.manual_computation' in hlo
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(_reference(q, k, v, lengths, valid)),
                             atol=2e-6, rtol=0)


@pytest.mark.parametrize('backend', ['triton', 'tpu'] + GPU[1:])
def test_blocks_past_the_length_are_never_computed(backend):
  """Every key block wholly past a row's length holds NaN: the output stays
  finite and exact, so the loop stops at the length and splits past it do
  no work (rather than masking work they did)."""
  params = K.KernelParams(block_k=128, num_splits=4) if backend == 'tpu' \
      else K.KernelParams(block_k=64, num_splits=4)
  dtype = jnp.bfloat16 if backend == 'mosaic_gpu' else jnp.float32
  s, lengths = 1024, np.array([70, 300])
  q, k, v, _ = _inputs(2, 4, 2, s, 64, dtype)
  bk = params.block_k
  past = np.arange(s)[None, :] >= (-(-lengths // bk) * bk)[:, None]  # [B, S]
  poison = lambda x: jnp.where(past[:, None, :, None], jnp.nan, x)
  out = K.decode_attention(q, poison(k), poison(v), jnp.asarray(lengths),
                           backend=backend, params=params, interpret=True)
  ref = _reference(q, k, v, jnp.asarray(lengths), None)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref),
                             atol=ATOL[dtype], rtol=RTOL[dtype])
