"""Loads a HeartCodec checkpoint folder (heartlib's layout) into our decoder.

The folder is what heartlib's `HeartCodec.save_pretrained` writes and
`from_pretrained` reads: config.json (model_type 'heartcodec') and
model.safetensors, or shards model-0000i-of-0000n.safetensors listed in
model.safetensors.index.json (reader.py).

Every decoder tensor maps onto exactly one of our arrays, with its shape
checked against the config; tensors decode never reads are named in
`IGNORED` (encoder side, VQ training statistics) and anything else is an
error, as is a missing tensor, a wrong shape or a truncated file
(mapping.py).
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from musicjax.codec.heartcodec import config as config_lib
from musicjax.codec.heartcodec.decoder import HeartCodecDecoder
from musicjax.config import flatten
from musicjax.export.released import mapping as M
from musicjax.export.released import reader as reader_lib

SINGLE = reader_lib.SINGLE
INDEX = reader_lib.INDEX
CONFIG = M.CONFIG

# Tensors heartlib's checkpoint holds that decoding never reads.
IGNORED = (
    # The waveform encoder of the scalar-quantized codec.
    r'scalar_model\.encoder\..*',
    # The VQ's input projection (encoding) and its codebooks' EMA statistics.
    r'flow_matching\.vq_embed\.project_in\..*',
    r'flow_matching\.vq_embed\.layers\.\d+\._codebook\.'
    r'(initted|cluster_size|embed_avg)',
    # Condition for frames past the codes' length; detokenize conditions
    # every frame, and the unconditional branch of guidance uses zeros.
    r'flow_matching\.zero_cond_embedding1',
)


class HeartCodecWeightsError(reader_lib.WeightsError):
  """A HeartCodec folder that cannot be loaded; the message names the file and
  the tensor."""


# ---- heartlib's layout -> ours --------------------------------------------------
# Our ada block's arrays -> a heartlib estimator block's tensors.
_LAYER = {'table': 'scale_shift_table',
          'attn_norm/scale': 'attn_norm.weight',
          'mlp_norm/scale': 'mlp_norm.weight',
          'attn/wq': 'attn.q_proj.weight',
          'attn/wk': 'attn.k_proj.weight',
          'attn/wv': 'attn.v_proj.weight',
          'attn/wo': 'attn.o_proj.weight',
          'mlp/gate': 'mlp.gate.weight',
          'mlp/up': 'mlp.up.weight',
          'mlp/down': 'mlp.down.weight'}

# Transposed conv [in, out, 2 * stride] -> polyphase [tap, in, stride, out]
# with tap j holding kernel positions (1 - j) * stride + r.
_UP_V = M.Rule(
    lambda w: w.reshape(w.shape[0], w.shape[1], 2, -1)[:, :, ::-1]
    .transpose(2, 0, 3, 1),
    lambda s: (s[1], s[3], 2 * s[2]))


def _sources(c: ml_collections.ConfigDict) -> dict[str, M.Source]:
  """Our state path -> the heartlib tensor(s) it is read from."""
  e, s = c.estimator, c.scalar
  h, d = int(e.num_heads), int(e.head_dim)
  m: dict[str, M.Source] = {}
  fm, est = 'flow_matching.', 'flow_matching.estimator.'

  def one(ours, theirs, rule):
    m[ours] = M.Source([theirs], rule)

  m['codes/codebooks'] = M.Source(
      [f'{fm}vq_embed.layers.{q}._codebook.embed'
       for q in range(int(c.codes.num_quantizers))], M.ROW, stacked=True)
  for ours, theirs in (('codes/project', 'vq_embed.project_out'),
                       ('codes/features', 'cond_feature_emb')):
    one(f'{ours}/w', f'{fm}{theirs}.weight', M.LINEAR)
    one(f'{ours}/b', f'{fm}{theirs}.bias', M.SAME)

  for ours, theirs in (('proj_in', 'proj_in'), ('connect', 'connection_proj'),
                       ('proj_out', 'proj_out')):
    one(f'estimator/{ours}/conv_w', f'{est}{theirs}.ffn_1.weight', M.CONV)
    one(f'estimator/{ours}/conv_b', f'{est}{theirs}.ffn_1.bias', M.SAME)
    one(f'estimator/{ours}/linear/w', f'{est}{theirs}.ffn_2.weight', M.LINEAR)
    one(f'estimator/{ours}/linear/b', f'{est}{theirs}.ffn_2.bias', M.SAME)
  for i, suffix in ((1, ''), (2, '_2')):
    one(f'estimator/table_{i}', f'{est}scale_shift_table{suffix}', M.SAME)
    ada = f'{est}adaln_single{suffix}.'
    for ours, theirs in (('embed_in', 'emb.timestep_embedder.linear_1'),
                         ('embed_out', 'emb.timestep_embedder.linear_2'),
                         ('modulation', 'linear')):
      one(f'estimator/time_{i}/{ours}/w', f'{ada}{theirs}.weight', M.LINEAR)
      one(f'estimator/time_{i}/{ours}/b', f'{ada}{theirs}.bias', M.SAME)

  for i, blocks, n, hd in ((1, 'transformer_blocks', e.num_layers, d),
                           (2, 'transformer_blocks_2', e.num_layers_2, 2 * d)):
    m.update(M.layers(f'estimator/stack_{i}/layers/',
                      lambda j, blocks=blocks: f'{est}{blocks}.{j}.',
                      int(n), _LAYER,
                      {**M.block_rules(h, h, hd, rotary=True),
                       'table': M.SAME}))

  sq = 'scalar_model.decoder.'

  def wn_conv(ours, theirs):
    one(f'{ours}/v', f'{theirs}.parametrizations.weight.original1', M.CONV)
    one(f'{ours}/g', f'{theirs}.parametrizations.weight.original0', M.WN_G)
    one(f'{ours}/bias', f'{theirs}.bias', M.SAME)

  wn_conv('scalar/delay', f'{sq}0')
  n_up = len(s.upsample_factors)
  for b in range(n_up):
    theirs = f'{sq}{b + 1}'
    up = f'{theirs}.up_conv.layer'
    one(f'scalar/blocks/{b}/up/v', f'{up}.parametrizations.weight.original1',
        _UP_V)
    one(f'scalar/blocks/{b}/up/g', f'{up}.parametrizations.weight.original0',
        M.WN_G)
    one(f'scalar/blocks/{b}/up/bias', f'{up}.bias', M.SAME)
    for u in range(len(s.res_dilations)):
      ours = f'scalar/blocks/{b}/units/{u}'
      wn_conv(f'{ours}/conv1', f'{theirs}.convs.{u}.conv1')
      wn_conv(f'{ours}/conv2', f'{theirs}.convs.{u}.conv2')
      one(f'{ours}/act1/slope', f'{theirs}.convs.{u}.activation1.weight', M.SAME)
      one(f'{ours}/act2/slope', f'{theirs}.convs.{u}.activation2.weight', M.SAME)
  one('scalar/repeat_w', f'{sq}{n_up + 1}.conv.weight', M.CONV)
  one('scalar/repeat_b', f'{sq}{n_up + 1}.conv.bias', M.SAME)
  one('scalar/repeat_act/slope', f'{sq}{n_up + 1}.activation.weight', M.SAME)
  wn_conv('scalar/out', f'{sq}{n_up + 2}')
  return m


def _mapping(c: ml_collections.ConfigDict) -> M.Mapping:
  return M.Mapping(
      _sources(c), HeartCodecWeightsError, ignored=IGNORED,
      model='the HeartCodec decoder',
      missing_hint='; a checkpoint of another HeartCodec version?',
      extra_hint='a checkpoint of another model or version?')


def _make(c: ml_collections.ConfigDict):
  return lambda: HeartCodecDecoder(c, rngs=nnx.Rngs(0))


# ---- config --------------------------------------------------------------------
def read_config(folder: str,
                config: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """Our config for the folder's config.json. With `config`, its model numbers
  must be the folder's (decode settings, flow.*, are taken from it)."""
  # model_type is checked by from_heartlib_config (its ConfigError).
  d, path = M.read_config_json(folder, HeartCodecWeightsError, 'HeartCodec',
                               model_type=None)
  built = config_lib.from_heartlib_config(d, base=config, where=path)
  if config is not None:
    M.check_same(path, flatten(built), flatten(config), HeartCodecWeightsError)
  return built


# ---- loading -------------------------------------------------------------------
def check_layout(c: ml_collections.ConfigDict,
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """Checks a checkpoint's tensor names and shapes (name -> shape) against the
  decoder `c` describes, without any values: every tensor we need is there
  with its shape, and every other one is in IGNORED.

  Raises:
    HeartCodecWeightsError: naming the tensor.
  """
  M.check_layout(_mapping(c), _make(c), shapes)


def load(folder: str, config: ml_collections.ConfigDict | None = None
         ) -> HeartCodecDecoder:
  """The decoder of a HeartCodec checkpoint folder.

  Args:
    folder: holds config.json and the safetensors weights.
    config: optional; must describe the same model (see read_config). Its
      flow.* settings (windows, steps, guidance) apply; by default heartlib's.

  Raises:
    HeartCodecWeightsError / ConfigError: naming the file and tensor or key.
  """
  c = read_config(folder, config)
  reader = reader_lib.Reader(folder, HeartCodecWeightsError,
                             'a HeartCodec checkpoint folder')
  return M.load(_mapping(c), _make(c), reader)
