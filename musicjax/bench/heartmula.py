"""`musicjax bench heartmula-memory` and `heartcodec-decode`: the released
HeartMuLa + HeartCodec as a user runs them.

heartmula-memory lowers and compiles, with abstract inputs only (nothing is
allocated), the inference programs on one device: the LM's whole-song
generate (prompt prefill + decode loop, CFG batch 2) and HeartCodec's two
per-window programs (latent, waveform). XLA's memory_analysis() gives each
program's argument, output and temp bytes; the inference peak is the largest
program plus the parameters of the other model, which a user holds too.
Neither model has a parameter dtype key (both build float32 parameters, and
export/released loads them so): the programs are compiled on the floating
parameters cast to `param_dtype` at the jit boundary, as a bfloat16 load
would hold them (every weight is cast to its compute dtype where it is used).

heartcodec-decode times our HeartCodec detokenize at random init, as x real
time; the maintainers' peer timing script times heartlib's at the same
config.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax import runtime
from musicjax.bench import machine
from musicjax.bench import measure
from musicjax.codec.heartcodec import decoder as codec_lib
from musicjax.errors import UserError
from musicjax.lm import generate as gen
from musicjax.lm import heartmula_prompt
from musicjax.lm import model as model_lib

GIB = 2 ** 30
GB = 10 ** 9
# The goal: the 3B LM + HeartCodec under 10 GB for inference (users report
# 12-13 GB with heartlib). Read as decimal GB, the stricter reading.
INFERENCE_GOAL_GB = 10.0
# heartlib's example generates up to 240 s (max_audio_length_ms 240,000).
SONG_SECONDS = 240.0
# Prompt text: tags and lyrics tokens (BOS/EOS included); a full song's lyrics
# run to a few hundred Llama-3 tokens.
TAG_TOKENS = 32
LYRIC_TOKENS = 480
# heartlib's pipeline decodes one song at a time.
CODEC_BATCH = 1
# heartcodec-decode: two windows (a 29.76 s window, then one every 25.6 s),
# so the in-context prefix and the cross-fade are timed too.
DECODE_SECONDS = 50.0
# Random init and random codes (speed does not depend on the weights).
SEED = 0
# Parameter dtypes heartmula-memory compiles with; the first is the default.
PARAM_DTYPES = ('bfloat16', 'float32')
# HeartCodec's estimator matmuls in bfloat16 (heartlib's default is float32).
CODEC_COMPUTE_DTYPE = 'bfloat16'
# Measured: jaxlib 0.10's XLA:CPU has no bfloat16 matmul and converts the
# operands (whole weight stacks, hoisted out of loops) to float32, 3x the LM's
# temps of jaxlib 0.12's, which keeps them in bfloat16.
CPU_NOTE = (
    'compiled for CPU: an XLA:CPU without bfloat16 matmuls (jaxlib 0.10) '
    'converts bfloat16 weights to float32 copies, so its temps exceed a '
    'GPU/TPU compile; jaxlib 0.12 keeps them in bfloat16')


def _abstract(tree, dtype=None):
  """ShapeDtypeStructs of a tree of arrays; floating leaves in `dtype`
  (None: as they are)."""
  def one(x):
    dt = x.dtype
    if dtype is not None and jnp.issubdtype(dt, jnp.floating):
      dt = jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(x.shape, dt)
  return jax.tree.map(one, tree)


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _compiled(fn, params, *args) -> dict:
  """Lower and compile jitted `fn` on abstract `params` and `args`; XLA's
  memory figures, and the bytes of `args` (the inputs beside the parameters)."""
  t0 = time.perf_counter()
  lowered = fn.lower(params, *args)
  t_lower = time.perf_counter() - t0
  mem = lowered.compile().memory_analysis()
  out = {'lower_seconds': t_lower,
         'compile_seconds': time.perf_counter() - t0 - t_lower,
         'input_bytes': _nbytes(args)}
  if mem is None:   # a backend without the analysis
    return out
  sizes = {'argument': mem.argument_size_in_bytes,
           'output': mem.output_size_in_bytes,
           'temp': mem.temp_size_in_bytes,
           'alias': mem.alias_size_in_bytes}
  out.update({f'{k}_gib': v / GIB for k, v in sizes.items()})
  out['total_gib'] = (sizes['argument'] + sizes['output'] + sizes['temp']) / GIB
  return out


def lm_program(config, param_dtype: str, frames: int,
               prompt_tokens: tuple[int, int]) -> tuple[dict, int, int]:
  """The LM's generate compiled on abstract inputs: (figures, parameter
  bytes, parameter count)."""
  m = config.model
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: model_lib.AudioLM(m, nnx.Rngs(0)))
  gdef, state = nnx.split(abstract)
  params = _abstract(state, param_dtype)
  tags, lyrics = prompt_tokens
  s = config.sample
  cfg = s.cfg_scale != 1
  inputs = heartmula_prompt.build(m, [0] * tags, [0] * lyrics, cfg=cfg)
  slots = tags + 1 + lyrics + frames
  if slots > m.max_seq_len:
    raise UserError(f'{tags + 1 + lyrics} prompt slots + {frames} frames = '
                    f'{slots} > config.model.max_seq_len={m.max_seq_len}: '
                    'ask for a shorter song')
  sampling = gen.sampling_from_config(s, max_frames=frames,
                                      end_id=model_lib.end_id(m))
  sampling.validate()

  @jax.jit
  def run(p, prompt, rng, ref, ref_valid):
    return gen.generate(nnx.merge(gdef, p), prompt, rng=rng, sampling=sampling,
                        num_cond=1, ref_codes=ref, ref_valid=ref_valid)

  rng = jax.eval_shape(lambda: jax.random.key(0))
  figures = _compiled(run, params, _abstract(inputs['prompt']), rng,
                      _abstract(inputs['ref_embed']),
                      _abstract(inputs['ref_valid']))
  figures.update(batch=2 if cfg else 1, prompt_slots=tags + 1 + lyrics,
                 frames=frames)
  return figures, _nbytes(params), measure.param_count(abstract)


def codec_programs(c, param_dtype: str) -> tuple[dict, int, int]:
  """HeartCodec's per-window programs compiled on abstract inputs:
  ({'latent_window': ..., 'waveform': ...}, parameter bytes, count)."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
        lambda: codec_lib.HeartCodecDecoder(c, rngs=nnx.Rngs(0)))
  gdef, state = nnx.split(abstract)
  params = _abstract(state, param_dtype)
  f = c.flow
  frames = int(f.window_codes) * int(f.frames_per_code)
  ch = int(c.estimator.out_channels)
  codes = jax.ShapeDtypeStruct(
      (CODEC_BATCH, int(f.window_codes), int(c.codes.num_quantizers)),
      jnp.int32)
  latent = jax.ShapeDtypeStruct((CODEC_BATCH, frames, ch), jnp.float32)
  window = jax.jit(lambda p, *a: nnx.merge(gdef, p).latent_window(*a))
  waveform = jax.jit(lambda p, z: nnx.merge(gdef, p).waveform(z))
  args = (codes, latent, latent, jax.ShapeDtypeStruct((), jnp.int32))
  out = {'latent_window': _compiled(window, params, *args),
         # Fed the latent program's output, as detokenize does.
         'waveform': _compiled(waveform, params,
                               jax.eval_shape(window, params, *args))}
  return out, _nbytes(params), measure.param_count(abstract)


def _frames(codec_config, seconds: float) -> int:
  """Code frames of `seconds` of audio (LM frames: one per code frame)."""
  return max(1, int(round(seconds * float(codec_config.code_rate_hz))))


def memory(lm_config, codec_config, param_dtype: str = PARAM_DTYPES[0],
           seconds: float = SONG_SECONDS,
           prompt_tokens: tuple[int, int] = (TAG_TOKENS, LYRIC_TOKENS)) -> dict:
  """Compiled memory of the inference programs on one device (abstract
  inputs: nothing is allocated), and the inference peak with the parameters
  of both models resident."""
  load_start = runtime.load_now()
  if param_dtype not in PARAM_DTYPES:
    raise UserError(f'param dtype must be one of {PARAM_DTYPES}, got '
                    f'{param_dtype!r}')
  codec_config = codec_config.copy_and_resolve_references()
  codec_config.estimator.dtype = CODEC_COMPUTE_DTYPE
  frames = _frames(codec_config, seconds)
  lm_fig, lm_bytes, lm_count = lm_program(lm_config, param_dtype, frames,
                                          prompt_tokens)
  codec_figs, codec_bytes, codec_count = codec_programs(codec_config,
                                                        param_dtype)
  programs = {'lm_generate': lm_fig, **{f'codec_{k}': v
                                        for k, v in codec_figs.items()}}
  own = {'lm_generate': lm_bytes, 'codec_latent_window': codec_bytes,
         'codec_waveform': codec_bytes}
  resident = lm_bytes + codec_bytes
  both, alone = {}, {}
  for name, p in programs.items():
    if 'temp_gib' not in p:
      continue
    # What the program needs beside the parameters: its other inputs, its
    # output and its temps (jit drops the parameters a program never reads
    # from its arguments, so these come from our abstract inputs).
    work = p.pop('input_bytes') + p['output_gib'] * GIB + p['temp_gib'] * GIB
    p['working_gib'] = work / GIB
    both[name] = resident + work
    alone[name] = own[name] + work
  out = {
      'benchmark': 'HeartMuLa + HeartCodec inference memory, compiled on one '
                   f'{jax.devices()[0].platform} device with abstract inputs '
                   '(XLA memory_analysis); peak = parameters of both models '
                   '+ the largest program\'s inputs, output and temps',
      'param_dtype': param_dtype,
      'lm_compute_dtype': lm_config.model.backbone.dtype,
      'codec_compute_dtype': CODEC_COMPUTE_DTYPE,
      'song_seconds': frames / float(codec_config.code_rate_hz),
      'lm_params': lm_count, 'lm_params_gib': lm_bytes / GIB,
      'codec_params': codec_count, 'codec_params_gib': codec_bytes / GIB,
      'params_gib': resident / GIB, 'params_gb': resident / GB,
      'programs': programs,
      'goal_gb': INFERENCE_GOAL_GB,
  }
  if both:
    peak = max(both, key=both.get)
    out.update(peak_program=peak, peak_gib=both[peak] / GIB,
               peak_gb=both[peak] / GB,
               within_goal=both[peak] / GB <= INFERENCE_GOAL_GB,
               # heartlib's lazy_load: the LM is freed before the codec runs.
               peak_one_model_at_a_time_gb=max(alone.values()) / GB,
               within_goal_one_model_at_a_time=(
                   max(alone.values()) / GB <= INFERENCE_GOAL_GB))
  if jax.devices()[0].platform == 'cpu':
    out['backend_note'] = CPU_NOTE
  out['machine'] = machine.describe(load_start)
  return out


def decode(c, seconds: float = DECODE_SECONDS, repeats: int = 3,
           seed: int = SEED) -> dict:
  """x real time of HeartCodec's detokenize (windows, Euler loops, waveform,
  cross-fade) on `seconds` of random codes, batch 1, random init."""
  load_start = runtime.load_now()
  with nnx.use_eager_sharding(False):
    model = codec_lib.HeartCodecDecoder(c, rngs=nnx.Rngs(seed))
  n = _frames(c, seconds)
  q = c.codes
  codes = np.random.default_rng(seed).integers(
      0, int(q.codebook_size), (CODEC_BATCH, n, int(q.num_quantizers)))
  t = measure.times(lambda: model.detokenize(codes), repeats)
  med, best = statistics.median(t), min(t)
  dur = n / float(c.code_rate_hz)
  windows = model.window_count(n)
  return {
      'benchmark': 'HeartCodec detokenize, batch 1, random init, median (and '
                   f'best) of {repeats} after a warm-up; x real time = audio '
                   'seconds / wall seconds',
      'audio_seconds': dur, 'code_frames': n, 'windows': windows,
      'sample_rate': int(c.sample_rate), 'num_steps': int(c.flow.num_steps),
      'guidance_scale': float(c.flow.guidance_scale),
      'estimator_dtype': c.estimator.dtype,
      'params': measure.param_count(model),
      'seconds': med, 'seconds_best': best,
      'rtf': dur / med, 'rtf_best': dur / best,
      'seconds_per_window': med / windows,
      'machine': machine.describe(load_start),
  }


def run(what: str, config, codec_config=None, seconds: float | None = None,
        repeats: int = 3, param_dtype: str | None = None) -> dict:
  """A bench by its CLI name; None: that bench's default."""
  if what == 'heartmula-memory':
    return memory(config, codec_config,
                  param_dtype=param_dtype or PARAM_DTYPES[0],
                  seconds=SONG_SECONDS if seconds is None else seconds)
  if what == 'heartcodec-decode':
    return decode(config, repeats=repeats,
                  seconds=DECODE_SECONDS if seconds is None else seconds)
  raise ValueError(what)
