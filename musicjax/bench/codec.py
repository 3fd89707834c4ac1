"""`musicjax bench codec`: encode and decode speed of the codec, as x real time."""
from __future__ import annotations

import statistics

import jax
import numpy as np
from flax import nnx

from musicjax import runtime
from musicjax import tasks
from musicjax.bench import machine
from musicjax.bench import measure

# The target for the base codec on a 2-core CPU: encode + decode >= 100x real time.
CODEC_TARGET_RTF = 100.0


def run(config, seconds: float = 10.0, repeats: int = 5) -> dict:
  """Encode and decode speed of a randomly initialised codec, as x real time
  (audio seconds per wall second; the median and the best of the repeats, the
  best being how EnCodec's speed is reported beside it in docs/figures.md)."""
  load_start = runtime.load_now()
  task = tasks.get(config.task)(config)
  with nnx.use_eager_sharding(False):
    state = task.create_state(nnx.Rngs(config.train.seed))
  model = task.inference_model(state)
  graphdef, params = nnx.split(model)
  sr, ch = int(config.data.sample_rate), int(config.data.channels)
  n = int(round(seconds * sr)) // model.hop_length * model.hop_length
  audio = jax.random.uniform(jax.random.key(0), (1, n, ch), minval=-0.5, maxval=0.5)

  encode = jax.jit(lambda p, a: nnx.merge(graphdef, p).encode(a))
  decode = jax.jit(lambda p, c: nnx.merge(graphdef, p).decode(c))
  codes = encode(params, audio)
  enc = measure.times(lambda: encode(params, audio), repeats)
  dec = measure.times(lambda: decode(params, codes), repeats)
  t_enc, t_dec = statistics.median(enc), statistics.median(dec)
  b_enc, b_dec = min(enc), min(dec)
  dur = n / sr
  return {
      'benchmark': 'codec encode/decode, batch 1, jitted, median (and best) '
                   'of %d; x real time = audio seconds / wall seconds' % repeats,
      'audio_seconds': dur, 'sample_rate': sr,
      'frame_rate': float(model.frame_rate), 'codebooks': int(model.num_codebooks),
      'bitrate_kbps': float(model.num_codebooks * np.log2(model.codebook_size)
                            * model.frame_rate / 1000),
      'params': measure.param_count(model),
      'params_and_buffers': int(sum(x.size for x in jax.tree.leaves(params))),
      'encode_seconds': t_enc, 'decode_seconds': t_dec,
      'encode_rtf': dur / t_enc, 'decode_rtf': dur / t_dec,
      'encode_decode_rtf': dur / (t_enc + t_dec),
      'encode_rtf_best': dur / b_enc, 'decode_rtf_best': dur / b_dec,
      'encode_decode_rtf_best': dur / (b_enc + b_dec),
      'target_encode_decode_rtf': CODEC_TARGET_RTF,
      'machine': machine.describe(load_start),
  }
