"""`musicjax bench lm-*`: decode speed, train throughput/MFU, paper-scale memory estimate.

Each returns one JSON-able dict with the figure, the machine, and the
comparison measured in the same run (the GEMM peak for MFU: the best of a
jitted jnp matmul, numpy and torch on the same shapes, so MFU is against the
fastest GEMM this machine ran, not only XLA's). Random weights
and synthetic tokens: the speed of a model does not depend on what it learned.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax import runtime
from musicjax.bench import machine
from musicjax.bench import measure
from musicjax.errors import UserError
from musicjax.kernels import dispatch
from musicjax.lm import generate as gen
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import musicgen_song
from musicjax.lm import sequence
from musicjax.lm import task as task_lib
from musicjax.nn import lora
from musicjax.nn import transformer
from musicjax.parallel import rules
from musicjax.train import trainer

# The LM issue's targets on the 2-core CPU (bench_tiny).
DECODE_TARGET_CFG = 180.0        # frames/s, batch 1, CFG on
DECODE_TARGET_NOCFG = 240.0
TRAIN_TARGET_TOKENS = 6500.0     # audio tokens/s at batch 4 x 250 frames
TRAIN_TARGET_MFU = 0.5
PROMPT_TOKENS = 64
# Frames generated per decode case (the context length at the end of a case):
# 200 is docs/figures.md's figure; 1000 shows how flat the per-frame time stays as
# the context grows (4000 on request: ~1 min per case on 2 cores).
DECODE_FRAMES = (200, 1000)


def _model(config):
  with nnx.use_eager_sharding(False):
    return task_lib.LMState(config, nnx.Rngs(config.train.seed)).model


def _prompt(config, rows: int, rng: np.random.Generator) -> dict:
  m = config.model
  if m.text_encoder:   # MusicGen: the text is the cross-attention context
    ids = rng.integers(0, m.t5.vocab_size, (1, PROMPT_TOKENS))
    p = musicgen_song.prompt(m, ids, cfg=rows == 2)
    return {k: jnp.asarray(v) for k, v in p.items()}
  ids = list(rng.integers(0, m.text_vocab_size, PROMPT_TOKENS - 1)) + [
      layout.extra_id(m.text_vocab_size, '<audio>')]
  ex = sequence.assemble([sequence.TextPart(ids)], PROMPT_TOKENS,
                         m.num_codebooks, m.codebook_size)
  return {k: jnp.asarray(np.stack([v] * rows)) for k, v in ex.items()}


def decode(config, repeats: int = 3, frames=DECODE_FRAMES,
           breakdown_iters: int = 200) -> dict:
  """Frames/s of whole-song generation at batch 1, CFG on and off, for each
  song length in `frames` (out['lengths'], one entry each; the top-level
  figures are the first length's)."""
  load_start = runtime.load_now()
  frames = tuple(int(f) for f in frames)
  if not frames or min(frames) < 1:
    raise UserError(f'--frames wants positive frame counts (e.g. 200,1000), '
                    f'got {frames}')
  model = _model(config)
  rng = np.random.default_rng(0)
  s = config.sample
  out = {'benchmark': f'lm decode, batch 1, {PROMPT_TOKENS}-token prompt, '
                      f'{",".join(map(str, frames))} frames, median of '
                      f'{repeats} after a warm-up',
         'frames': frames[0], 'top_k': s.top_k, 'head_dtype': s.head_dtype,
         'lengths': []}
  for n in frames:
    case = {'frames': n}
    for name, scale in (('cfg', s.cfg_scale if s.cfg_scale != 1 else 1.5),
                        ('nocfg', 1.0)):
      rows = 2 if scale != 1 else 1
      sampling = gen.sampling_from_config(s, cfg_scale=scale,
                                          max_frames=n, min_frames=n,
                                          **gen.model_classes(config.model))
      fn = gen.make_generate_fn(model, sampling, num_cond=1)
      prompt = _prompt(config, rows, rng)
      t = measure.median_time(lambda: fn(prompt, jax.random.key(0))['codes'], repeats)
      case[f'frames_per_s_{name}'] = n / t
      case[f'ms_per_frame_{name}'] = 1e3 * t / n
    out['lengths'].append(case)
  out.update({k: v for k, v in out['lengths'][0].items() if k != 'frames'})
  if config.model.variant == 'global_local':   # the parts of a frame
    out.update(breakdown(config, model, iters=breakdown_iters,
                         frames=frames[0]))
  bb = model.backbone
  out['attention'] = dispatch.resolve(
      s.attention, bb.num_heads, bb.num_kv_heads, bb.head_dim,
      gen.sampling_from_config(s).kernel_params())
  out['target_frames_per_s_cfg'] = DECODE_TARGET_CFG
  out['target_frames_per_s_nocfg'] = DECODE_TARGET_NOCFG
  out['machine'] = machine.describe(load_start)
  return out


def breakdown(config, model, iters: int = 200,
              frames: int = DECODE_FRAMES[0]) -> dict:
  """Where a CFG frame's time goes, with the decode loop's own pieces
  (`DecodeView`): each part runs `iters` times in one compiled loop whose
  input depends on the previous output, so nothing is hoisted and dispatch is
  amortised as in the real loop."""
  m, s = config.model, config.sample
  b, cache_len = 2, PROMPT_TOKENS + frames
  k, v = m.num_codebooks, m.codebook_size
  sampling = gen.Sampling(top_k=s.top_k)
  head_dtype = jnp.dtype(s.head_dtype)
  gdef, params = nnx.split(model)

  def loop(body, init):
    def run(p):
      dv = model_lib.DecodeView(nnx.merge(gdef, p), head_dtype)
      return jax.lax.fori_loop(0, iters, lambda i, c: body(dv, i, c), init)
    return jax.jit(run)

  h0 = jnp.zeros((b, m.backbone.dim))
  kv = jnp.ones((b, cache_len), bool)

  def global_step(dv, i, carry):
    cache, x = carry
    idx = i % cache_len
    y, cache = dv.backbone_step(x[:, None], jnp.full((b, 1), idx),
                                transformer.cache_mask(kv, idx, 1), cache, idx)
    return cache, y[:, 0]

  def local_steps(dv, i, x):
    lc = dv.model.local.init_cache(b, k, per_layer=True)
    lv = jnp.ones((b, k), bool)
    y = jnp.stack([dv.local_in_hidden(x), dv.local_in_hidden(x)], 1)
    y, lc = dv.local_step(y, jnp.broadcast_to(jnp.arange(2), (b, 2)),
                          transformer.cache_mask(lv, 0, 2), lc, 0)
    for j in range(2, k):
      y, lc = dv.local_step(y[:, -1:], jnp.full((b, 1), j),
                            transformer.cache_mask(lv, j, 1), lc, j)
    return x + 1e-6 * y[:, -1, :x.shape[-1]]

  def heads(dv, i, x):
    acc = dv.global_logits(x)[:, :x.shape[-1]]
    for j in range(1, k):
      acc = acc + dv.local_logits(x, j)[:, :x.shape[-1]]
    return x + 1e-6 * acc

  def sample(dv, i, x):
    logits = jnp.tile(x[:1], (1, v // x.shape[-1] + 1))[:, :v]
    tot = 0.0
    for j in range(k):
      tot = tot + gen.sample_tokens(logits + j, jax.random.fold_in(
          jax.random.key(0), i * k + j), sampling)
    return x + 1e-6 * tot

  parts = {
      'global_step': loop(global_step, (model.backbone.init_cache(
          b, cache_len, per_layer=True), h0)),
      'local_steps': loop(local_steps, h0 + 0.1),
      'output_heads': loop(heads, h0 + 0.1),
      'sampling_topk': loop(sample, h0 + 0.1),
  }
  out = {}
  for name, fn in parts.items():
    t = measure.median_time(lambda: fn(params), 3)
    out[f'breakdown_ms_per_frame_{name}'] = 1e3 * t / iters
  return out


def train_flops(config) -> dict[str, float]:
  """Model FLOPs of training (forward + backward = 3x forward), MaxText's way:
  matmul FLOPs of the weights plus attention, causal attention at half.

  'global_per_slot': the global transformer and codebook-0 head, which run on
  every slot (condition text included); 'local_per_frame': the local
  transformer (K positions), its input projection and the K-1 heads, which run
  on real frames only. 'per_frame' is their sum (the cost of one trained frame).
  """
  m = config.model
  k, v = m.num_codebooks, m.codebook_size

  def block_params(t):
    e, hd = t.dim, transformer.head_dim(t)
    return (e * hd * (t.num_heads * 2 + t.num_kv_heads * 2)
            + 3 * e * t.mlp_dim) * t.num_layers

  def attn_flops(t, length):
    return 2 * 2 * t.num_layers * t.num_heads * transformer.head_dim(t) * length / 2

  s = layout.seq_len(config)
  glob = 2 * block_params(m.backbone) + attn_flops(m.backbone, s)
  local = 0.0
  if m.variant == 'global_local':
    glob += 2 * m.backbone.dim * (v + 1)                      # codebook-0 head
    local += k * (2 * block_params(m.local) + attn_flops(m.local, k))
    local += k * 2 * m.backbone.dim * m.local.dim              # local projection
    local += (k - 1) * 2 * m.local.dim * v                     # local heads
  else:
    glob += k * 2 * m.backbone.dim * (v + 1)
  return {'global_per_slot': 3.0 * glob, 'local_per_frame': 3.0 * local,
          'per_frame': 3.0 * (glob + local)}


def train(config, repeats: int = 5) -> dict:
  """Train-step throughput on synthetic tokens, and MFU against the GEMM peak
  (the best of jax, numpy and torch, measured in the same run)."""
  load_start = runtime.load_now()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.kind = 'synthetic'
  s = trainer.setup(config)
  with jax.set_mesh(s.mesh), rules.use_rules(s.rules):
    state = trainer.init_state(s)
    step = trainer.make_train_step(s)
    spec = s.task.batch_spec(config.data.batch_size)
    local = next(iter(s.task.dataset('train', 0, 1)))
    batch = trainer.global_batch(local, spec, s.batch_shardings)
    box = [state]

    def one():
      box[0], m, _ = step(box[0], batch, np.int32(1))
      return m['loss']

    t = measure.median_time(one, repeats)
  frames = config.data.batch_size * config.data.max_frames
  tokens = frames * config.model.num_codebooks
  fl = train_flops(config)
  # The global transformer runs on every slot of the sequence (condition text
  # and padding too); the local one on the real frames only.
  slots = config.data.batch_size * layout.seq_len(config)
  done = fl['global_per_slot'] * slots + fl['local_per_frame'] * frames
  gemm = machine.gemm_peak()
  peak = gemm['best']
  return {
      'benchmark': f'lm train step, batch {config.data.batch_size} x '
                   f'{config.data.max_frames} frames, median of {repeats}',
      'step_seconds': t, 'tokens_per_s': tokens / t, 'frames_per_s': frames / t,
      'flops_per_frame': fl['per_frame'], 'slots_per_step': slots,
      'model_flops_per_step': done, 'model_flops_per_s': done / t,
      'gemm_peak_flops_per_s': peak, 'gemm_peak_library': gemm['best_library'],
      'gemm_flops_per_s_by_library': gemm['flops_per_s'],
      'gemm_size': gemm['size'], 'mfu': done / t / peak,
      # Counting trained frames only (condition slots are free): a lower bound.
      'mfu_frames_only': fl['per_frame'] * frames / t / peak,
      'target_tokens_per_s': TRAIN_TARGET_TOKENS, 'target_mfu': TRAIN_TARGET_MFU,
      'machine': machine.describe(load_start),
  }


def memory(config, devices: int, param_dtype: str | None = None) -> dict:
  """Per-device memory of the train state (parameters + AdamW moments, by the
  sharding rules) and of the gradients, for `config.mesh` on `devices`.

  A LoRA run (config.lora.rank > 0) trains its adapters only: its gradients
  and moments are theirs, and its base may be int8/int4 (musicjax/nn/lora.py).
  `param_dtype` bfloat16: float32 weights and moments stored in bfloat16.
  """
  if devices < 1:
    raise UserError('lm-memory needs --devices N (devices of the target topology)')
  mc = config.mesh
  fsdp, tensor = mc.fsdp, mc.tensor
  data = mc.data if mc.data != -1 else devices // (fsdp * tensor)
  if data * fsdp * tensor != devices:
    raise UserError(f'config.mesh data x fsdp x tensor = {data} x {fsdp} x '
                    f'{tensor} does not make {devices} devices')
  task = task_lib.LMTask(config)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: task.create_state(nnx.Rngs(0)))
  _, state = nnx.split(abstract)

  class _Mesh:
    shape = {'data': data, 'fsdp': fsdp, 'tensor': tensor}

  rl = rules.normalize_rules(config.sharding.rules)
  per_device = 0
  total_params = 0
  for path, var in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    val = var.get_value()
    names = rules.logical_names(var)
    spec = rules.logical_to_spec(names, val.shape, _Mesh, rl)
    split = 1
    for entry in spec:
      for a in (entry if isinstance(entry, tuple) else (entry,)):
        if a:
          split *= _Mesh.shape[a]
    # Bits, not itemsize: an int4 base packs two values in a byte.
    dtype = (jnp.dtype(param_dtype) if param_dtype and val.dtype == jnp.float32
             else val.dtype)
    per_device += val.size * jax.dtypes.itemsize_bits(dtype) / 8 / split
    # The model's weights: float, or a quantized base's integers (not its
    # scales), adapters included.
    name = str(getattr(path[-1], 'key', path[-1]))
    weight = isinstance(var, nnx.Param) or (
        isinstance(var, lora.Quantized) and not name.endswith('_scale'))
    if 'opt' not in str(path[0]) and weight:
      total_params += val.size
  trained = [v.get_value().size for v in jax.tree.leaves(
      nnx.state(abstract.model, task_lib.trainable(config)),
      is_leaf=lambda x: isinstance(x, nnx.Variable))]
  grads = sum(trained) * (2 if param_dtype == 'bfloat16' else 4) / (fsdp * tensor)
  gib = 2 ** 30
  # Activations depend on XLA's fusion and remat decisions: the compiled
  # figure ('aot', when the devices are present) is the one to trust.
  return {
      'benchmark': 'lm training memory per device',
      'devices': devices, 'mesh': {'data': data, 'fsdp': fsdp, 'tensor': tensor},
      'params': int(total_params), 'trained_params': int(sum(trained)),
      'lora': _lora_summary(config),
      'state_gib': per_device / gib, 'grads_gib': grads / gib,
  }


def _lora_summary(config) -> dict | str:
  if not lora.enabled(config):
    return 'off (full fine-tuning)'
  lo = config.lora
  return {'rank': int(lo.rank), 'targets': list(lo.targets), 'base': lo.base,
          **({'int4_group': int(lo.int4_group)} if lo.base == 'int4' else {})}


# init.workdir of a LoRA config compiled by the bench: setup() requires a base
# run, and a compile-only bench reads nothing from it.
_NO_BASE = '(bench lm-memory: compile only, no base loaded)'


def _abstract_state(s, param_dtype: str | None):
  """The train state as shape structs with their shardings; `param_dtype`
  bfloat16 stores every float32 leaf (weights and AdamW moments) in bfloat16,
  as a pure-bfloat16 run would."""
  cast = jnp.dtype(param_dtype) if param_dtype else None

  def one(v, sh):
    x = v.get_value()
    dtype = cast if cast is not None and x.dtype == jnp.float32 else x.dtype
    return v.replace(jax.ShapeDtypeStruct(
        x.shape, dtype, sharding=sh.get_value() if isinstance(sh, nnx.Variable)
        else sh))
  return jax.tree.map(one, s.abstract_state, s.state_shardings,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def compile_train_step(config, param_dtype: str | None = None) -> dict:
  """Lowers and compiles the train step for `config.mesh` on the devices
  present (no arrays are allocated: abstract inputs with their shardings).
  On CPU, `jax_num_cpu_devices` makes a topology of any size, so a TPU pod or
  GPU node layout is checked here: the sharding rules compose, the SPMD
  partitioner accepts the program, and XLA reports the memory per device:
  arguments (the state: weights + optimizer moments, and the batch),
  temporaries (activations, gradients, gathered weights) and outputs (the new
  state, donated: aliased to the arguments)."""
  t0 = time.perf_counter()
  if lora.enabled(config) and not config.init.workdir:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.init.workdir = _NO_BASE
  s = trainer.setup(config)
  step = trainer.make_train_step(s)
  spec = s.task.batch_spec(config.data.batch_size)
  state = _abstract_state(s, param_dtype)
  batch = {k: jax.ShapeDtypeStruct(sp.shape, sp.dtype, sharding=s.batch_shardings[k])
           for k, sp in spec.items()}
  with jax.set_mesh(s.mesh), rules.use_rules(s.rules):
    lowered = step.lower(state, batch, jax.ShapeDtypeStruct((), jnp.int32))
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
  mem = compiled.memory_analysis()
  gib = 2 ** 30
  out = {'lower_seconds': t_lower, 'compile_seconds': time.perf_counter() - t0,
         'devices': jax.device_count(), 'mesh': dict(s.mesh.shape),
         'param_dtype': param_dtype or 'float32',
         'batch': f'{config.data.batch_size} x {layout.seq_len(config)} slots '
                  f'({config.data.max_frames} frames)'}
  if mem is not None:
    sizes = {'argument': mem.argument_size_in_bytes,
             'output': mem.output_size_in_bytes,
             'alias': mem.alias_size_in_bytes,
             'temp': mem.temp_size_in_bytes}
    out.update({f'compiled_{k}_bytes': int(v) for k, v in sizes.items()})
    out.update(compiled_argument_gib=sizes['argument'] / gib,
               compiled_temp_gib=sizes['temp'] / gib)
    # The donated state's outputs reuse its arguments' buffers.
    out['compiled_total_bytes'] = int(sizes['argument'] + sizes['temp'] +
                                      sizes['output'] - sizes['alias'])
  return out


def run(what: str, config, repeats: int = 3, devices: int = 0,
        frames=None, param_dtype: str | None = None) -> dict:
  if what == 'lm-decode':
    return decode(config, repeats=repeats, frames=frames or DECODE_FRAMES)
  if what == 'lm-train':
    return train(config, repeats=repeats)
  if what == 'lm-memory':
    out = memory(config, devices, param_dtype)
    if jax.device_count() == devices:
      out['aot'] = compile_train_step(config, param_dtype)
      if 'compiled_total_bytes' in out['aot']:
        out['aot']['total_gib'] = out['aot']['compiled_total_bytes'] / 2 ** 30
    else:
      out['aot'] = (f'skipped: {jax.device_count()} devices present, the '
                    f'layout needs {devices}')
    return out
  raise ValueError(what)
