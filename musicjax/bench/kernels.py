"""`musicjax bench decode-attention`: time per call, KV bandwidth and its
fraction of the device's peak, for the XLA path and the Pallas kernel.

What a call reads: the K and V of every attended slot, once
(2 * B * Hkv * length * D * itemsize bytes).
Achieved bandwidth = those bytes / time per call; the fraction divides by the
peak from a table of accelerators (or --peak-gbs), or on CPU and unknown
devices by a streaming read measured in the same run.

How a call is timed: one jitted executable runs the attention `calls` times
over `rotate` distinct caches passed as separate arguments (unrolled, each
query fed by the previous output, outputs summed), and the median wall time
is divided by `calls`. That amortises dispatch as a decode loop does, and
rotating caches whose total exceeds the L2 keeps the cache cold: a single
per-layer cache fits in an H100's 50 MB L2 and would read faster than HBM.
On CPU the kernel only runs in Pallas's interpreter, whose timing measures
the interpreter; it is reported for completeness and labelled so.

Beside ours, the decode kernels that jax and tokamax ship (kernels/shipped.py)
run on the same caches, converted once to their layout outside the timing:
`--shipped native` (default) times those that compile for this device,
`all` adds their CPU forms (interpreter or XLA path, labelled), `none` skips
them. Every result carries its largest difference from the XLA reference on
the first cache, so a fast wrong kernel cannot pass unseen.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time

import jax
import jax.numpy as jnp

from musicjax import runtime
from musicjax.bench import machine
from musicjax.bench import measure
from musicjax.errors import UserError
from musicjax.kernels import decode_attention as kernel
from musicjax.kernels import dispatch
from musicjax.kernels import shipped

IMPLS = ('auto', 'xla', 'pallas', 'interpret', 'all')
SHIPPED = ('native', 'all', 'none')
CPU_FORM = '_cpu'    # suffix of a shipped kernel's CPU form in the results
DTYPES = ('bfloat16', 'float32')
# Rotated caches should together exceed any L2 (50 MB on an H100) several times.
COLD_TOTAL_BYTES = 256 * 10 ** 6
MAX_ROTATE = 16
MIN_CALLS = 8            # calls per timed executable, at least
CALLS_PER_CACHE = 2      # each rotated cache is read this often per executable
# The streaming-read reference on CPU: large enough to leave every cache level.
STREAM_BYTES = 512 * 2 ** 20
STREAM_MIN_REPEATS = 10
# Next query = query + CHAIN_SCALE * output: a data dependence between calls
# (as between layers of a decode step) without changing the work.
CHAIN_SCALE = 1e-3
SWEEP_BLOCK_K = (64, 128, 256)
SWEEP_SPLITS = (4, 8, 16, 32)
GB = 1e9

# HBM bandwidth (bytes/s) by `device_kind` (lower-cased), first match wins.
PEAK_BANDWIDTH = (
    (r'h100.*pcie', 2.0e12),
    (r'h100.*(sxm|hbm3)', 3.35e12),
    (r'h200', 4.8e12),
    (r'a100.*sxm4.*80gb', 2.039e12),
    (r'a100.*40gb', 1.555e12),
    (r'tpu v4$', 1.2e12),
    (r'tpu v5 ?(e|lite)', 8.19e11),
    (r'tpu v5p?$', 2.765e12),          # jax names a v5p 'TPU v5'
    (r'tpu v6 ?(e|lite)', 1.64e12),
)
# The issue's targets on an H100 (S=8192, 8 KV heads, D=128): fraction of HBM
# bandwidth at batch 1, and at batch >= TARGET_LARGE_BATCH.
TARGET_DEVICE = 'h100'
TARGET_BATCH_1 = 0.60
TARGET_LARGE_BATCH = 8
TARGET_LARGE = 0.85

_WHAT = {
    'xla': 'XLA reference (decode_reference: einsum, softmax, einsum), jitted',
    'triton': 'Pallas split-K kernel, Triton lowering (GPU)',
    'tpu': 'Pallas split-K kernel, Mosaic lowering (TPU)',
    'mosaic_gpu': 'Pallas split-K kernel, Mosaic GPU lowering (Hopper+, '
                  'TMA + WGMMA)',
    'interpret': "Pallas kernel in Pallas's interpreter: interpreter timing, "
                 'meaningless for speed',
}


class BenchError(UserError, ValueError):
  """Options the benchmark cannot run; the message names the flag to change."""


@dataclasses.dataclass(frozen=True)
class Options:
  batch: tuple[int, ...] = (1, 8)
  seq: int = 8192
  length: int = 0          # attended slots; 0 = seq (all valid)
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  dtype: str = 'bfloat16'
  impl: str = 'auto'
  rotate: int = 0          # 0 = enough to exceed COLD_TOTAL_BYTES
  calls: int = 0           # 0 = max(CALLS_PER_CACHE * rotate, MIN_CALLS)
  block_k: int | None = None     # None: KernelParams' default
  splits: int | None = None
  sweep: bool = False
  peak_gbs: float | None = None  # None: table, or measured on CPU
  repeats: int = 5
  shipped: str = 'native'  # shipped baselines: native | all | none

  @property
  def params(self) -> kernel.KernelParams:
    d = kernel.KernelParams()
    return dataclasses.replace(
        d, block_k=d.block_k if self.block_k is None else self.block_k,
        num_splits=d.num_splits if self.splits is None else self.splits)

  @property
  def attended(self) -> int:
    return self.length or self.seq


def _log(msg: str) -> None:
  print(f'[bench decode-attention] {msg}', file=sys.stderr, flush=True)


def kv_bytes(batch: int, kv_heads: int, length: int, head_dim: int,
             itemsize: int) -> int:
  """K and V bytes one call must read: each attended slot once."""
  return 2 * batch * kv_heads * length * head_dim * itemsize


def default_rotate(cache_bytes: int) -> int:
  """Caches to rotate so that together they exceed COLD_TOTAL_BYTES."""
  return max(1, min(MAX_ROTATE, COLD_TOTAL_BYTES // cache_bytes + 1))


def default_calls(rotate: int) -> int:
  return max(CALLS_PER_CACHE * rotate, MIN_CALLS)


def table_peak(device_kind: str) -> float | None:
  """HBM bytes/s of a known accelerator, or None."""
  kind = device_kind.lower()
  for pattern, peak in PEAK_BANDWIDTH:
    if re.search(pattern, kind):
      return peak
  return None


def measure_stream_read(repeats: int, nbytes: int) -> float:
  """Bytes/s of a jitted sum over a float32 array of `nbytes`: the best of
  the repeats (a peak, so the fastest run; on a shared machine the median
  moves with the neighbours' load)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  best = float('inf')
  for _ in range(max(repeats, STREAM_MIN_REPEATS)):
    t0 = time.perf_counter()
    jax.block_until_ready(total(x))
    best = min(best, time.perf_counter() - t0)
  return x.nbytes / best


def peak(opts: Options, device) -> tuple[float, str]:
  """(bytes/s, where it came from) for the fraction's denominator."""
  if opts.peak_gbs is not None:
    return opts.peak_gbs * GB, '--peak-gbs'
  if device.platform != 'cpu':
    found = table_peak(device.device_kind)
    if found is not None:
      return found, 'table'
  _log(f'measuring streaming read bandwidth ({STREAM_BYTES >> 20} MiB float32)')
  return measure_stream_read(opts.repeats, STREAM_BYTES), 'measured streaming read'


def target_fraction(device_kind: str, batch: int) -> float | None:
  """The issue's bandwidth target for this batch, on an H100 only."""
  if TARGET_DEVICE not in device_kind.lower():
    return None
  if batch >= TARGET_LARGE_BATCH:
    return TARGET_LARGE
  return TARGET_BATCH_1 if batch == 1 else None


def _kernel_issue(opts: Options, backend: str) -> str | None:
  return dispatch.unsupported(opts.q_heads, opts.kv_heads, opts.head_dim,
                              opts.params, backend)


def _backend(platform: str) -> str | None:
  """The kernel wrapper this platform compiles natively, best first; None on
  CPU."""
  natives = dispatch.native_backends(platform)
  return natives[0] if natives else None


def shipped_impls(opts: Options, platform: str) -> tuple[list[str], dict]:
  """(shipped baselines to time, {name: why not} for those left out)."""
  if opts.shipped not in SHIPPED:
    raise BenchError(f'--shipped must be one of {SHIPPED}, got {opts.shipped!r}')
  if opts.shipped == 'none':
    return [], {}
  here = 'gpu' if platform in ('gpu', 'cuda') else platform
  out, skipped = [], {}
  for name, why in shipped.available().items():
    base = shipped.BASELINES[name]
    if why:
      skipped[name] = why
    elif base.native == here:
      out.append(name)
    elif opts.shipped == 'all':
      out.append(name + CPU_FORM)
    else:
      skipped[name] = f'compiles for {base.native}, not {platform}'
  return out, skipped


def implementations(opts: Options, platform: str) -> tuple[list[str], str | None]:
  """(implementations to time, why 'auto' left the native kernel out)."""
  if opts.impl not in IMPLS:
    raise BenchError(f'--impl must be one of {IMPLS}, got {opts.impl!r}')
  backend = _backend(platform)
  why_not_native = _kernel_issue(opts, backend) if backend else None
  native = None if why_not_native else backend
  wanted = {'auto': [native], 'xla': [], 'pallas': [backend or 'interpret'],
            'interpret': ['interpret'], 'all': [backend, 'interpret']}[opts.impl]
  kernels = [k for k in wanted if k]
  for impl in kernels:
    why = _kernel_issue(opts, 'triton' if impl == 'interpret' else impl)
    if why:
      raise BenchError(f'the kernel cannot run these sizes: {why}; change '
                       '--q-heads/--kv-heads/--head-dim/--block-k/--splits, or '
                       'use --impl xla')
  pure = [] if opts.impl == 'pallas' else ['xla']
  return pure + kernels, why_not_native if opts.impl == 'auto' else None


def check(opts: Options) -> None:
  """Sizes and flags, each error naming the fix."""
  if not opts.batch or min(opts.batch) < 1:
    raise BenchError(f'--batch wants positive sizes (e.g. 1,8), got {opts.batch}')
  for flag, n in (('--seq', opts.seq), ('--q-heads', opts.q_heads),
                  ('--kv-heads', opts.kv_heads), ('--head-dim', opts.head_dim),
                  ('--repeats', opts.repeats)):
    if n < 1:
      raise BenchError(f'{flag} must be >= 1, got {n}')
  if opts.dtype not in DTYPES:
    raise BenchError(f'--dtype must be one of {DTYPES}, got {opts.dtype!r}')
  if opts.q_heads % opts.kv_heads:
    raise BenchError(f'--q-heads {opts.q_heads} must be a multiple of '
                     f'--kv-heads {opts.kv_heads}')
  if not 0 <= opts.length <= opts.seq:
    raise BenchError(f'--length {opts.length} must be in [1, --seq {opts.seq}] '
                     '(or 0 for all slots)')
  if opts.rotate < 0 or opts.calls < 0:
    raise BenchError('--rotate and --calls must be >= 0 (0 picks the default)')
  p = opts.params
  if p.block_k < 1 or p.num_splits < 1:
    raise BenchError('--block-k and --splits must be >= 1')
  if opts.seq % p.granule:
    raise BenchError(
        f'--seq {opts.seq} is not a multiple of block_k*num_splits = '
        f'{p.block_k}*{p.num_splits} = {p.granule}; use --seq '
        f'{kernel.cache_length(opts.seq, p)} or change --block-k/--splits')
  if opts.peak_gbs is not None and opts.peak_gbs <= 0:
    raise BenchError(f'--peak-gbs must be > 0, got {opts.peak_gbs}')


@jax.jit
def _random_kv(key, template):
  kk, kv = jax.random.split(key)
  draw = lambda k: jax.random.uniform(k, template.shape, template.dtype, -1, 1)
  return draw(kk), draw(kv)


def _caches(shape, dtype, rotate: int) -> list[jax.Array]:
  """[k0, v0, k1, v1, ...]: `rotate` distinct caches, separate buffers."""
  template = jax.ShapeDtypeStruct(shape, dtype)
  flat = []
  for i in range(rotate):
    flat.extend(_random_kv(jax.random.key(i + 1), template))
  return flat


def _native(impls: list[str]) -> list[str]:
  """The compiled kernels among `impls` (not XLA, not the interpreter)."""
  return [i for i in impls if i in kernel.BACKENDS]


def attend_fn(impl: str, params: kernel.KernelParams):
  """attend(q, k, v, lengths) through `impl` (dispatch.attend_decode)."""
  def run(q, k, v, lengths):
    return dispatch.attend_decode(q, k, v, lengths, None, impl=impl,
                                  params=params)
  return run


def many_calls(attend, rotate: int, calls: int):
  """One executable: `calls` chained calls over the rotated caches."""
  def many(q, lengths, *flat):
    acc = jnp.zeros(q.shape, jnp.float32)
    for c in range(calls):
      i = c % rotate
      out = attend(q, flat[2 * i], flat[2 * i + 1], lengths).astype(jnp.float32)
      acc = acc + out
      # The dependence keeps XLA from merging or CSE-ing calls on one cache.
      q = (q.astype(jnp.float32) + CHAIN_SCALE * out).astype(q.dtype)
    return acc
  return jax.jit(many)


def _shipped_attend(impl: str, flat: list) -> tuple:
  """(attend, caches in its layout) for a shipped baseline."""
  name = impl.removesuffix(CPU_FORM)
  prepare, call = shipped.attend(name, native=not impl.endswith(CPU_FORM))
  converted = []
  for i in range(0, len(flat), 2):
    converted.extend(prepare(flat[i], flat[i + 1]))
  return (lambda q, k, v, lengths: call(q, (k, v), lengths)), converted


def _impl_attend(impl, params, flat):
  if impl.removesuffix(CPU_FORM) in shipped.BASELINES:
    return _shipped_attend(impl, flat)
  return attend_fn(impl, params), flat


def _time_impl(impl, params, q, lengths, flat, rotate, calls, repeats) -> float:
  """Seconds per call (median executable time / calls)."""
  attend, flat = _impl_attend(impl, params, flat)
  fn = many_calls(attend, rotate, calls)
  return measure.median_time(lambda: fn(q, lengths, *flat), repeats) / calls


def max_error(impl, params, q, lengths, flat, ref) -> float:
  """Largest |impl - ref| on the first cache, in float32 (`ref`: the XLA
  reference on that cache, computed once per case)."""
  attend, conv = _impl_attend(impl, params, flat[:2])
  out = jax.jit(attend)(q, conv[0], conv[1], lengths).astype(jnp.float32)
  return float(jnp.max(jnp.abs(out - ref)))


def _what(impl: str) -> str:
  name = impl.removesuffix(CPU_FORM)
  if name in shipped.BASELINES:
    base = shipped.BASELINES[name]
    if impl.endswith(CPU_FORM):
      return (f'{base.what}, as {base.cpu_form} on CPU: not its speed')
    return base.what
  return _WHAT[impl]


def _figures(seconds: float, nbytes: int, peak_bps: float) -> dict:
  return {'seconds_per_call': seconds, 'us_per_call': seconds * 1e6,
          'gb_per_s': nbytes / seconds / GB,
          'fraction_of_peak': nbytes / seconds / peak_bps}


def _sweep(opts, native, q, lengths, flat, rotate, calls, nbytes, peak_bps):
  """The kernel at each valid (block_k, splits); list and best."""
  rows = []
  for bk in SWEEP_BLOCK_K:
    for ns in SWEEP_SPLITS:
      params = dataclasses.replace(opts.params, block_k=bk, num_splits=ns)
      if opts.seq % params.granule or dispatch.unsupported(
          opts.q_heads, opts.kv_heads, opts.head_dim, params, native):
        continue
      _log(f'  sweep {native} block_k={bk} splits={ns}')
      t = _time_impl(native, params, q, lengths, flat, rotate, calls,
                     opts.repeats)
      rows.append({'block_k': bk, 'num_splits': ns,
                   **_figures(t, nbytes, peak_bps)})
  if not rows:
    raise BenchError(f'no sweep point divides --seq {opts.seq}; use a multiple '
                     f'of {max(SWEEP_BLOCK_K) * max(SWEEP_SPLITS)}')
  return rows, min(rows, key=lambda r: r['seconds_per_call'])


def run_case(opts: Options, batch: int, impls: list[str], peak_bps: float,
             device_kind: str) -> dict:
  """Every implementation on one batch size, over the same caches."""
  dtype = jnp.dtype(opts.dtype)
  shape = (batch, opts.kv_heads, opts.seq, opts.head_dim)
  cache_bytes = kv_bytes(batch, opts.kv_heads, opts.seq, opts.head_dim,
                         dtype.itemsize)
  rotate = opts.rotate or default_rotate(cache_bytes)
  calls = opts.calls or default_calls(rotate)
  nbytes = kv_bytes(batch, opts.kv_heads, opts.attended, opts.head_dim,
                    dtype.itemsize)
  _log(f'B={batch} S={opts.seq}: {rotate} cache(s) of {cache_bytes / 1e6:.1f} '
       f'MB, {calls} calls per executable, {impls}')
  flat = _caches(shape, dtype, rotate)
  q = jax.random.normal(jax.random.key(0), (batch, opts.q_heads, opts.head_dim),
                        dtype)
  lengths = jnp.full((batch,), opts.attended, jnp.int32)
  ref = jax.jit(attend_fn('xla', opts.params))(q, flat[0], flat[1],
                                               lengths).astype(jnp.float32)
  case = {'batch': batch, 'seq': opts.seq, 'length': opts.attended,
          'kv_bytes_per_call': nbytes, 'rotate': rotate, 'calls': calls,
          'rotated_cache_bytes': rotate * cache_bytes, 'results': {}}
  if rotate * cache_bytes <= COLD_TOTAL_BYTES:
    case['cache_note'] = ('hot cache: the rotated caches may sit in L2, so the '
                          'fraction can exceed 1')
  for impl in impls:
    _log(f'  {impl}')
    t = _time_impl(impl, opts.params, q, lengths, flat, rotate, calls,
                   opts.repeats)
    case['results'][impl] = {
        'what': _what(impl), **_figures(t, nbytes, peak_bps),
        'max_abs_err_vs_xla': max_error(impl, opts.params, q, lengths, flat,
                                        ref)}
  native = _native(impls)
  if native and 'xla' in impls:
    xla_t = case['results']['xla']['seconds_per_call']
    case['speedup_over_xla'] = xla_t / case['results'][native[0]]['seconds_per_call']
  if opts.sweep:
    rows, best = _sweep(opts, native[0], q, lengths, flat, rotate, calls,
                        nbytes, peak_bps)
    case['sweep'], case['sweep_best'] = rows, best
    if 'xla' in impls:
      case['speedup_over_xla_sweep_best'] = (
          case['results']['xla']['seconds_per_call'] / best['seconds_per_call'])
  target = target_fraction(device_kind, batch)
  if target is not None:
    case['target_fraction'] = target
    if native:
      case['meets_target'] = (
          case['results'][native[0]]['fraction_of_peak'] >= target)
  return case


def run(opts: Options = Options()) -> dict:
  """The benchmark on the default device; one JSON-able dict."""
  load_start = runtime.load_now()
  check(opts)
  device = jax.devices()[0]
  impls, skipped = implementations(opts, device.platform)
  baselines, shipped_skipped = shipped_impls(opts, device.platform)
  impls = impls + baselines
  native = _native(impls)
  if opts.sweep and not native:
    raise BenchError('--sweep times the native kernel, which needs a GPU or '
                     "TPU (the interpreter's timings say nothing about block "
                     'sizes); drop --sweep, or use --impl auto/pallas/all there')
  peak_bps, source = peak(opts, device)
  p = opts.params
  out = {
      'benchmark': (f'decode attention, one query token per sequence against '
                    f'a [B, {opts.kv_heads}, {opts.seq}, {opts.head_dim}] '
                    f'{opts.dtype} KV cache ({opts.q_heads} query heads), all '
                    f'slots valid up to length {opts.attended}; time per call = '
                    f'median of {opts.repeats} executables of chained calls '
                    'over rotated caches / calls; bandwidth = KV bytes read '
                    'per call / time, against the peak'),
      'q_heads': opts.q_heads, 'kv_heads': opts.kv_heads,
      'head_dim': opts.head_dim, 'dtype': opts.dtype, 'impl': opts.impl,
      'implementations': impls,
      'kernel_params': dataclasses.asdict(p),
      'peak_bytes_per_s': peak_bps, 'peak_gb_per_s': peak_bps / GB,
      'peak_source': source,
  }
  if skipped:
    out['kernel_not_run'] = skipped
  if shipped_skipped:
    out['shipped_not_run'] = shipped_skipped
  if TARGET_DEVICE in device.device_kind.lower():
    out['target'] = (f'H100 issue targets: >= {TARGET_BATCH_1:.0%} of HBM '
                     f'bandwidth at B=1, >= {TARGET_LARGE:.0%} at B >= '
                     f'{TARGET_LARGE_BATCH} (S=8192, 8 KV heads, D=128)')
  out['cases'] = [run_case(opts, b, impls, peak_bps, device.device_kind)
                  for b in opts.batch]
  out['machine'] = machine.describe(load_start)
  return out
