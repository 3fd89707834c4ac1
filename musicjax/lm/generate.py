"""Whole-song generation in one compiled loop: prefill, then `lax.while_loop`.

Nothing returns to Python per frame: sampling, end-of-audio detection, section
changes (interleaved layout) and classifier-free guidance all happen on
device. The KV caches are static arrays [layers, batch, kv_heads, slots,
head_dim] sized for the call (prompt + the most slots the loop can write), so
a call with another batch size or CFG setting compiles its own loop.

Every loop iteration writes one slot for every row:
  * audio mode: sample the next frame from the last hidden state (codebook 0
    from the global transformer, then codebooks 1..K-1 from the local one,
    K-1 small steps with their own cache); END ends the section or the song;
  * text mode (interleaved): feed the next token of the next section's text
    (left-padded to a fixed length; pads are invalid slots that attention
    ignores and that do not advance the row's position).

CFG doubles the batch: rows [0, n) are conditional, rows [n, 2n) carry the
learned null conditions (or, with the prompt's 'uncond' [B], the model's
unconditional row); guided logits are u + scale * (c - u), and the sampled
token is written to both rows of a pair, so the pair stays in step.

A frame ends the song (or section) when any of its codes is >= the END id
(`Sampling.end_id`). With our heads that is codebook 0 == END (the local heads
have no END class); the released HeartMuLa's heads all sample over the special
rows too, and heartlib stops on any such code.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax.kernels import decode_attention as kernel_lib
from musicjax.kernels import dispatch
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import patterns
from musicjax.nn import transformer


BACKBONE_WEIGHTS = ('fused', 'stacked')


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0
  top_k: int = 50            # 0 = all
  top_p: float = 1.0         # nucleus within the top-k (1.0 = off)
  # True: every token tied with the last kept one stays (heartlib's
  # `logits < kth` cut); False: exactly k (ties to the lower id).
  top_k_keep_ties: bool = True
  cfg_scale: float = 1.0     # 1.0 = no guidance (no batch doubling)
  # END class (model.end_id(config.model)); -1: codebook_size, which only our
  # own head layout (codebook 0 = codes + END) may leave implicit.
  end_id: int = -1
  max_frames: int = 250
  min_frames: int = 0        # no class >= END before this many frames
  # > 0: classes in [codec_classes, END) are never sampled: ids the codec
  # cannot decode (the released HeartMuLa's special rows below END, which
  # heartlib would pass on to HeartCodec). 0 = off.
  codec_classes: int = 0
  stream_every: int = 0      # frames between streaming callbacks (0 = off)
  head_dtype: str = 'float32'  # output-head weights in the loop: float32 | bfloat16
  # Backbone weights in the loop: fused (per-layer copies, fewest matmuls) |
  # stacked (read in place: no second copy of the weights; XLA attention).
  backbone_weights: str = 'fused'
  # Global-transformer decode attention: auto | xla | pallas (kernels/dispatch.py)
  attention: str = 'auto'
  attention_block_k: int = 128   # Pallas kernel: keys per inner step
  attention_splits: int = 8      # Pallas kernel: KV splits per (row, KV head)

  def kernel_params(self) -> kernel_lib.KernelParams:
    return kernel_lib.KernelParams(block_k=self.attention_block_k,
                                   num_splits=self.attention_splits)

  def validate(self) -> None:
    dispatch.check_impl(self.attention)
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
    if self.max_frames < 1:
      raise ValueError(f'max_frames must be >= 1, got {self.max_frames}')
    if self.end_id < -1:
      raise ValueError(f'end_id must be -1 or a class id, got {self.end_id}')
    if self.codec_classes < 0:
      raise ValueError(f'codec_classes must be >= 0, got {self.codec_classes}')
    if self.backbone_weights not in BACKBONE_WEIGHTS:
      raise ValueError(f'backbone_weights must be one of {BACKBONE_WEIGHTS}, '
                       f'got {self.backbone_weights!r}')
    if self.backbone_weights == 'stacked' and self.attention not in ('auto',
                                                                     'xla'):
      raise ValueError("backbone_weights 'stacked' decodes with XLA attention:"
                       f" attention must be 'auto' or 'xla', got "
                       f'{self.attention!r}')
    if self.head_dtype not in ('float32', 'bfloat16'):
      raise ValueError("head_dtype must be 'float32' or 'bfloat16', got "
                       f'{self.head_dtype!r}')


def sampling_from_config(s, **overrides) -> Sampling:
  """`Sampling` from config.sample; keyword arguments override fields."""
  kw = dict(temperature=float(s.temperature), top_k=int(s.top_k),
            top_p=float(s.top_p), cfg_scale=float(s.cfg_scale),
            top_k_keep_ties=bool(s.top_k_keep_ties),
            head_dtype=s.head_dtype, attention=s.attention,
            backbone_weights=s.get('backbone_weights', 'fused'),
            attention_block_k=int(s.attention_block_k),
            attention_splits=int(s.attention_splits))
  kw.update(overrides)
  return Sampling(**kw)


def model_classes(m) -> dict[str, int]:
  """Sampling's class settings for config.model `m`: its END, and the codes
  a codec decodes (classes between the codebook and END are never drawn)."""
  return {'end_id': model_lib.end_id(m), 'codec_classes': int(m.codebook_size)}


def sample_tokens(logits: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
  """logits [..., V] -> token ids [...]: temperature, then top-k and top-p
  within it (heartlib's order).

  With `s.top_k_keep_ties` (the default) the kept set is every token whose
  logit is >= the smallest kept one, so tokens tied with the k-th all stay,
  as heartlib's `logits < topk(logits, k)[..., -1]` cut
  (`_draw_keeping_ties`). Otherwise exactly the k best stay (ties to the lower
  id). Either way the random draw runs over about k values, not the whole
  vocabulary (a full-vocabulary draw made a decode frame 5-25% slower).
  """
  if s.temperature == 0:
    return first_max(logits)
  logits = logits / s.temperature
  k = s.top_k if 0 < s.top_k < logits.shape[-1] else logits.shape[-1]
  if k < logits.shape[-1] or s.top_p < 1:
    vals, idx = jax.lax.top_k(logits, k)
    if s.top_p < 1:
      probs = jax.nn.softmax(vals, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs   # mass of better tokens
      vals = jnp.where(before < s.top_p, vals, -jnp.inf)
    if not s.top_k_keep_ties:
      choice = jax.random.categorical(rng, vals, axis=-1)
      return jnp.take_along_axis(idx, choice[..., None], -1)[..., 0].astype(
          jnp.int32)
    return _draw_keeping_ties(logits, vals, idx, rng)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def first_max(x: jax.Array) -> jax.Array:
  """argmax over the last axis (the first index of the maximum) as two plain
  reductions. XLA:CPU runs argmax's (value, index) reduction one element at
  a time: 35 us over 4 x 2048 logits against 2 us for max + min here, in a
  decode loop that samples every step."""
  m = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1)


def _draw_keeping_ties(logits, vals, idx, rng) -> jax.Array:
  """One draw from softmax over {v : logits[v] >= cut}, cut = the smallest
  kept (finite) top-k value. The tokens with logit == cut that the top-k
  values leave out (beyond k, or cut by top-p) all have the same logit, so
  they form one extra category of weight n * exp(cut); when it is drawn, one
  of them is picked uniformly. No draw over the whole vocabulary; n is two
  plain counts, and the vocabulary-wide search for the drawn tie runs only
  when some row drew one (rare: it needs exactly equal logits), as a
  scatter, a cumulative sum and a search over V cost ~90 us per step on
  XLA:CPU."""
  kept = jnp.isfinite(vals)
  cut = jnp.min(jnp.where(kept, vals, jnp.inf), axis=-1, keepdims=True)
  # Ties with the cut that the kept values do not hold (top-k values are
  # the logits themselves, so those are all ties less the kept ones).
  n = (jnp.sum(logits == cut, axis=-1, keepdims=True)
       - jnp.sum(kept & (vals == cut), axis=-1, keepdims=True))
  bucket = jnp.where(n > 0, cut + jnp.log(jnp.maximum(n, 1).astype(cut.dtype)),
                     -jnp.inf)
  r_choice, r_tie = jax.random.split(rng)
  choice = jax.random.categorical(
      r_choice, jnp.concatenate([vals, bucket], axis=-1), axis=-1)
  j = jnp.floor(jax.random.uniform(r_tie, n[..., 0].shape) * n[..., 0])
  drew_tie = choice == vals.shape[-1]

  def nth_outside_tie(_):
    # The (j+1)-th outside tie in vocabulary order.
    inside = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx,
                                kept & (vals == cut), axis=-1, inplace=False)
    rank = jnp.cumsum((logits == cut) & ~inside, axis=-1)
    return jnp.sum(rank <= j[..., None].astype(rank.dtype), axis=-1,
                   dtype=jnp.int32)

  tie = jax.lax.cond(jnp.any(drew_tie), nth_outside_tie,
                     lambda _: jnp.zeros(choice.shape, jnp.int32), None)
  top = jnp.take_along_axis(idx, jnp.minimum(choice, vals.shape[-1] - 1)[..., None],
                            -1)[..., 0]
  return jnp.where(drew_tie, tie, top).astype(jnp.int32)


def _end_of(model, sampling: Sampling) -> int:
  """The END id; an explicit one is required when the heads are wider than
  ours (config.model.audio_vocab_size), as END is then config, not layout."""
  v = model.codebook_size
  if sampling.end_id >= 0:
    return sampling.end_id
  if model.variant == 'global_local' and model.head0.shape[-1] != v + 1:
    raise ValueError(
        f'Sampling.end_id is needed: the codebook-0 head has '
        f'{model.head0.shape[-1]} classes, not codebook_size + 1 = {v + 1} '
        '(pass end_id=model.end_id(config.model) to sampling_from_config)')
  return layout.end_id(v)


def _no_end(logits: jax.Array, end: int, early: jax.Array) -> jax.Array:
  """Classes >= END removed from logits [n, W] in the rows `early` [n, 1]."""
  if logits.shape[-1] <= end:
    return logits
  return jnp.where(early & (jnp.arange(logits.shape[-1]) >= end), -jnp.inf,
                   logits)


def _no_specials(logits: jax.Array, lo: int, end: int) -> jax.Array:
  """Classes in [lo, end) of logits [n, W] removed (lo = 0: none)."""
  if not lo or lo >= min(end, logits.shape[-1]):
    return logits
  ids = jnp.arange(logits.shape[-1])
  return jnp.where((ids >= lo) & (ids < end), -jnp.inf, logits)


def _guide(logits: jax.Array, n: int, scale: float) -> jax.Array:
  if logits.shape[0] == n:
    return logits
  cond, uncond = logits[:n], logits[n:]
  return uncond + scale * (cond - uncond)


def _tile(x: jax.Array, rows: int) -> jax.Array:
  return jnp.concatenate([x] * (rows // x.shape[0]), axis=0)


def _with_first_melody(prompt_melody: jax.Array, melody: jax.Array) -> jax.Array:
  last = prompt_melody[:, -1]
  return prompt_melody.at[:, -1].set(jnp.where(last < 0, melody[:, 0], last))


def _stream(callback, frames, counts):
  if callback is not None:
    jax.experimental.io_callback(callback, None, frames, counts, ordered=True)


def _decode_view(model, sampling: Sampling,
                 after=None) -> model_lib.DecodeView:
  """The loop's view of `model`; with `after` (the prefill's output), its
  copies are made after the prefill (see DecodeView)."""
  bb = model.backbone
  impl = ('xla' if sampling.backbone_weights == 'stacked' else
          dispatch.resolve(sampling.attention, bb.num_heads, bb.num_kv_heads,
                           bb.head_dim, sampling.kernel_params()))
  return model_lib.DecodeView(model, jnp.dtype(sampling.head_dtype),
                              attention=impl, params=sampling.kernel_params(),
                              backbone_weights=sampling.backbone_weights,
                              after=after)


def _prefill_cache(model, dv, b: int, slots: int, prompt_valid: jax.Array):
  """Empty global cache and key validity for `slots` slots; with the Pallas
  kernel, rounded up to its block granule (the extra slots stay invalid)."""
  if dv.attention != 'xla':
    slots = kernel_lib.cache_length(slots, dv.params)
  p = prompt_valid.shape[1]
  key_valid = jnp.zeros((b, slots), bool).at[:, :p].set(prompt_valid)
  return model.backbone.init_cache(b, slots), key_valid


def generate(model, prompt: dict, *, rng: jax.Array, sampling: Sampling,
             num_cond: int, sections: jax.Array | None = None,
             melody: jax.Array | None = None,
             ref_codes: jax.Array | None = None, ref_valid: jax.Array | None = None,
             callback: Callable | None = None, teacher: jax.Array | None = None,
             record_logits: bool = False) -> dict:
  """Traceable generation (call under jit; see `make_generate_fn`).

  Args:
    model: an AudioLM.
    prompt: left-padded slot arrays text [B,P], audio [B,P,K], melody [B,P],
      positions [B,P], valid [B,P]. With CFG, B = 2 * num_cond (cond rows first).
      Optional 'uncond' [B]: the rows that read the model's unconditional
      embedding (config.model.uncond_embedding; HeartMuLa's CFG rows).
      With a text encoder (single_stream, MusicGen): 'context_tokens' [B, T]
      and 'context_valid' [B, T], guidance's unconditional rows all invalid;
      with model conditioning 'prefix' (MusicGen-Melody), optionally 'chroma'
      [B, F, chroma_bins] (guidance's unconditional rows: the null melody).
    rng: PRNG key.
    sampling: static sampling settings.
    num_cond: rows that are returned (B, or B/2 with CFG).
    sections: interleaved layout: text of the sections after the first,
      [B, NS, Ls], each left-padded with EMPTY and ending in '<audio>'.
    melody: [B, max_frames] melody ids of the frames to generate.
    ref_codes, ref_valid: reference segment [B,R,K] ('linear' reference: the
      given embedding [B, reference_dim]) and whether it is given.
    callback: streaming `callback(frames [n, F, K], counts [n])`, called every
      `sampling.stream_every` frames (of row 0).
    teacher: [B, T, K] frames (END frames included) consumed in order instead
      of sampling: the decode loop then reproduces a training sequence.
    record_logits: also return the (guided) logits of every loop step:
      'logits_global' [n, steps, W0] and 'logits_local' [n, steps, K-1, W]
      (the head widths: V+1 and V with our layout).

  Returns {'codes': [n, max_frames, K], 'num_frames': [n]}.
  """
  if model.variant == 'single_stream':
    return _generate_stream(model, prompt, rng=rng, sampling=sampling,
                            num_cond=num_cond, melody=melody, ref_codes=ref_codes,
                            ref_valid=ref_valid, callback=callback,
                            teacher=teacher, record_logits=record_logits)
  b, p = prompt['text'].shape
  k = model.num_codebooks
  nf = sampling.max_frames
  ns, ls = (0, 0) if sections is None else sections.shape[1:]
  steps = nf + ns * (ls + 1) + 1
  total = p + steps
  end = _end_of(model, sampling)
  w0, wl = model.head0.shape[-1], model.local_heads.shape[-1]
  if melody is None:
    melody = jnp.full((b, nf), layout.MELODY_NULL, jnp.int32)
  ref = None
  if ref_codes is not None:
    ref = model.reference_embedding(ref_codes)
  # Sizes the cache (its arrays go unused: the loop's view is made below).
  dv = _decode_view(model, sampling)

  # Prefill the prompt. Its last slot predicts frame 0: it carries that melody.
  cache, key_valid = _prefill_cache(model, dv, b, total, prompt['valid'])
  x = model.embed(prompt['text'], prompt['audio'],
                  _with_first_melody(prompt['melody'], melody), ref, ref_valid,
                  prompt.get('uncond'))
  mask = transformer.cache_mask(key_valid, 0, p)
  h, cache = model.backbone(x, prompt['positions'], mask, cache, 0)
  # The loop's weight copies, made after the prefill: its attention scores
  # over every slot (a few hundred MB at 3B) are gone by then.
  dv = _decode_view(model, sampling, after=h)
  cache = dv.loop_cache(cache)
  rope_pos = jnp.sum(prompt['valid'], axis=1).astype(jnp.int32)

  def local_frame(h_last, rng, forced, count):
    """Codebooks 0..K-1 of the next frame from the global hidden [B,E].

    `forced` [B,K] (teacher forcing) replaces the samples when given.
    Returns (codes [B,K], global logits [n,W0], local logits [n,K-1,W])."""
    r0, rl = jax.random.split(rng)
    g0 = _guide(dv.global_logits(h_last), num_cond, sampling.cfg_scale)
    g0 = _no_specials(g0, sampling.codec_classes, end)
    early = None
    if sampling.min_frames:
      early = (count[:num_cond] < sampling.min_frames)[:, None]
      g0 = _no_end(g0, end, early)
    c0 = _tile(sample_tokens(g0, r0, sampling), b)
    if forced is not None:
      c0 = forced[:, 0]
    codes, local_logits = [c0], []
    lcache = model.local.init_cache(b, k, per_layer=True)
    lvalid = jnp.ones((b, k), bool)
    # Position 0: the global hidden state; position 1: codebook 0's embedding.
    xin = jnp.stack([dv.local_in_hidden(h_last), dv.local_in_code(0, c0)], 1)
    pos = jnp.broadcast_to(jnp.arange(2), (b, 2))
    out, lcache = dv.local_step(xin, pos, transformer.cache_mask(lvalid, 0, 2),
                                lcache, 0)
    last = out[:, 1]
    for i in range(1, k):
      logits = _guide(dv.local_logits(last, i), num_cond, sampling.cfg_scale)
      logits = _no_specials(logits, sampling.codec_classes, end)
      if early is not None:
        logits = _no_end(logits, end, early)
      local_logits.append(logits)
      ci = _tile(sample_tokens(logits, jax.random.fold_in(rl, i), sampling), b)
      if forced is not None:
        ci = forced[:, i]
      codes.append(ci)
      if i + 1 < k:
        xin = dv.local_in_code(i, ci)[:, None]
        pos = jnp.full((b, 1), i + 1, jnp.int32)
        out, lcache = dv.local_step(xin, pos,
                                    transformer.cache_mask(lvalid, i + 1, 1),
                                    lcache, i + 1)
        last = out[:, 0]
    return jnp.stack(codes, axis=-1), g0, jnp.stack(local_logits, axis=1)

  rows = jnp.arange(b)
  state = dict(
      cache=cache, key_valid=key_valid, h=h[:, -1], rope=rope_pos,
      frames=jnp.zeros((b, nf, k), jnp.int32), count=jnp.zeros((b,), jnp.int32),
      done=jnp.zeros((b,), bool),
      text_mode=jnp.zeros((b,), bool), sec=jnp.zeros((b,), jnp.int32),
      ptr=jnp.zeros((b,), jnp.int32), tptr=jnp.zeros((b,), jnp.int32),
      step=jnp.int32(0))
  if record_logits:
    state['lg'] = jnp.zeros((num_cond, steps, w0), jnp.float32)
    state['ll'] = jnp.zeros((num_cond, steps, k - 1, wl), jnp.float32)

  def cond_fn(st):
    return (st['step'] < steps) & ~jnp.all(st['done'])

  def body(st):
    step = st['step']
    audio_mode = ~st['text_mode'] & ~st['done']
    forced = None
    if teacher is not None:
      forced = teacher[rows, jnp.minimum(st['tptr'], teacher.shape[1] - 1)]
    frame, g0, gl = local_frame(st['h'], jax.random.fold_in(rng, step), forced,
                                st['count'])
    is_end = jnp.any(frame >= end, axis=-1)
    emit = audio_mode & ~is_end
    count = st['count']
    frames = st['frames'].at[rows, jnp.minimum(count, nf - 1)].set(
        jnp.where(emit[:, None], frame, st['frames'][rows, jnp.minimum(count, nf - 1)]))
    count = count + emit
    # Section / song ends.
    ended = audio_mode & is_end
    more = st['sec'] < ns
    done = st['done'] | (ended & ~more) | (count >= nf)
    to_text = ended & more
    # Text mode: next token of the current section's text.
    if ns:
      sec_idx = jnp.minimum(st['sec'], ns - 1)
      tok = sections[rows, sec_idx, jnp.minimum(st['ptr'], ls - 1)]
    else:
      tok = jnp.full((b,), layout.EMPTY, jnp.int32)
    in_text = st['text_mode'] & ~st['done']
    ptr = jnp.where(in_text, st['ptr'] + 1, jnp.where(to_text, 0, st['ptr']))
    leave_text = in_text & (ptr >= ls)
    text_mode = (st['text_mode'] | to_text) & ~leave_text
    sec = st['sec'] + leave_text
    # The slot written now.
    audio_slot = jnp.where(emit[:, None], frame, layout.EMPTY)
    audio_slot = audio_slot.at[:, 0].set(
        jnp.where(ended, end, audio_slot[:, 0]))
    text_slot = jnp.where(in_text, tok, layout.EMPTY)
    slot_valid = (emit | ended | (in_text & (tok >= 0))) & ~st['done']
    # Melody of the frame the next slot predicts (if it predicts one).
    next_audio = ~text_mode & ~done
    mel = jnp.where(next_audio, melody[rows, jnp.minimum(count, nf - 1)],
                    layout.EMPTY)
    index = p + step
    key_valid = st['key_valid'].at[:, index].set(slot_valid)
    xin = dv.embed(text_slot[:, None], audio_slot[:, None], mel[:, None])
    hh, cache = dv.backbone_step(xin, st['rope'][:, None],
                                 transformer.cache_mask(key_valid, index, 1),
                                 st['cache'], index)
    if callback is not None and sampling.stream_every:
      tick = emit[0] & (count[0] % sampling.stream_every == 0)
      jax.lax.cond(tick, lambda: _stream(callback, frames[:num_cond],
                                         count[:num_cond]), lambda: None)
    new = dict(cache=cache, key_valid=key_valid, h=hh[:, 0],
               rope=st['rope'] + slot_valid, frames=frames, count=count,
               done=done, text_mode=text_mode, sec=sec, ptr=ptr,
               tptr=st['tptr'] + audio_mode, step=step + 1)
    if record_logits:
      new['lg'] = st['lg'].at[:, step].set(g0)
      new['ll'] = st['ll'].at[:, step].set(gl)
    return new

  st = jax.lax.while_loop(cond_fn, body, state)
  out = {'codes': st['frames'][:num_cond], 'num_frames': st['count'][:num_cond]}
  if record_logits:
    out.update(logits_global=st['lg'], logits_local=st['ll'])
  return out


def _generate_stream(model, prompt, *, rng, sampling, num_cond, melody,
                     ref_codes, ref_valid, callback, teacher, record_logits):
  """single_stream: one pattern step per iteration, all codebooks in parallel."""
  b, p = prompt['text'].shape
  k, v = model.num_codebooks, model.codebook_size
  nf = sampling.max_frames
  # One frame more for END; without an END class (MusicGen) every song runs
  # to max_frames, and the pattern's slots past it hold the empty id.
  end = layout.end_id(v) if model.end_token else None
  pat = patterns.make_pattern(model.pattern, k, nf + (end is not None))
  steps = pat.num_steps
  special = model.empty_id
  # Frames complete after steps 0..s (a static table indexed on device).
  complete = jnp.asarray([patterns.frames_for_steps(model.pattern, k, s + 1)
                          for s in range(steps)], jnp.int32)
  if melody is None:
    melody = jnp.full((b, nf), layout.MELODY_NULL, jnp.int32)
  melody = jnp.concatenate([melody, jnp.full((b, 1), layout.MELODY_NULL,
                                             jnp.int32)], axis=1)
  # Codebook-0 frame of each step; steps without one read the NULL at nf.
  frame_of = jnp.asarray(np.where(pat.valid[:, 0], pat.frame_index[:, 0], nf),
                         jnp.int32)
  ref = model.reference_embedding(ref_codes) if ref_codes is not None else None
  dv = _decode_view(model, sampling)
  x = model.embed(prompt['text'], prompt['audio'],
                  _with_first_melody(prompt['melody'], melody), ref, ref_valid)
  positions, valid = prompt['positions'], prompt['valid']
  ctx = None
  if 'context_tokens' in prompt:
    if model.conditioning == 'prefix':
      # MusicGen-Melody: chroma and text states first; the cache holds them.
      pre = model.prefix(prompt['context_tokens'], prompt['context_valid'],
                         prompt.get('chroma'))
      x, positions, valid = model_lib.join_prefix(pre, x, positions, valid)
      p = x.shape[1]
    else:
      ctx = model.context(prompt['context_tokens'], prompt['context_valid'])
      ctx = model.backbone.cross_context(ctx)   # once, not every step
  total = p + steps

  cache, key_valid = _prefill_cache(model, dv, b, total, valid)
  h, cache = model.backbone(x, positions,
                            transformer.cache_mask(key_valid, 0, p), cache, 0,
                            ctx)
  dv = _decode_view(model, sampling, after=h)   # as in generate()
  cache = dv.loop_cache(cache)
  ctx = dv.loop_context(ctx)
  rows = jnp.arange(b)
  state = dict(cache=cache, key_valid=key_valid, h=h[:, -1],
               rope=jnp.sum(valid, axis=1).astype(jnp.int32),
               grid=jnp.zeros((b, pat.num_frames, k), jnp.int32),
               end_frame=jnp.full((b,), nf, jnp.int32),
               done=jnp.zeros((b,), bool), step=jnp.int32(0))
  if record_logits:
    state['lg'] = jnp.zeros((num_cond, steps, k, model.heads.shape[-1]),
                            jnp.float32)

  def cond_fn(st):
    return (st['step'] < steps) & ~jnp.all(st['done'])

  def body(st):
    s = st['step']
    logits = _guide(dv.stream_logits(st['h']), num_cond, sampling.cfg_scale)
    if sampling.min_frames and end is not None:
      early = patterns.step_slots(pat, s)[0][0] < sampling.min_frames
      logits = logits.at[:, 0, end].set(jnp.where(early, -jnp.inf,
                                                  logits[:, 0, end]))
    toks = _tile(sample_tokens(logits, jax.random.fold_in(rng, s), sampling), b)
    if teacher is not None:  # teacher [B, steps, K]: the pattern sequence
      toks = teacher[:, jnp.minimum(s, teacher.shape[1] - 1)]
    fidx, valid = patterns.step_slots(pat, s)
    # END is only meaningful for codebook 0; elsewhere it is clipped to a code.
    toks = toks.at[:, 1:].set(jnp.minimum(toks[:, 1:], v - 1))
    toks = jnp.where(valid[None], toks, special)
    f0 = fidx[0]
    end_frame = st['end_frame']
    if end is not None:
      new_end = valid[0] & (toks[:, 0] == end) & (f0 < end_frame)
      end_frame = jnp.where(new_end, f0, end_frame)
    grid = patterns.write_step(pat, st['grid'], s, toks)
    done = st['done'] | (complete[s] >= end_frame)
    slot_valid = ~st['done']
    index = p + s
    key_valid = st['key_valid'].at[:, index].set(slot_valid)
    nxt = jnp.minimum(s + 1, steps - 1)
    mel = melody[rows, frame_of[nxt]]
    xin = dv.embed(jnp.full((b, 1), layout.EMPTY, jnp.int32), toks[:, None],
                   mel[:, None])
    hh, cache = dv.backbone_step(xin, st['rope'][:, None],
                                 transformer.cache_mask(key_valid, index, 1),
                                 st['cache'], index, ctx)
    if callback is not None and sampling.stream_every:
      # Only on the step that completes a new frame (flatten completes one
      # frame every K steps).
      c0 = jnp.minimum(complete[s], end_frame[0])
      prev = jnp.minimum(jnp.where(s > 0, complete[jnp.maximum(s - 1, 0)], 0),
                         end_frame[0])
      tick = (c0 > prev) & (c0 % sampling.stream_every == 0) & ~st['done'][0]
      jax.lax.cond(tick, lambda: _stream(
          callback, grid[:num_cond, :nf],
          jnp.minimum(complete[s], end_frame[:num_cond])), lambda: None)
    new = dict(cache=cache, key_valid=key_valid, h=hh[:, 0],
               rope=st['rope'] + slot_valid, grid=grid, end_frame=end_frame,
               done=done, step=s + 1)
    if record_logits:
      new['lg'] = st['lg'].at[:, s].set(logits)
    return new

  st = jax.lax.while_loop(cond_fn, body, state)
  count = jnp.minimum(st['end_frame'], jnp.maximum(complete[st['step'] - 1], 0))
  out = {'codes': st['grid'][:num_cond, :nf], 'num_frames': count[:num_cond]}
  if record_logits:
    out['logits_stream'] = st['lg']
  return out


def make_generate_fn(model, sampling: Sampling, num_cond: int,
                     callback: Callable | None = None):
  """A jitted generate(params, prompt, rng, sections, melody, ref_codes,
  ref_valid) over a split model; compiled once per input shape."""
  sampling.validate()
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, prompt, rng, sections, melody, ref_codes, ref_valid):
    m = nnx.merge(graphdef, params)
    return generate(m, prompt, rng=rng, sampling=sampling, num_cond=num_cond,
                    sections=sections, melody=melody, ref_codes=ref_codes,
                    ref_valid=ref_valid, callback=callback)

  def call(prompt, rng, sections=None, melody=None, ref_codes=None,
           ref_valid=None):
    return run(params, prompt, rng, sections, melody, ref_codes, ref_valid)

  return call
