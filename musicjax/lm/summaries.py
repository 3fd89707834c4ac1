"""The LM's TensorBoard summaries: a clip generated for the first eval example.

At every eval step (and every `train.summary_every` steps), on the first
example of the first eval batch (the window at the start of the eval split's
first song, every condition kept):

  * prompt: the example's condition slots (tags, lyrics, reference; for the
    interleaved layout the global style and the first section's text), its
    reference segment, and the melody of each of its frames;
  * `summary.seconds` of audio tokens generated with `config.sample`'s
    settings (classifier-free guidance included), END held back until the
    clip is full, so every clip has that length. One jitted loop, compiled
    once per run: prompts are left-padded to `data.max_text_tokens` slots;
  * through the token set's codec: `audio/generated`, `audio/reference` (the
    example's real frames) and `image/spectrogram` (both, one above the other);
  * without a codec (synthetic tokens, or a codec run that cannot be loaded):
    `image/tokens`, the generated and the reference token grids; synthetic
    tokens have no frame rate, so the clip is `data.max_frames` frames long.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicjax.codec import dataset_codec as common
from musicjax.lm import data as lm_data
from musicjax.lm import generate as gen
from musicjax.lm import layout
from musicjax.lm import patterns
from musicjax.lm import sequence
from musicjax.lm import token_data
from musicjax.parallel import rules

SLOT_KEYS = ('text', 'audio', 'melody', 'positions', 'valid')
# `self.text` of a model whose text is a text encoder's context (MusicGen).
ENCODER_TEXT = 'context'


def example_parts(config: ml_collections.ConfigDict,
                  ex: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One example's slot arrays (row 0 of [1, S, ...]) -> its prompt (the slots
  before the first audio slot), its real frames [F, K] in song order and the
  melody id of each frame [F]."""
  m = config.model
  audio, mel, valid = ex['audio'][0], ex['melody'][0], ex['valid'][0]
  has_audio = valid & np.any(audio >= 0, axis=-1)
  if not has_audio.any():
    raise ValueError('the first eval example has no audio slots')
  # Without END (MusicGen) the first audio slot is the start slot: the prompt.
  a0 = int(np.argmax(has_audio)) + (0 if m.end_token else 1)
  prompt = {k: ex[k][0][:a0] for k in SLOT_KEYS}
  v, k = m.codebook_size, m.num_codebooks
  if m.variant == 'single_stream':
    # Pattern steps from a0 on -> frames; codebook 0's step carries the melody.
    steps = int(valid[a0:].sum())
    t = patterns.frames_for_steps(m.pattern, k, steps)
    pat = patterns.make_pattern(m.pattern, k, max(t, 1))
    idx = a0 + pat.step_index
    frames = audio[idx, np.arange(k)][:t]
    frame_mel = mel[idx[:t, 0] - 1]
    ends = np.nonzero(frames[:, 0] >= v)[0]
    n = int(ends[0]) if len(ends) else t
    return {'prompt': prompt, 'frames': frames[:n], 'melody': frame_mel[:n]}
  is_frame = valid & (audio[:, 0] >= 0) & (audio[:, 0] < v)
  idx = np.nonzero(is_frame)[0]
  return {'prompt': prompt, 'frames': audio[idx], 'melody': mel[idx - 1]}


def _slots(ids: list[int], config) -> dict[str, np.ndarray]:
  m = config.model
  return sequence.assemble([sequence.TextPart(ids)], len(ids),
                           m.num_codebooks, m.codebook_size)


def null_prompt(config: ml_collections.ConfigDict, text) -> dict[str, np.ndarray]:
  """The all-null condition row of guided sampling (as `musicjax generate`)."""
  budget = config.data.max_text_tokens
  if config.data.layout == 'prefix':
    ids = text.prefix(None, None, False, budget)
  else:
    head = text.global_style(None, False, budget // 2)
    ids = head + text.section(None, max(budget - len(head), 2))
  return _slots(ids, config)


class LMSummaries:
  """`LMTask.summaries`: state is built on the first call and kept (the
  token set's facts, the codec, the jitted generation loop)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._ready = False
    self._run = None
    self._reference = common.DecodeCache()

  def _setup(self) -> None:
    c = self.config
    self.codec, self.text = None, None
    self.frames = int(c.data.max_frames)
    if c.data.kind != 'synthetic':
      info = token_data.check_dataset(c)
      self.frames = max(1, int(round(c.summary.seconds * info['frame_rate'])))
      self.codec = common.DatasetCodec(info, c.data.path)
      # A text encoder's tokens come with the batch ('context_*').
      self.text = (ENCODER_TEXT if c.model.text_encoder else
                   token_data.condition_text(c))
    self.prompt_len = int(c.data.max_text_tokens)
    fit = self._frames_that_fit(self.frames)
    if fit < self.frames:
      common.say(f'config.summary.seconds={c.summary.seconds} needs more than '
                 f'config.model.max_seq_len={c.model.max_seq_len} slots; the '
                 f'summaries generate {fit} frames')
      self.frames = fit
    # Synthetic tokens carry no condition: guidance has nothing to guide.
    scale = float(c.sample.cfg_scale) if self.text is not None else 1.0
    self.cfg = scale != 1.0
    self.sampling = gen.sampling_from_config(
        c.sample, cfg_scale=scale, max_frames=self.frames,
        min_frames=self.frames, **gen.model_classes(c.model))
    self.sampling.validate()
    self._ready = True

  def _frames_that_fit(self, frames: int) -> int:
    m = self.config.model
    room = m.max_seq_len - self.prompt_len
    if m.variant == 'single_stream':
      return max(1, min(frames, patterns.frames_for_steps(
          m.pattern, m.num_codebooks, max(room, 0)) - 1))
    return max(1, min(frames, room - 1))

  def _generate_fn(self, model):
    """jit(generate) over the model's state, traced once per run."""
    if self._run is None:
      graphdef = nnx.graphdef(model)
      sampling, num_cond = self.sampling, 1

      @jax.jit
      @rules.auto_axes_inside      # the training mesh may be Explicit
      def run(params, prompt, rng, melody, ref_codes, ref_valid):
        return gen.generate(nnx.merge(graphdef, params), prompt, rng=rng,
                            sampling=sampling, num_cond=num_cond,
                            melody=melody, ref_codes=ref_codes,
                            ref_valid=ref_valid)
      self._run = run
    return self._run

  def inputs(self, ex: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(generation inputs, example parts) for one example."""
    c = self.config
    parts = example_parts(c, ex)
    rows = [parts['prompt']]
    if self.cfg:
      rows.append(rows[0] if c.model.text_encoder else
                  null_prompt(c, self.text))
    padded = [sequence.left_pad(r, self.prompt_len) for r in rows]
    prompt = {k: np.stack([p[k] for p in padded]) for k in SLOT_KEYS}
    if c.model.text_encoder:   # the null row: no valid text
      tokens, valid = ex['context_tokens'][:1], ex['context_valid'][:1]
      if self.cfg:
        tokens = np.concatenate([tokens, tokens])
        valid = np.concatenate([valid, np.zeros_like(valid)])
      prompt.update(context_tokens=tokens, context_valid=valid)
    if 'chroma' in ex:         # MusicGen-Melody; the null row: no melody
      chroma = ex['chroma'][:1]
      if self.cfg:
        chroma = np.concatenate([chroma, lm_data.chroma(c)['chroma'][None]])
      prompt['chroma'] = chroma
    mel = np.full((self.frames,), layout.MELODY_NULL, np.int32)
    n = min(self.frames, len(parts['melody']))
    mel[:n] = parts['melody'][:n]
    melody = np.stack([mel] + ([np.full_like(mel, layout.MELODY_NULL)]
                               if self.cfg else []))
    out = {'prompt': prompt, 'melody': melody, 'ref_codes': None,
           'ref_valid': None}
    if c.data.reference_frames:
      ref, ref_valid = ex['ref_codes'][:1], ex['ref_valid'][:1]
      if self.cfg:
        ref = np.concatenate([ref, np.full_like(ref, layout.EMPTY)])
        ref_valid = np.concatenate([ref_valid, np.zeros_like(ref_valid)])
      out['ref_codes'], out['ref_valid'] = ref, ref_valid
    return out, parts

  def __call__(self, model, batch: Mapping[str, Any],
               rng: jax.Array) -> dict[str, Any]:
    c = self.config
    if c.summary.seconds <= 0:
      return {}
    if not self._ready:
      self._setup()
    ex = common.first_example(batch)
    inp, parts = self.inputs(ex)
    j = lambda x: None if x is None else jnp.asarray(x)
    out = self._generate_fn(model)(
        nnx.state(model), {k: jnp.asarray(v) for k, v in inp['prompt'].items()},
        rng, j(inp['melody']), j(inp['ref_codes']), j(inp['ref_valid']))
    n = int(np.asarray(out['num_frames'])[0])
    codes = np.asarray(out['codes'])[0, :n]
    if self.codec is None or not self.codec.ready():
      return {common.TOKENS: common.token_image(
          {'generated': codes, 'reference': parts['frames']},
          c.model.codebook_size)}
    sr = self.codec.sample_rate
    wave = self.codec.decode(codes)
    ref = self._reference.get(self.codec, parts['frames'])
    return {'audio/generated': (wave, sr), 'audio/reference': (ref, sr),
            common.SPECTROGRAM: common.spectrogram_image(
                {'generated': wave, 'reference': ref}, sr)}
