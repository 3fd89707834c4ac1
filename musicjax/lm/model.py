"""The audio-token LM: HeartMuLa's global/local transformer (default) and a
single-stream transformer over a MusicGen codebook pattern.

Inputs are slot sequences (see musicjax/lm/layout.py): a slot's embedding is
the sum of its K codebook embeddings, its text-column embedding and, for the
slot that precedes an audio frame, that frame's melody-class embedding. The
reference-audio slot adds a projection of the mean embedding of a reference
segment's frames (a pooled embedding learned with the model: no pretrained
audio encoder is needed offline).

The embedding and head layout is config (`check_config` lists the keys); the
defaults are musicjax's own, and configs/lm/heartmula_oss_3b.py sets the
released HeartMuLa's: one table width for every codebook and head (special
rows included), END as an ordinary codebook-0 class, no LM extra text tokens,
a learned unconditional row for guidance, a given reference embedding through
a biased linear into the reference slot, and no melody.

global_local (seed 001 §3.1): the global transformer reads slots and predicts
codebook 0 of the next frame (plus END); a local transformer, fed the global
hidden state and the next frame's codebooks 0..k-1, predicts codebook k.

single_stream (seed 002 §2.2): one transformer over pattern steps whose K
output heads predict every codebook of the next step in parallel; empty
pattern slots use a learned special embedding and give no loss. The released
MusicGen is this variant with its own layout (configs/lm/musicgen_small.py):
no text slots (text_vocab_size 0) but cross-attention to a T5 encoder's
states (`text_encoder`, projected by a biased linear), tables of codes plus
one pad row that is also the empty slot and the start, and heads over the
codes only (`end_token` False: a song runs to its requested length).
MusicGen-Melody is the same model with `conditioning` 'prefix': no
cross-attention; the chroma of a melody (a biased linear of its one-hot
classes, tiled to `chroma_length` frames) and the projected T5 states come
before the audio slots as one prefix of the decoder's input (`prefix`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from musicjax.config import ConfigError
from musicjax.kernels import decode_attention as kernel_lib
from musicjax.kernels import dispatch
from musicjax.lm import layout
from musicjax.nn import lora
from musicjax.nn import t5
from musicjax.nn import transformer
from musicjax.parallel import rules

VARIANTS = ('global_local', 'single_stream')
REFERENCES = ('pooled', 'linear', 'none')
TEXT_ENCODERS = ('', 't5')
CONDITIONINGS = ('cross', 'prefix')


def audio_rows(c: ml_collections.ConfigDict) -> int:
  """Rows of each codebook's embedding table."""
  if not c.get('end_token', True):   # codes + the empty / start row
    return int(c.codebook_size) + 1
  return int(c.audio_vocab_size) or layout.audio_table_size(int(c.codebook_size))


def stream_classes(c: ml_collections.ConfigDict) -> int:
  """single_stream: classes of each head (codes, + END with end_token)."""
  return int(c.codebook_size) + bool(c.get('end_token', True))


def empty_id(c: ml_collections.ConfigDict) -> int:
  """single_stream: the audio id of an empty pattern slot (and, without
  end_token, of the start slot: MusicGen's pad / BOS row)."""
  v = int(c.codebook_size)
  return layout.special_id(v) if c.get('end_token', True) else v


def head_widths(c: ml_collections.ConfigDict) -> tuple[int, int]:
  """Classes of the codebook-0 head (codes + END) and of the local heads."""
  v = int(c.audio_vocab_size)
  return (v, v) if v else (int(c.codebook_size) + 1, int(c.codebook_size))


def end_id(c: ml_collections.ConfigDict) -> int:
  """Codebook-0 class that ends the song (or section)."""
  e = int(c.end_id)
  return e if e >= 0 else layout.end_id(int(c.codebook_size))


def text_rows(c: ml_collections.ConfigDict) -> int:
  v = int(c.text_vocab_size)
  return layout.text_table_size(v) if c.text_extra_tokens else v


def ref_slot_id(c: ml_collections.ConfigDict) -> int:
  """Text-column id of the reference slot."""
  if c.text_extra_tokens:
    return layout.extra_id(int(c.text_vocab_size), '<ref>')
  return layout.REF_SLOT


def check_config(c: ml_collections.ConfigDict) -> None:
  """The embedding/head layout keys of config.model."""
  v = int(c.codebook_size)
  if c.variant == 'single_stream' and (c.audio_vocab_size or c.end_id != -1):
    raise ConfigError('config.model.audio_vocab_size / end_id apply to the '
                      "global_local variant only (single_stream: 0 and -1)")
  if c.audio_vocab_size and c.audio_vocab_size < v + 1:
    raise ConfigError(f'config.model.audio_vocab_size must be 0 (ours) or hold '
                      f'the {v} codes and END (>= {v + 1}), got '
                      f'{c.audio_vocab_size}')
  classes = head_widths(c)[0]
  if c.end_id != -1 and not v <= c.end_id < classes:
    raise ConfigError(f'config.model.end_id must be -1 (= codebook_size) or a '
                      f'codebook-0 class in [{v}, {classes}) (audio_vocab_size '
                      f'sets the classes), got {c.end_id}')
  if c.reference not in REFERENCES:
    raise ConfigError(f'config.model.reference must be one of {REFERENCES}, '
                      f'got {c.reference!r}')
  if c.reference == 'linear' and c.reference_dim < 1:
    raise ConfigError("config.model.reference_dim must be >= 1 with reference="
                      f"'linear', got {c.reference_dim}")
  for key in ('text_extra_tokens', 'uncond_embedding', 'melody', 'end_token',
              'context_proj', 'text_encoder_trainable'):
    if not isinstance(c[key], bool):
      raise ConfigError(f'config.model.{key} must be True or False, got '
                        f'{c[key]!r}')
  if not c.end_token and c.variant != 'single_stream':
    raise ConfigError('config.model.end_token=False (heads without END) is '
                      "for variant='single_stream' only: the global_local "
                      'model ends a song with its END class')
  if c.text_encoder not in TEXT_ENCODERS:
    raise ConfigError(f'config.model.text_encoder must be one of '
                      f'{TEXT_ENCODERS}, got {c.text_encoder!r}')
  conditioning = c.get('conditioning', 'cross')
  if conditioning not in CONDITIONINGS:
    raise ConfigError(f'config.model.conditioning must be one of '
                      f'{CONDITIONINGS}, got {conditioning!r}')
  cross = bool(c.backbone.get('cross_attention', False))
  if conditioning == 'prefix':
    if not c.text_encoder or cross:
      raise ConfigError(
          "config.model.conditioning='prefix' (MusicGen-Melody) needs "
          "config.model.text_encoder='t5' and "
          'config.model.backbone.cross_attention=False: the text states '
          'enter as a prefix of the sequence')
    for key in ('chroma_bins', 'chroma_length'):
      if int(c[key]) < 1:
        raise ConfigError(f"config.model.{key} must be >= 1 with conditioning="
                          f"'prefix', got {c[key]}")
    if not isinstance(c.chroma_proj, bool):
      raise ConfigError(f'config.model.chroma_proj must be True or False, got '
                        f'{c.chroma_proj!r}')
    if not c.chroma_proj and int(c.chroma_bins) != int(c.backbone.dim):
      raise ConfigError(
          f'config.model.chroma_proj=False needs config.model.chroma_bins '
          f'({c.chroma_bins}) == config.model.backbone.dim ({c.backbone.dim})')
  elif bool(c.text_encoder) != cross:
    raise ConfigError(
        f'config.model.text_encoder={c.text_encoder!r} needs '
        f'config.model.backbone.cross_attention={not cross}: the encoder\'s '
        'states are what cross-attention reads')
  if c.text_encoder and c.variant != 'single_stream':
    raise ConfigError("config.model.text_encoder is for variant="
                      "'single_stream' (MusicGen) only")
  if c.text_encoder:
    t5.check_config(c.t5, 'model.t5')
    if not c.context_proj and int(c.t5.dim) != int(c.backbone.dim):
      raise ConfigError(
          f'config.model.context_proj=False needs config.model.t5.dim '
          f'({c.t5.dim}) == config.model.backbone.dim ({c.backbone.dim})')


def trainable(c: ml_collections.ConfigDict):
  """The nnx filter of the parameters training updates: every Param, less
  the text encoder's unless `text_encoder_trainable` (MusicGen trains with
  T5 frozen, and so does its fine-tuning here by default)."""
  if c.text_encoder and not c.text_encoder_trainable:
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains('text_encoder')))
  return nnx.Param


def _normal(rngs: nnx.Rngs, shape, std: float, names) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   out_sharding=names)


class AudioLM(nnx.Module):
  """Both variants; `config.variant` picks the heads and the local transformer."""
  # Weights that take LoRA adapters besides the stacks' (nn/lora.py): the
  # output heads (one per codebook: a batch dim) and the local projection.
  ADAPTABLE = {'head0': (0, 1), 'heads': (1, 1), 'local_heads': (1, 1),
               'local_proj': (0, 1)}

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.variant = c.variant
    self.pattern = c.pattern
    self.num_codebooks = k = int(c.num_codebooks)
    self.codebook_size = int(c.codebook_size)
    self.text_vocab_size = int(c.text_vocab_size)
    self.ref_id = ref_slot_id(c)
    self.reference = c.reference
    self.melody = bool(c.melody)
    self.empty_id = empty_id(c) if self.variant == 'single_stream' else -1
    self.end_token = bool(c.end_token)
    self.conditioning = c.get('conditioning', 'cross')
    e = int(c.backbone.dim)
    std = float(c.embed_init_std)
    self.audio_embed = _normal(rngs, (k, audio_rows(c), e), std,
                               ('codebook', 'vocab', 'embed'))
    # No text table when text enters only by cross-attention (MusicGen).
    self.text_embed = (_normal(rngs, (text_rows(c), e), std, ('vocab', 'embed'))
                       if text_rows(c) else None)
    if c.text_encoder:
      self.text_encoder = t5.T5Encoder(c.t5, rngs=rngs)
      if c.context_proj:
        te = int(c.t5.dim)
        self.context_proj = _normal(rngs, (te, e), te ** -0.5, (None, 'embed'))
        self.context_bias = nnx.Param(jnp.zeros((e,), jnp.float32),
                                      out_sharding=('embed',))
    if self.conditioning == 'prefix':
      self.chroma_bins = cb = int(c.chroma_bins)
      self.chroma_length = int(c.chroma_length)
      if c.chroma_proj:
        self.chroma_proj = _normal(rngs, (cb, e), cb ** -0.5, (None, 'embed'))
        self.chroma_bias = nnx.Param(jnp.zeros((e,), jnp.float32),
                                     out_sharding=('embed',))
    if self.melody:
      self.melody_embed = _normal(rngs, (layout.MELODY_VOCAB, e), std,
                                  (None, 'embed'))
    # Guidance's unconditional rows: this one row stands for every text slot.
    self.uncond_embed = (_normal(rngs, (e,), std, ('embed',))
                         if c.uncond_embedding else None)
    if self.reference == 'pooled':
      self.ref_proj = _normal(rngs, (e, e), e ** -0.5, ('embed', 'mlp'))
    elif self.reference == 'linear':  # a given embedding (HeartMuLa: MuQ-MuLan)
      r = int(c.reference_dim)
      self.ref_proj = _normal(rngs, (r, e), r ** -0.5, (None, 'embed'))
      self.ref_bias = nnx.Param(jnp.zeros((e,), jnp.float32),
                                out_sharding=('embed',))
    self.backbone = transformer.Transformer(c.backbone, rngs)
    head_std = float(c.backbone.init_std)
    if self.variant == 'global_local':
      el = int(c.local.dim)
      width0, width = head_widths(c)
      # Codebook 0 (+ END) from the global hidden state.
      self.head0 = _normal(rngs, (e, width0), head_std, ('embed', 'vocab'))
      # Global hidden state and code embeddings enter the local width (CSM/HeartMuLa).
      self.local_proj = _normal(rngs, (e, el), e ** -0.5, ('embed', 'mlp'))
      self.local = transformer.Transformer(c.local, rngs)
      self.local_heads = _normal(rngs, (k - 1, el, width),
                                 float(c.local.init_std),
                                 ('codebook', 'embed', 'vocab'))
    else:
      self.heads = _normal(rngs, (k, e, stream_classes(c)), head_std,
                           ('codebook', 'embed', 'vocab'))

  # ------------------------------------------------------------- embeddings
  def frame_embedding(self, codes: jax.Array) -> jax.Array:
    """codes [..., K] (EMPTY allowed) -> sum of codebook embeddings [..., E]."""
    table = self.audio_embed[...]
    out = 0.0
    for i in range(self.num_codebooks):
      out = out + rules.take_rows_or_zero(table[i], codes[..., i])
    return out

  def reference_embedding(self, ref: jax.Array) -> jax.Array:
    """The reference slot's vector [B, E]: 'pooled', from ref codes [B, R, K]
    (projected mean over valid frames); 'linear', from a given embedding
    [B, reference_dim]."""
    if self.reference == 'linear':
      w = rules.shard_activation(self.ref_proj[...], (None, None))
      return ref @ w + self.ref_bias[...]
    ref_codes = ref
    valid = (ref_codes[..., 0] >= 0).astype(jnp.float32)
    emb = self.frame_embedding(ref_codes)
    pooled = jnp.sum(emb * valid[..., None], axis=1) / jnp.maximum(
        jnp.sum(valid, axis=1, keepdims=True), 1.0)
    return pooled @ rules.shard_activation(self.ref_proj[...], (None, None))

  def embed(self, text, audio, melody, ref=None, ref_valid=None,
            uncond=None) -> jax.Array:
    """Slot embeddings [B,S,E] from text [B,S], audio [B,S,K], melody [B,S]
    (unused without a melody table); `uncond` [B] marks the unconditional
    rows of guidance (with `uncond_embedding`)."""
    x = self.frame_embedding(audio)
    if self.text_embed is None:
      return rules.shard_activation(x, ('batch', 'time', 'embed'))
    t = rules.take_rows_or_zero(self.text_embed[...], text)
    if self.uncond_embed is not None and uncond is not None:
      # Every slot with a text column (the reference slot too) reads the
      # unconditional row instead.
      null = uncond[:, None] & (text != layout.EMPTY)
      t = jnp.where(null[..., None], self.uncond_embed[...].astype(t.dtype), t)
    x = x + t
    if self.melody:
      x = x + rules.take_rows_or_zero(self.melody_embed[...], melody)
    if ref is not None:
      use = (text == self.ref_id) & ref_valid[:, None]
      if self.reference == 'linear':
        # Replaces the slot, in conditional rows only.
        if self.uncond_embed is not None and uncond is not None:
          use = use & ~uncond[:, None]
        x = jnp.where(use[..., None], ref[:, None, :].astype(x.dtype), x)
      else:
        x = x + jnp.where(use[..., None], ref[:, None, :], 0.0)
    return rules.shard_activation(x, ('batch', 'time', 'embed'))

  def text_states(self, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """The text encoder's states of `tokens` [B, T] (valid [B, T]),
    projected to the backbone width and zero on invalid slots [B, T, E]."""
    h = self.text_encoder(tokens, valid)
    if hasattr(self, 'context_proj'):
      w = rules.shard_activation(self.context_proj[...], (None, None))
      h = h @ w + rules.shard_activation(self.context_bias[...], (None,))
    return h * valid[..., None].astype(h.dtype)

  def context(self, tokens: jax.Array, valid: jax.Array
              ) -> transformer.Context | None:
    """What the backbone's cross-attention reads: `text_states`, with the
    valid slots as keys (None without cross-attention). Guidance's
    unconditional rows are rows with no valid slot: their cross-attention
    then adds nothing (MusicGen's null text)."""
    if not hasattr(self, 'text_encoder') or self.conditioning != 'cross':
      return None
    return transformer.Context(self.text_states(tokens, valid),
                               valid.astype(bool))

  def null_chroma(self, batch: int, frames: int = 1) -> jax.Array:
    """MusicGen-Melody's 'no melody' [B, frames, chroma_bins]: chroma class
    0 in every frame (what transformers feeds without a melody, and in
    guidance's unconditional rows)."""
    return jnp.broadcast_to(jax.nn.one_hot(0, self.chroma_bins, dtype=jnp.float32),
                            (batch, frames, self.chroma_bins))

  def prefix(self, tokens: jax.Array, valid: jax.Array,
             chroma: jax.Array | None = None) -> jax.Array:
    """conditioning 'prefix': the slots before the audio [B, P, E], P =
    chroma_length + T: the chroma states of `chroma` [B, F, chroma_bins]
    (None: the null melody), projected, then repeated and cut to
    chroma_length frames, followed by `text_states`. Every prefix slot is a
    key (text slots that are not valid are zero vectors, as in
    transformers' MusicgenMelody)."""
    if chroma is None:
      chroma = self.null_chroma(tokens.shape[0])
    x = chroma.astype(jnp.float32)
    if hasattr(self, 'chroma_proj'):
      w = rules.shard_activation(self.chroma_proj[...], (None, None))
      x = x @ w + rules.shard_activation(self.chroma_bias[...], (None,))
    reps = -(-self.chroma_length // x.shape[1])
    x = jnp.tile(x, (1, reps, 1))[:, :self.chroma_length]
    text = self.text_states(tokens, valid)
    return jnp.concatenate([x, text.astype(x.dtype)], axis=1)

  # ---------------------------------------------------------------- global
  def global_logits(self, h: jax.Array) -> jax.Array:
    """Global hidden [..., E] -> codebook-0 (+END) logits [..., V+1]."""
    w = rules.shard_activation(lora.read(self, 'head0'), (None, 'vocab'))
    return (h @ w.astype(h.dtype)).astype(jnp.float32)

  def stream_logits(self, h: jax.Array) -> jax.Array:
    """single_stream: hidden [..., E] -> logits of every codebook [..., K, V+1]."""
    w = rules.shard_activation(lora.read(self, 'heads'), (None, None, 'vocab'))
    return jnp.einsum('...e,kev->...kv', h, w.astype(h.dtype)).astype(jnp.float32)

  # ----------------------------------------------------------------- local
  def local_inputs(self, h: jax.Array, next_codes: jax.Array) -> jax.Array:
    """[h, e(c_0), ..., e(c_{K-2})] projected to the local width: [..., K, El]."""
    table = self.audio_embed[...]
    parts = [h[..., None, :]]
    for i in range(self.num_codebooks - 1):
      rows = rules.take_rows_or_zero(table[i], next_codes[..., i])
      parts.append(rows[..., None, :])
    x = jnp.concatenate(parts, axis=-2)
    w = rules.shard_activation(lora.read(self, 'local_proj'), (None, None))
    return x @ w.astype(x.dtype)

  def local_in_hidden(self, h: jax.Array) -> jax.Array:
    """Local position 0: the global hidden state, at the local width."""
    return h @ lora.read(self, 'local_proj').astype(h.dtype)

  def local_in_code(self, i: int, code: jax.Array) -> jax.Array:
    """Local position i + 1: codebook i's embedding, at the local width."""
    e = rules.take_rows_or_zero(self.audio_embed[...][i], code)
    return e @ lora.read(self, 'local_proj').astype(e.dtype)

  def local_logits_kmajor(self, out: jax.Array) -> jax.Array:
    """out [B, F, K-1, El] (local positions 1..K-1) -> logits [K-1, B, F, V]."""
    w = lora.read(self, 'local_heads').astype(out.dtype)
    o = jnp.moveaxis(out, 2, 0)
    return jnp.einsum('kbfe,kev->kbfv', o, w).astype(jnp.float32)

  def local_logits(self, out: jax.Array, k: int | None = None) -> jax.Array:
    """Local outputs -> logits. out [..., K-1, El] (positions 1..K-1) ->
    [..., K-1, V]; or, with k, out [..., El] at position k -> [..., V]."""
    w = lora.read(self, 'local_heads').astype(out.dtype)
    if k is None:
      return jnp.einsum('...ke,kev->...kv', out, w).astype(jnp.float32)
    return (out @ w[k - 1]).astype(jnp.float32)

  # -------------------------------------------------------------- training
  def __call__(self, batch: dict, local_slots: int | None = None) -> dict:
    """Teacher-forced logits of a training batch (see musicjax/lm/layout.py).

    The local transformer runs only where the next slot is a real frame (not
    condition text, END or padding): at most `local_slots` such slots per row
    (default: every slot), gathered in order. 'local' is codebook-major
    [K-1, B, F, V] (so each codebook's head is one plain GEMM and the large
    logits are never transposed) with 'local_index' [B, F] (the slot of each
    frame row; -1 if unused).

    Optional keys: 'ref_codes' [B, R, K] ('pooled' reference) or 'ref_embed'
    [B, reference_dim] ('linear'), each with 'ref_valid' [B] (no reference
    with 'none'); 'uncond' [B]
    (rows that read the unconditional embedding); 'melody' is unused
    without a melody table; with a text encoder, 'context_tokens' [B, T]
    and 'context_valid' [B, T] (a row without valid slots: no text); with
    conditioning 'prefix', 'chroma' [B, F, chroma_bins] (absent: the null
    melody). Logits are the audio slots' only.
    """
    ref = ref_valid = None
    ref_key = 'ref_codes' if self.reference == 'pooled' else 'ref_embed'
    if ref_key in batch:
      ref = self.reference_embedding(batch[ref_key])
      ref_valid = batch['ref_valid']
    x = self.embed(batch['text'], batch['audio'], batch.get('melody'), ref,
                   ref_valid, batch.get('uncond'))
    valid, positions = batch['valid'], batch['positions']
    ctx, n = None, 0
    if hasattr(self, 'text_encoder'):
      if self.conditioning == 'prefix':
        pre = self.prefix(batch['context_tokens'], batch['context_valid'],
                          batch.get('chroma'))
        n = pre.shape[1]
        x, positions, valid = join_prefix(pre, x, positions, valid)
      else:
        ctx = self.context(batch['context_tokens'], batch['context_valid'])
    h, _ = self.backbone(x, positions, transformer.causal_mask(valid),
                         context=ctx)
    h = h[:, n:]     # the prefix predicts nothing
    if self.variant == 'single_stream':
      return {'stream': self.stream_logits(h)}
    nxt = next_slots(batch['audio'], valid)
    index = frame_slots(nxt, self.codebook_size, local_slots or nxt.shape[1])
    rows = jnp.maximum(index, 0)
    h_l = jnp.take_along_axis(h, rows[..., None], axis=1)
    nxt_l = jnp.take_along_axis(nxt, rows[..., None], axis=1)
    b, f, _ = nxt_l.shape
    li = self.local_inputs(h_l, nxt_l)                   # [B,F,K,El]
    flat = rules.reshape(li, (b * f,) + li.shape[2:])
    kk = self.num_codebooks
    pos = jnp.broadcast_to(jnp.arange(kk), (b * f, kk))
    lmask = transformer.causal_mask(jnp.ones((b * f, kk), bool))
    out, _ = self.local(flat, pos, lmask)
    out = rules.reshape(out, (b, f) + out.shape[1:])
    return {'global': self.global_logits(h),
            'local': self.local_logits_kmajor(out[:, :, 1:]),
            'local_index': index}


def join_prefix(prefix: jax.Array, x: jax.Array, positions: jax.Array,
                valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The prefix [B, P, E] before slots x [B, S, E]: (inputs [B, P+S, E],
  positions (the prefix's 0..P-1, the slots' shifted by P), valid (the
  prefix's all true))."""
  n = prefix.shape[1]
  # Built from the slots' own arrays, so they share their batch sharding
  # (an Explicit mesh refuses to join a replicated array to a split one).
  pos = jnp.zeros_like(positions[:, :1]) + jnp.arange(n, dtype=positions.dtype)
  return (jnp.concatenate([prefix.astype(x.dtype), x], axis=1),
          jnp.concatenate([pos, positions + n], axis=1),
          jnp.concatenate([pos >= 0, valid.astype(bool)], axis=1))


def frame_slots(nxt: jax.Array, codebook_size: int, count: int) -> jax.Array:
  """Indices [B, count] of the slots whose next slot is a real frame, in
  order, padded with -1."""
  is_frame = (nxt[..., 0] >= 0) & (nxt[..., 0] < codebook_size)
  s = nxt.shape[1]
  order = jnp.argsort(jnp.where(is_frame, jnp.arange(s), s + jnp.arange(s)),
                      axis=1)[:, :count]
  return jnp.where(jnp.take_along_axis(is_frame, order, axis=1), order, -1)


class DecodeView:
  """An AudioLM's arrays laid out for a decode loop: per-layer blocks and
  per-codebook heads, each sliced once before the loop (slices taken inside
  the loop body are copies, repeated every step); the audio embedding table
  is read in place."""

  def __init__(self, model: AudioLM, head_dtype=jnp.float32,
               attention: str = 'xla', params=None,
               backbone_weights: str = 'fused', after=None):
    """`attention`: a `kernels.dispatch.resolve` result ('xla', or a Pallas
    kernel) for the global transformer's one-token steps; the local
    transformer attends over at most K tokens and stays in XLA.

    `backbone_weights`: 'fused' (per-layer copies with q|k|v and gate|up
    joined: the fewest matmuls per step, at the cost of a second copy of the
    backbone's weights while the loop runs) or 'stacked' (the stacked arrays
    read in place by a scan over layers, with a stacked cache: no copy,
    for models whose weights are most of the memory; XLA attention).

    `after`: arrays (the prefill's output) that the view's copies are made
    after, so that they never live beside the prefill's temporaries."""
    if after is not None:
      gdef, state = nnx.split(model)
      state, _ = jax.lax.optimization_barrier((state, after))
      model = nnx.merge(gdef, state)
    self.model = model
    self.stacked = backbone_weights == 'stacked'
    if self.stacked and attention != 'xla':
      raise ValueError(f"backbone_weights 'stacked' decodes with XLA "
                       f'attention, not {attention!r}')
    self.head_dtype = head_dtype
    self.attention = attention
    self.params = params or kernel_lib.KernelParams()
    k = model.num_codebooks
    audio = model.audio_embed[...]
    # One [K * rows, E] table (a free reshape), codebook i's rows from
    # i * rows: per-codebook slices would be copies held through the loop.
    self.audio_rows = audio.shape[1]
    self.audio_table = audio.reshape(k * self.audio_rows, audio.shape[2])
    self.text_table = (None if model.text_embed is None else
                       model.text_embed[...])
    self.melody_table = model.melody_embed[...] if model.melody else None
    decode_attn = None
    if attention != 'xla':
      decode_attn = functools.partial(dispatch.attend_decode, impl=attention,
                                      params=self.params)
    self.backbone = (None if self.stacked else
                     transformer.fuse(model.backbone, decode_attn))
    if model.variant == 'global_local':
      self.local = transformer.fuse(model.local)
      # Output heads are most of a decode step's weight reads (K x width x
      # vocab); `head_dtype` bfloat16 halves them (accumulation stays float32).
      self.head0 = lora.read(model, 'head0').astype(head_dtype)
      self.proj = lora.read(model, 'local_proj')
      heads = lora.read(model, 'local_heads').astype(head_dtype)
      self.local_heads = [heads[i] for i in range(k - 1)]
    else:
      heads = lora.read(model, 'heads').astype(head_dtype)
      self.heads = [heads[i] for i in range(k)]

  def embed(self, text, audio, melody) -> jax.Array:
    x = (0.0 if self.text_table is None
         else rules.take_rows_or_zero(self.text_table, text))
    if self.melody_table is not None:
      x = x + rules.take_rows_or_zero(self.melody_table, melody)
    for i in range(audio.shape[-1]):
      x = x + self._code_embed(i, audio[..., i])
    return x

  def _code_embed(self, i: int, code) -> jax.Array:
    """Codebook i's embedding of `code` (EMPTY: zeros), clamped into its own
    rows as a lookup in its own table would be."""
    rows = self.audio_rows
    flat = jnp.where(code >= 0, i * rows + jnp.minimum(code, rows - 1), code)
    return rules.take_rows_or_zero(self.audio_table, flat)

  def backbone_step(self, x, positions, mask, cache, index, context=None):
    if self.stacked:
      return self.model.backbone(x, positions, mask, cache, index, context)
    return transformer.run_fused(self.backbone, self.model.backbone.norm, x,
                                    positions, mask, cache, index, context)

  def loop_cache(self, cache):
    """The prefilled stacked cache in the layout backbone_step takes."""
    return cache if self.stacked else transformer.split_cache(cache)

  def loop_context(self, context):
    """The cross-attention context (`Transformer.cross_context`) in the
    layout backbone_step takes."""
    return context if self.stacked else transformer.split_context(context)

  def local_step(self, x, positions, mask, cache, index):
    return transformer.run_fused(self.local, self.model.local.norm, x,
                                    positions, mask, cache, index)

  def _head(self, h, w):
    return jnp.dot(h.astype(self.head_dtype), w,
                   preferred_element_type=jnp.float32)

  def global_logits(self, h):
    return self._head(h, self.head0)

  def local_logits(self, out, k: int):
    return self._head(out, self.local_heads[k - 1])

  def stream_logits(self, h):
    return jnp.stack([self._head(h, w) for w in self.heads], axis=-2)

  def local_in_hidden(self, h):
    return h @ self.proj.astype(h.dtype)

  def local_in_code(self, i: int, code):
    e = self._code_embed(i, code)
    return e @ self.proj.astype(e.dtype)


def next_slots(audio: jax.Array, valid: jax.Array) -> jax.Array:
  """Codes of the next slot for every slot: [B,S,K], EMPTY where none."""
  nxt = jnp.concatenate([audio[:, 1:], jnp.full_like(audio[:, :1], layout.EMPTY)], 1)
  nvalid = jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, :1])], 1)
  return jnp.where(nvalid[..., None], nxt, layout.EMPTY)


def _ce(logits: jax.Array, labels: jax.Array, ignore: jax.Array):
  """Per-position cross-entropy and its mask; labels outside range are ignored."""
  # The vocabulary may be tensor-parallel; the label gather needs it whole.
  lead = ('batch',) + (None,) * (labels.ndim - 1)
  logits = rules.shard_activation(logits, lead + (None,))
  labels = rules.shard_activation(labels, lead)
  ignore = rules.shard_activation(ignore, lead)
  mask = ~ignore
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(mask, labels, 0))
  return ce * mask, mask


def _mean(x: jax.Array, mask: jax.Array, axes=None) -> jax.Array:
  m = mask.astype(jnp.float32)
  return jnp.sum(x, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)


def token_log_probs(model: AudioLM, batch: dict, logits: dict):
  """Per-slot log p of the teacher tokens, split (global [B,S], local [B,S]) and
  per-codebook (ce [B,S,K], mask [B,S,K]). Used by the loss and by DPO."""
  audio, valid = batch['audio'], batch['valid']
  if model.variant == 'single_stream':
    nxt = next_slots(audio, valid)
    ignore = (nxt < 0) | (nxt == model.empty_id)
    ce, mask = _ce(logits['stream'], nxt, ignore)           # [B,S,K]
    glob = ce[..., 0]
    loc = jnp.sum(ce[..., 1:], axis=-1)
    return -glob, -loc, ce, mask
  nxt = next_slots(audio, valid)
  ce0, m0 = _ce(logits['global'], nxt[..., 0], nxt[..., 0] < 0)
  index = logits['local_index']
  tgt = jnp.take_along_axis(nxt, jnp.maximum(index, 0)[..., None], axis=1)
  tk = jnp.moveaxis(tgt[..., 1:], 2, 0)                    # [K-1,B,F]
  cek, mk = _ce(logits['local'], tk, (tk < 0) | (index < 0)[None])
  cek, mk = jnp.moveaxis(cek, 0, 2), jnp.moveaxis(mk, 0, 2)  # [B,F,K-1]
  # Back to slots (every frame slot appears once in `index`): a one-hot
  # contraction rather than a scatter, so it shards like any batched matmul.
  onehot = (index[..., None] == jnp.arange(ce0.shape[1])).astype(jnp.float32)
  to_slots = lambda x: rules.einsum('bfs,bfk->bsk', onehot, x.astype(jnp.float32),
                                    ('batch', None, None))
  cek, mk = to_slots(cek), to_slots(mk) > 0.5
  ce = jnp.concatenate([ce0[..., None], cek], axis=-1)
  mask = jnp.concatenate([m0[..., None], mk], axis=-1)
  return -ce0, -jnp.sum(cek, axis=-1), ce, mask


WEIGHTINGS = ('uniform', 'sft', 'mean')


def local_weights(num_codebooks: int, weighting: str) -> jnp.ndarray:
  """λ_k for k = 1..K-1 (seed 001 §3.3.2): uniform 1.0 (warm-up/pretraining) or
  the SFT decay (K - k) / 10."""
  k = jnp.arange(1, num_codebooks, dtype=jnp.float32)
  if weighting == 'uniform':
    return jnp.ones_like(k)
  if weighting == 'sft':
    return (num_codebooks - k) / 10.0
  raise ValueError(f"local weighting must be 'uniform' or 'sft', got {weighting!r}")


def total_loss(per_k: jax.Array, global_weight: float, weighting: str
               ) -> jax.Array:
  """The loss from per-codebook mean cross-entropies [K]: λ0 L0 + 1/(K-1)
  Σ_k λk Lk (HeartMuLa's eq. 8), or with 'mean' every codebook alike,
  1/K Σ_k Lk (MusicGen's objective; global_weight unused)."""
  k = per_k.shape[0]
  if weighting == 'mean':
    return jnp.mean(per_k)
  if k == 1:
    return global_weight * per_k[0]
  lam = local_weights(k, weighting)
  return global_weight * per_k[0] + jnp.sum(lam * per_k[1:]) / (k - 1)


def loss_and_metrics(model: AudioLM, batch: dict, global_weight: float,
                     weighting: str, local_slots: int | None = None):
  """`total_loss` of the batch, plus per-codebook CE/perplexity."""
  logits = model(batch, local_slots)
  _, _, ce, mask = token_log_probs(model, batch, logits)
  k = model.num_codebooks
  per_k = _mean(ce, mask, axes=(0, 1))                      # [K]
  total = total_loss(per_k, global_weight, weighting)
  metrics = {'loss': total, 'ce/mean': _mean(ce, mask)}
  for i in range(k):
    metrics[f'ce/{i}'] = per_k[i]
    metrics[f'ppl/{i}'] = jnp.exp(per_k[i])
  metrics['tokens'] = jnp.sum(mask.astype(jnp.float32))
  return total, metrics
