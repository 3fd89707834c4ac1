"""PyTorch mirror of the musicjax audio-token LM (musicjax/lm/model.py) and
its decode loop (musicjax/lm/generate.py).

Inputs are slot sequences: per slot a text id, K audio codes and a melody id,
each -1 (EMPTY) where absent. A slot's embedding is the sum of its codebook,
text and melody embeddings; the `<ref>` slot adds a projection of the mean
embedding of a reference segment.

The embedding and head layout follows the JAX model's config keys: ours by
default, or the released HeartMuLa's (configs/lm/heartmula_oss_3b.py):
audio_vocab_size rows per codebook table and head (special rows included),
end_id as a codebook-0 class, no LM extra text tokens (text_extra_tokens
False; the reference slot's text id is REF_SLOT), one learned unconditional
row for guidance's 'uncond' rows (uncond_embedding), a given reference
embedding through a biased linear that replaces the reference slot
(reference 'linear', reference_dim wide), and no melody table (melody False).

  global_local   the backbone predicts codebook 0 (+ END) of the next frame;
                 a local transformer, fed the backbone's hidden state and the
                 frame's codebooks 0..k-1, predicts codebook k.
  single_stream  one transformer over codebook-pattern steps (delay,
                 parallel, flatten); K heads predict every codebook of the
                 next step.

`AudioLM(model_config, facts)` takes config.json's `model` dict and its
top-level loader facts (end_id, special_id, extra_ids, melody_null); a missing
fact defaults to the layout convention of musicjax/lm/layout.py, and an
explicit model end_id wins over the facts.
Depends only on torch and numpy.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from musicjax_torch import transformer

EMPTY = -1
# Conventions of musicjax/lm/layout.py, for configs without loader facts.
EXTRA_TOKENS = ('<null_tags>', '<null_lyrics>', '<ref>', '<null_ref>', '<audio>',
                '<null_section>')
MELODY_VOCAB = 14
MELODY_SILENT = 12
MELODY_NULL = 13
# Text column of the reference slot without LM extra tokens (layout.REF_SLOT).
REF_SLOT = -2
# Audio table rows beyond the codes: END, then the pattern's special slot.
AUDIO_EXTRA_ROWS = 2
VARIANTS = ('global_local', 'single_stream')
PATTERNS = ('delay', 'parallel', 'flatten')
REFERENCES = ('pooled', 'linear')
# Layout keys and their defaults (musicjax/lm/task.py): configs exported
# before the keys existed describe our own layout.
LAYOUT_DEFAULTS = {'audio_vocab_size': 0, 'end_id': -1, 'text_extra_tokens': True,
                   'uncond_embedding': False, 'reference': 'pooled',
                   'reference_dim': 0, 'melody': True}


def layout_options(model: Mapping[str, Any]) -> dict[str, Any]:
  """The model's embedding/head layout keys, defaults filled in."""
  return {k: model.get(k, d) for k, d in LAYOUT_DEFAULTS.items()}


def audio_rows(model: Mapping[str, Any]) -> int:
  """Rows of each codebook's embedding table (JAX model.audio_rows)."""
  return (int(model.get('audio_vocab_size', 0))
          or int(model['codebook_size']) + AUDIO_EXTRA_ROWS)


def head_widths(model: Mapping[str, Any]) -> tuple[int, int]:
  """Classes of the codebook-0 head and of the local heads."""
  w, v = int(model.get('audio_vocab_size', 0)), int(model['codebook_size'])
  return (w, w) if w else (v + 1, v)


def model_end_id(model: Mapping[str, Any]) -> int:
  """The codebook-0 class that ends a song (JAX model.end_id)."""
  e = int(model.get('end_id', -1))
  return e if e >= 0 else int(model['codebook_size'])


def default_facts(model: Mapping[str, Any]) -> dict[str, Any]:
  """The loader facts that `musicjax export` writes, from layout conventions."""
  v, t = int(model['codebook_size']), int(model['text_vocab_size'])
  extra = ({tok: t + i for i, tok in enumerate(EXTRA_TOKENS)}
           if layout_options(model)['text_extra_tokens'] else {})
  return {'end_id': model_end_id(model), 'special_id': v + 1,
          'extra_ids': extra,
          'melody_null': MELODY_NULL, 'melody_silent': MELODY_SILENT}


def check_model(model: Mapping[str, Any]) -> None:
  """Refuses a config this mirror would not compute as JAX does; the error
  names the config key."""
  def bad(key, value, want):
    raise ValueError(f'config model.{key} = {value!r}: musicjax_torch mirrors '
                     f'{want}; load this export in JAX (musicjax import-torch)')
  if model['variant'] not in VARIANTS:
    bad('variant', model['variant'], VARIANTS)
  if model.get('pattern', 'delay') not in PATTERNS:
    bad('pattern', model['pattern'], PATTERNS)
  o = layout_options(model)
  if o['reference'] not in REFERENCES:
    bad('reference', o['reference'], REFERENCES)
  if o['reference'] == 'linear' and int(o['reference_dim']) < 1:
    bad('reference_dim', o['reference_dim'], ">= 1 with reference 'linear'")
  if model['variant'] == 'single_stream':
    for key in ('audio_vocab_size', 'end_id'):
      if o[key] != LAYOUT_DEFAULTS[key]:
        bad(key, o[key], f'{LAYOUT_DEFAULTS[key]} only for single_stream')
  stacks = ('backbone', 'local') if model['variant'] == 'global_local' else (
      'backbone',)
  for stack in stacks:
    transformer.check_config(model[stack], f'model.{stack}')


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
  """table[ids] with EMPTY ids giving zero vectors."""
  rows = F.embedding(ids.clamp(min=0), table)
  return rows * (ids >= 0)[..., None].to(rows.dtype)


# ------------------------------------------------------------------ patterns
class Pattern:
  """Static tables of a codebook pattern (musicjax/lm/patterns.py):
  frame_index [S, K] (-1 where a step holds no token), valid [S, K]."""

  def __init__(self, kind: str, k: int, frames: int):
    if kind not in ('delay', 'parallel', 'flatten'):
      raise ValueError(f'unknown codebook pattern {kind!r}')
    self.kind, self.k = kind, k
    steps_col = np.arange(self.steps_for(frames))[:, None]
    books = np.arange(k)[None, :]
    if kind == 'flatten':
      valid = steps_col % k == books
      frame = np.broadcast_to(steps_col // k, valid.shape)
    else:
      frame = steps_col - np.asarray(self.delays)[None, :]
      valid = (frame >= 0) & (frame < frames)
    self.valid = valid
    self.frame_index = np.where(valid, frame, -1)

  @property
  def delays(self) -> tuple[int, ...]:
    return tuple(range(self.k)) if self.kind == 'delay' else (0,) * self.k

  @property
  def num_steps(self) -> int:
    return self.frame_index.shape[0]

  def steps_for(self, frames: int) -> int:
    return frames * self.k if self.kind == 'flatten' else frames + max(self.delays)

  def frames_done(self, steps: int) -> int:
    """Leading frames complete once steps 0 .. steps-1 are done."""
    if self.kind == 'flatten':
      return steps // self.k
    return max(0, steps - max(self.delays))


# --------------------------------------------------------------------- model
class AudioLM(nn.Module):

  def __init__(self, model: Mapping[str, Any],
               facts: Mapping[str, Any] | None = None):
    super().__init__()
    check_model(model)
    self.config = dict(model)
    o = layout_options(model)
    self.facts = {**default_facts(model), **dict(facts or {})}
    if int(o['end_id']) >= 0:
      # The config is the truth: exports before 2026-12 wrote the layout's
      # codebook_size here whatever model.end_id said.
      self.facts['end_id'] = int(o['end_id'])
    self.variant = model['variant']
    self.pattern = model.get('pattern', 'delay')
    self.num_codebooks = k = int(model['num_codebooks'])
    self.codebook_size = v = int(model['codebook_size'])
    self.text_vocab_size = int(model['text_vocab_size'])
    self.reference = o['reference']
    self.melody = bool(o['melody'])
    bb, e = model['backbone'], int(model['backbone']['dim'])
    self.audio_embed = nn.ModuleList(
        nn.Embedding(audio_rows(model), e) for _ in range(k))
    extra = len(EXTRA_TOKENS) if o['text_extra_tokens'] else 0
    self.text_embed = nn.Embedding(self.text_vocab_size + extra, e)
    self.ref_id = self.extra_id('<ref>') if extra else REF_SLOT
    if self.melody:
      self.melody_embed = nn.Embedding(MELODY_VOCAB, e)
    # Guidance's unconditional rows: this one row stands for every text slot.
    if o['uncond_embedding']:
      self.uncond_embed = nn.Parameter(torch.zeros(e))
    else:
      self.register_parameter('uncond_embed', None)
    if self.reference == 'pooled':
      self.ref_proj = nn.Linear(e, e, bias=False)
    else:  # a given embedding; its bias is JAX's ref_bias
      self.ref_proj = nn.Linear(int(o['reference_dim']), e)
    self.backbone = transformer.Transformer(bb, 'model.backbone')
    if self.variant == 'global_local':
      el = int(model['local']['dim'])
      width0, width = head_widths(model)
      self.head0 = nn.Linear(e, width0, bias=False)          # codebook 0 + END
      self.local_proj = nn.Linear(e, el, bias=False)
      self.local = transformer.Transformer(model['local'], 'model.local')
      self.local_heads = nn.ModuleList(
          nn.Linear(el, width, bias=False) for _ in range(k - 1))
    else:
      self.heads = nn.ModuleList(nn.Linear(e, v + 1, bias=False)
                                 for _ in range(k))

  @classmethod
  def from_config(cls, meta: Mapping[str, Any]) -> 'AudioLM':
    """From a whole config.json dict (its `model` and the loader facts)."""
    return cls(meta['model'], {n: meta[n] for n in default_facts(meta['model'])
                               if n in meta})

  @property
  def end_id(self) -> int:
    return int(self.facts['end_id'])

  @property
  def special_id(self) -> int:
    return int(self.facts['special_id'])

  def extra_id(self, token: str) -> int:
    return int(self.facts['extra_ids'][token])

  # ------------------------------------------------------------ embeddings
  def frame_embedding(self, codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] (EMPTY allowed) -> sum of codebook embeddings [..., E]."""
    out = _lookup(self.audio_embed[0].weight, codes[..., 0])
    for i in range(1, self.num_codebooks):
      out = out + _lookup(self.audio_embed[i].weight, codes[..., i])
    return out

  def reference_embedding(self, ref: torch.Tensor) -> torch.Tensor:
    """The reference slot's vector [B, E]: 'pooled', from ref codes [B, R, K]
    (projected mean of valid frames); 'linear', from a given embedding
    [B, reference_dim]."""
    if self.reference == 'linear':
      return self.ref_proj(ref.to(self.ref_proj.weight.dtype))
    ref_codes = ref
    emb = self.frame_embedding(ref_codes)
    valid = (ref_codes[..., 0] >= 0).to(emb.dtype)
    pooled = torch.sum(emb * valid[..., None], dim=1) / torch.clamp(
        torch.sum(valid, dim=1, keepdim=True), min=1.0)
    return self.ref_proj(pooled)

  def embed(self, text, audio, melody, ref=None, ref_valid=None,
            uncond=None) -> torch.Tensor:
    """Slot embeddings [B,S,E] from text [B,S], audio [B,S,K], melody [B,S]
    (unused without a melody table); `uncond` [B] bool marks guidance's
    unconditional rows (with uncond_embedding)."""
    x = self.frame_embedding(audio)
    t = _lookup(self.text_embed.weight, text)
    if self.uncond_embed is not None and uncond is not None:
      # Every slot with a text column (the reference slot too) reads the
      # unconditional row instead.
      null = uncond[:, None] & (text != EMPTY)
      t = torch.where(null[..., None], self.uncond_embed.to(t.dtype), t)
    x = x + t
    if self.melody and melody is not None:
      x = x + _lookup(self.melody_embed.weight, melody)
    if ref is not None:
      use = (text == self.ref_id) & ref_valid[:, None]
      if self.reference == 'linear':
        # Replaces the slot, in conditional rows only.
        if self.uncond_embed is not None and uncond is not None:
          use = use & ~uncond[:, None]
        x = torch.where(use[..., None], ref[:, None, :].to(x.dtype), x)
      else:
        x = x + torch.where(use[..., None], ref[:, None, :], torch.zeros_like(x))
    return x

  def step_embed(self, text, audio, melody) -> torch.Tensor:
    """`embed` without a reference, summed in the decode loop's order (text,
    melody, codebooks), so decoding rounds exactly as the JAX loop does."""
    x = _lookup(self.text_embed.weight, text)
    if self.melody:
      x = x + _lookup(self.melody_embed.weight, melody)
    for i in range(self.num_codebooks):
      x = x + _lookup(self.audio_embed[i].weight, audio[..., i])
    return x

  # ----------------------------------------------------------------- heads
  def global_logits(self, h: torch.Tensor) -> torch.Tensor:
    """Global hidden [..., E] -> codebook-0 (+END) logits [..., W0]."""
    return self.head0(h).float()

  def stream_logits(self, h: torch.Tensor) -> torch.Tensor:
    """single_stream: hidden [..., E] -> logits [..., K, V+1]."""
    return torch.stack([head(h) for head in self.heads], dim=-2).float()

  def local_in_code(self, i: int, code: torch.Tensor) -> torch.Tensor:
    """Local position i + 1: codebook i's embedding, at the local width."""
    return self.local_proj(_lookup(self.audio_embed[i].weight, code))

  # -------------------------------------------------------------- training
  def forward(self, batch: Mapping[str, torch.Tensor],
              local_slots: int | None = None) -> dict[str, torch.Tensor]:
    """Teacher-forced logits, as the JAX `AudioLM.__call__`:
    single_stream {'stream' [B,S,K,V+1]}; global_local {'global' [B,S,W0],
    'local' [K-1,B,F,W] (codebook-major), 'local_index' [B,F] (the slot of
    each frame row, -1 if unused)}; the widths are V+1 and V in our layout,
    audio_vocab_size in the released one.

    Optional keys: 'ref_codes' [B,R,K] ('pooled' reference) or 'ref_embed'
    [B, reference_dim] ('linear'), each with 'ref_valid' [B]; 'uncond' [B]
    (rows that read the unconditional embedding); 'melody' is unused
    without a melody table."""
    ref = ref_valid = None
    ref_key = 'ref_codes' if self.reference == 'pooled' else 'ref_embed'
    if ref_key in batch:
      ref = self.reference_embedding(batch[ref_key])
      ref_valid = batch['ref_valid'].bool()
    uncond = batch.get('uncond')
    valid = batch['valid'].bool()
    x = self.embed(batch['text'], batch['audio'], batch.get('melody'), ref,
                   ref_valid, None if uncond is None else uncond.bool())
    h = self.backbone(x, batch['positions'], transformer.causal_mask(valid))
    if self.variant == 'single_stream':
      return {'stream': self.stream_logits(h)}
    nxt = next_slots(batch['audio'], valid)
    index = frame_slots(nxt, self.codebook_size, local_slots or nxt.shape[1])
    rows = index.clamp(min=0)
    h_l = torch.gather(h, 1, rows[..., None].expand(-1, -1, h.shape[-1]))
    nxt_l = torch.gather(nxt, 1, rows[..., None].expand(-1, -1, nxt.shape[-1]))
    b, f, k = nxt_l.shape
    # Local positions: the global hidden state, then codebooks 0..K-2.
    parts = [h_l[..., None, :]] + [
        _lookup(self.audio_embed[i].weight, nxt_l[..., i])[..., None, :]
        for i in range(k - 1)]
    li = self.local_proj(torch.cat(parts, dim=-2)).reshape(b * f, k, -1)
    pos = torch.arange(k, device=li.device).expand(b * f, k)
    ones = torch.ones(b * f, k, dtype=torch.bool, device=li.device)
    out = self.local(li, pos, transformer.causal_mask(ones)).reshape(b, f, k, -1)
    local = torch.stack([head(out[:, :, i + 1])
                         for i, head in enumerate(self.local_heads)])
    return {'global': self.global_logits(h), 'local': local.float(),
            'local_index': index}

  # ------------------------------------------------------------ generation
  @torch.no_grad()
  def generate(self, prompt: Mapping[str, torch.Tensor], max_frames: int = 250,
               cfg_scale: float = 1.0, temperature: float = 1.0,
               top_k: int = 50, top_p: float = 1.0, num_cond: int | None = None,
               sections: torch.Tensor | None = None,
               melody: torch.Tensor | None = None,
               ref_codes: torch.Tensor | None = None,
               ref_valid: torch.Tensor | None = None,
               generator: torch.Generator | None = None, min_frames: int = 0,
               teacher: torch.Tensor | None = None,
               record_logits: bool = False,
               top_k_keep_ties: bool = True) -> dict[str, torch.Tensor]:
    """Samples a song after a left-padded prompt (see `decode`).

    prompt: text [B,P], audio [B,P,K], melody [B,P], positions [B,P],
      valid [B,P]. With CFG (cfg_scale != 1) B = 2 * num_cond: rows
      [0, num_cond) conditional, [num_cond, B) the null conditions.
      Optional 'uncond' [B]: the rows that read the unconditional embedding
      (uncond_embedding; the released HeartMuLa's CFG rows; global_local).
    sections: interleaved layout: text [B, NS, Ls] of the sections after the
      first, each left-padded with EMPTY and ending in '<audio>'.
    melody: [B, max_frames] melody ids of the frames to generate.
    ref_codes, ref_valid: reference segment [B,R,K] ('linear' reference: the
      given embedding [B, reference_dim]) and whether it is given.
    temperature 0 is greedy (argmax); otherwise top-k, then top-p within it;
    top_k_keep_ties keeps every token tied with the last kept one (heartlib's
    top-k; False: exactly k).
    teacher: frames [B,T,K] (pattern steps for single_stream) consumed
      instead of samples; record_logits: also return the guided logits.
    A frame ends the song (or section) when any of its codes is >= end_id
    (ours: codebook 0 == END; the released heads have END columns in every
    codebook); min_frames bars every class >= end_id before that frame.

    Returns {'codes': [n, max_frames, K], 'num_frames': [n]}.
    """
    b = prompt['text'].shape[0]
    if num_cond is None:
      num_cond = b if cfg_scale == 1.0 else b // 2
    if cfg_scale != 1.0 and b != 2 * num_cond:
      raise ValueError(f'cfg_scale={cfg_scale} needs 2 * num_cond = '
                       f'{2 * num_cond} prompt rows (conditional, then null), '
                       f'got {b}')
    sampler = Sampler(temperature, top_k, top_p, cfg_scale, num_cond, generator,
                      top_k_keep_ties)
    run = decode if self.variant == 'global_local' else decode_stream
    was_training = self.training
    self.eval()
    try:
      return run(self, prompt, sampler, max_frames, min_frames, sections, melody,
                 ref_codes, ref_valid, teacher, record_logits)
    finally:
      self.train(was_training)


def next_slots(audio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
  """Codes of the next slot for every slot: [B,S,K], EMPTY where none."""
  nxt = torch.cat([audio[:, 1:], torch.full_like(audio[:, :1], EMPTY)], 1)
  nvalid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1)
  return torch.where(nvalid[..., None], nxt, torch.full_like(nxt, EMPTY))


def frame_slots(nxt: torch.Tensor, codebook_size: int, count: int) -> torch.Tensor:
  """Indices [B, count] of the slots whose next slot is a real frame, in
  order, padded with -1."""
  is_frame = (nxt[..., 0] >= 0) & (nxt[..., 0] < codebook_size)
  s = nxt.shape[1]
  ar = torch.arange(s, device=nxt.device)
  order = torch.argsort(torch.where(is_frame, ar, s + ar), dim=1)[:, :count]
  return torch.where(torch.gather(is_frame, 1, order), order,
                     torch.full_like(order, -1))


# ------------------------------------------------------------------ sampling
class Sampler:
  """Guidance and token sampling of the decode loop."""

  def __init__(self, temperature: float, top_k: int, top_p: float,
               cfg_scale: float, num_cond: int, generator=None,
               top_k_keep_ties: bool = True):
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
      raise ValueError(f'need temperature >= 0, top_k >= 0, 0 < top_p <= 1; '
                       f'got {temperature}, {top_k}, {top_p}')
    self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
    self.cfg_scale, self.num_cond = cfg_scale, num_cond
    self.generator = generator
    self.top_k_keep_ties = top_k_keep_ties

  def guide(self, logits: torch.Tensor) -> torch.Tensor:
    """u + s * (c - u) over the (conditional, null) row halves."""
    n = self.num_cond
    if logits.shape[0] == n:
      return logits
    cond, uncond = logits[:n], logits[n:]
    return uncond + self.cfg_scale * (cond - uncond)

  def sample(self, logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> ids [...]: top-k first, then top-p within it (JAX
    `generate.sample_tokens`); with top_k_keep_ties every token >= the last
    kept value stays."""
    if self.temperature == 0:
      return torch.argmax(logits, dim=-1)
    logits = logits / self.temperature
    vocab = logits.shape[-1]
    k = self.top_k if 0 < self.top_k < vocab else vocab
    vals, idx = torch.topk(logits, k, dim=-1)
    if self.top_p < 1:
      probs = torch.softmax(vals, dim=-1)
      before = torch.cumsum(probs, dim=-1) - probs     # mass of better tokens
      vals = torch.where(before < self.top_p, vals,
                         torch.full_like(vals, -float('inf')))
    if self.top_k_keep_ties and (k < vocab or self.top_p < 1):
      # The kept values are a prefix of vals; every logit >= the last stays.
      finite = torch.isfinite(vals)
      cut = torch.where(finite, vals, torch.full_like(vals, float('inf')))
      cut = cut.min(dim=-1, keepdim=True).values
      vals = torch.where(logits >= cut, logits,
                         torch.full_like(logits, -float('inf')))
      k = vocab
      idx = torch.arange(vocab, device=logits.device).expand(logits.shape)
    probs = torch.softmax(vals, dim=-1)
    flat = probs.reshape(-1, k)
    choice = torch.multinomial(flat, 1, generator=self.generator)
    choice = choice.reshape(probs.shape[:-1] + (1,))
    return torch.gather(idx, -1, choice)[..., 0]

  def pick(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
    """Sampled ids of the guided rows, repeated for every prompt row (a CFG
    pair shares its token, so both rows stay in step)."""
    toks = self.sample(logits)
    return torch.cat([toks] * (rows // toks.shape[0]), dim=0)


# -------------------------------------------------------------------- decode
def _prefill(model: AudioLM, prompt, melody, ref_codes, ref_valid, slots: int,
             uncond=None):
  """Runs the prompt into a fresh backbone cache of `slots` slots.
  Returns (last hidden [B,E], cache, key validity [B,slots], rope positions)."""
  b, p = prompt['text'].shape
  dev = prompt['text'].device
  key_valid = torch.zeros(b, slots, dtype=torch.bool, device=dev)
  key_valid[:, :p] = prompt['valid'].bool()
  ref = model.reference_embedding(ref_codes) if ref_codes is not None else None
  # The prompt's last slot predicts frame 0, so it carries that melody.
  mel = prompt['melody'].clone()
  last = mel[:, -1]
  mel[:, -1] = torch.where(last < 0, melody[:, 0], last)
  x = model.embed(prompt['text'], prompt['audio'], mel, ref,
                  None if ref_valid is None else ref_valid.bool(), uncond)
  cache = model.backbone.init_cache(b, slots)
  h = model.backbone(x, prompt['positions'],
                     transformer.cache_mask(key_valid, 0, p), cache, 0)
  rope = prompt['valid'].long().sum(dim=1)
  return h[:, -1], cache, key_valid, rope


def _backbone_step(model, text, audio, melody, rope, key_valid, cache, index):
  x = model.step_embed(text[:, None], audio[:, None], melody[:, None])
  h = model.backbone(x, rope[:, None], transformer.cache_mask(key_valid, index, 1),
                     cache, index)
  return h[:, 0]


def _no_end(logits: torch.Tensor, end: int, early) -> torch.Tensor:
  """Classes >= END removed from logits [n, W] in the rows `early` [n]."""
  if early is None or logits.shape[-1] <= end:
    return logits
  is_end = torch.arange(logits.shape[-1], device=logits.device) >= end
  return logits.masked_fill(early[:, None] & is_end, -float('inf'))


def _local_frame(model: AudioLM, h_last, sampler: Sampler, forced, early):
  """Codebooks 0..K-1 of the next frame from the global hidden [B,E].
  `forced` [B,K] (teacher) replaces the samples; `early` [n] bars END.
  Returns (codes [B,K], global logits [n,W0], local logits [n,K-1,W])."""
  b, k = h_last.shape[0], model.num_codebooks
  g0 = _no_end(sampler.guide(model.global_logits(h_last)), model.end_id, early)
  c0 = sampler.pick(g0, b) if forced is None else forced[:, 0]
  codes, local_logits = [c0], []
  lcache = model.local.init_cache(b, k)
  lvalid = torch.ones(b, k, dtype=torch.bool, device=h_last.device)
  # Position 0: the global hidden state; position 1: codebook 0's embedding.
  xin = torch.stack([model.local_proj(h_last), model.local_in_code(0, c0)], 1)
  pos = torch.arange(2, device=h_last.device).expand(b, 2)
  out = model.local(xin, pos, transformer.cache_mask(lvalid, 0, 2), lcache, 0)
  last = out[:, 1]
  for i in range(1, k):
    logits = _no_end(sampler.guide(model.local_heads[i - 1](last).float()),
                     model.end_id, early)
    local_logits.append(logits)
    ci = sampler.pick(logits, b) if forced is None else forced[:, i]
    codes.append(ci)
    if i + 1 < k:
      xin = model.local_in_code(i, ci)[:, None]
      pos = torch.full((b, 1), i + 1, device=h_last.device)
      last = model.local(xin, pos, transformer.cache_mask(lvalid, i + 1, 1),
                         lcache, i + 1)[:, 0]
  return torch.stack(codes, -1), g0, torch.stack(local_logits, 1)


def _inputs(model, prompt, max_frames, melody):
  """The prompt as int64 ids (and bool validity), and the melody ids of the
  frames to generate (NULL: no melody condition)."""
  b = prompt['text'].shape[0]
  if melody is None:
    melody = torch.full((b, max_frames), int(model.facts['melody_null']),
                        dtype=torch.long, device=prompt['text'].device)
  prompt = {k: x.bool() if k in ('valid', 'uncond') else x.long()
            for k, x in prompt.items()}
  return prompt, melody.long()


def decode(model: AudioLM, prompt, sampler: Sampler, max_frames: int,
           min_frames: int, sections, melody, ref_codes, ref_valid, teacher,
           record_logits: bool) -> dict[str, torch.Tensor]:
  """global_local generation, one slot per step for every row (as the JAX
  loop): audio mode samples a frame (END ends the section or the song); text
  mode (interleaved) feeds the next section's left-padded text, whose pads
  are invalid slots that do not advance the row's position."""
  prompt, melody = _inputs(model, prompt, max_frames, melody)
  b, p = prompt['text'].shape
  k, nf, n = model.num_codebooks, max_frames, sampler.num_cond
  ns, ls = (0, 0) if sections is None else tuple(sections.shape[1:])
  steps = nf + ns * (ls + 1) + 1
  end = model.end_id
  dev = prompt['text'].device
  h, cache, key_valid, rope = _prefill(model, prompt, melody, ref_codes,
                                       ref_valid, p + steps, prompt.get('uncond'))
  rows = torch.arange(b, device=dev)
  frames = torch.zeros(b, nf, k, dtype=torch.long, device=dev)
  count = torch.zeros(b, dtype=torch.long, device=dev)
  done = torch.zeros(b, dtype=torch.bool, device=dev)
  text_mode = torch.zeros_like(done)
  sec = torch.zeros_like(count)
  ptr = torch.zeros_like(count)
  tptr = torch.zeros_like(count)
  w0, wl = head_widths(model.config)
  lg = torch.zeros(n, steps, w0, device=dev) if record_logits else None
  ll = torch.zeros(n, steps, k - 1, wl, device=dev) if record_logits else None
  empty = torch.full((b,), EMPTY, dtype=torch.long, device=dev)
  for step in range(steps):
    if bool(done.all()):
      break
    audio_mode = ~text_mode & ~done
    forced = None
    if teacher is not None:
      forced = teacher[rows, tptr.clamp(max=teacher.shape[1] - 1)].long()
    early = (count[:n] < min_frames) if min_frames else None
    frame, g0, gl = _local_frame(model, h, sampler, forced, early)
    is_end = (frame >= end).any(dim=-1)
    emit = audio_mode & ~is_end
    at = count.clamp(max=nf - 1)
    frames[rows, at] = torch.where(emit[:, None], frame, frames[rows, at])
    count = count + emit.long()
    # Section / song ends.
    ended = audio_mode & is_end
    more = sec < ns
    new_done = done | (ended & ~more) | (count >= nf)
    to_text = ended & more
    # Text mode: the next token of the current section's text.
    if ns:
      tok = sections[rows, sec.clamp(max=ns - 1), ptr.clamp(max=ls - 1)].long()
    else:
      tok = empty
    in_text = text_mode & ~done
    ptr = torch.where(in_text, ptr + 1, torch.where(to_text, 0, ptr))
    leave_text = in_text & (ptr >= ls)
    text_mode = (text_mode | to_text) & ~leave_text
    sec = sec + leave_text.long()
    # The slot written now.
    audio_slot = torch.where(emit[:, None], frame, torch.full_like(frame, EMPTY))
    audio_slot[:, 0] = torch.where(ended, end, audio_slot[:, 0])
    text_slot = torch.where(in_text, tok, empty)
    slot_valid = (emit | ended | (in_text & (tok >= 0))) & ~done
    # Melody of the frame the next slot predicts (if it predicts one).
    next_audio = ~text_mode & ~new_done
    mel = torch.where(next_audio, melody[rows, count.clamp(max=nf - 1)], empty)
    index = p + step
    key_valid[:, index] = slot_valid
    h = _backbone_step(model, text_slot, audio_slot, mel, rope, key_valid, cache,
                       index)
    rope = rope + slot_valid.long()
    tptr = tptr + audio_mode.long()
    done = new_done
    if record_logits:
      lg[:, step], ll[:, step] = g0, gl
  out = {'codes': frames[:n], 'num_frames': count[:n]}
  if record_logits:
    out.update(logits_global=lg, logits_local=ll)
  return out


def decode_stream(model: AudioLM, prompt, sampler: Sampler, max_frames: int,
                  min_frames: int, sections, melody, ref_codes, ref_valid,
                  teacher, record_logits: bool) -> dict[str, torch.Tensor]:
  """single_stream generation: one pattern step per iteration, all K
  codebooks of the step at once; END (codebook 0) ends the song."""
  if sections is not None:
    raise ValueError('single_stream models take no sections (the interleaved '
                     'layout needs the global_local variant)')
  prompt, melody = _inputs(model, prompt, max_frames, melody)
  b, p = prompt['text'].shape
  k, v, nf, n = model.num_codebooks, model.codebook_size, max_frames, sampler.num_cond
  dev = prompt['text'].device
  pat = Pattern(model.pattern, k, nf + 1)
  steps = pat.num_steps
  end, special = model.end_id, model.special_id
  complete = [pat.frames_done(s + 1) for s in range(steps)]
  null = int(model.facts['melody_null'])
  # Steps without a codebook-0 frame read the NULL appended at frame nf.
  melody = torch.cat([melody, torch.full((b, 1), null, dtype=torch.long,
                                         device=dev)], 1)
  frame_of = np.where(pat.valid[:, 0], pat.frame_index[:, 0], nf)
  h, cache, key_valid, rope = _prefill(model, prompt, melody, ref_codes,
                                       ref_valid, p + steps)
  rows = torch.arange(b, device=dev)
  grid = torch.zeros(b, nf + 1, k, dtype=torch.long, device=dev)
  end_frame = torch.full((b,), nf, dtype=torch.long, device=dev)
  done = torch.zeros(b, dtype=torch.bool, device=dev)
  lg = torch.zeros(n, steps, k, v + 1, device=dev) if record_logits else None
  no_text = torch.full((b,), EMPTY, dtype=torch.long, device=dev)
  ran = 0
  for step in range(steps):
    if bool(done.all()):
      break
    ran = step + 1
    logits = sampler.guide(model.stream_logits(h))
    fidx, valid = pat.frame_index[step], pat.valid[step]
    if min_frames and fidx[0] < min_frames:
      logits[:, 0, end] = -float('inf')
    if teacher is None:
      toks = sampler.pick(logits, b)
    else:
      toks = teacher[:, min(step, teacher.shape[1] - 1)].long()
    # END only means something in codebook 0; elsewhere it becomes a code.
    toks = torch.cat([toks[:, :1], toks[:, 1:].clamp(max=v - 1)], 1)
    toks = torch.where(torch.as_tensor(valid, device=dev)[None], toks,
                       torch.full_like(toks, special))
    if valid[0]:
      new_end = (toks[:, 0] == end) & (end_frame > fidx[0])
      end_frame = torch.where(new_end, int(fidx[0]), end_frame)
    for i in np.flatnonzero(valid):
      grid[:, int(fidx[i]), i] = toks[:, i]
    slot_valid = ~done
    done = done | (complete[step] >= end_frame)
    index = p + step
    key_valid[:, index] = slot_valid
    nxt = min(step + 1, steps - 1)
    mel = melody[rows, int(frame_of[nxt])]
    h = _backbone_step(model, no_text, toks, mel, rope, key_valid, cache, index)
    rope = rope + slot_valid.long()
    if record_logits:
      lg[:, step] = logits
  count = torch.clamp(end_frame, max=max(complete[ran - 1], 0))
  out = {'codes': grid[:n, :nf], 'num_frames': count[:n]}
  if record_logits:
    out['logits_stream'] = lg
  return out
