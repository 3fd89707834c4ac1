"""`musicjax tokenizer`: the text tokenizer (`musicjax.data.text`), trained."""
from __future__ import annotations

import logging
from typing import Any

import ml_collections

from musicjax.data import song_text
from musicjax.data import sources
from musicjax.data import text

logger = logging.getLogger('musicjax.data')


def tokenizer_main(config: ml_collections.ConfigDict,
                   out_path: str) -> dict[str, Any]:
  """`musicjax tokenizer`: trains the text tokenizer on the train split.

  Texts are the formatted tags, lyrics and section texts of every train piece
  of `config.data`; the vocabulary size is `config.data.text_vocab_size` if
  the config has it, else `text.DEFAULT_VOCAB_SIZE`.

  Returns:
    A summary: path, vocab_size (as trained), requested_vocab_size, pieces,
    texts, characters.
  """
  vocab_size = int(config.data.get('text_vocab_size', text.DEFAULT_VOCAB_SIZE))
  if vocab_size < text.MIN_VOCAB_SIZE:
    raise text.VocabSizeError(
        f'config.data.text_vocab_size={vocab_size} is too small: the text '
        f'tokenizer needs at least {text.MIN_VOCAB_SIZE}; set '
        f'--config.data.text_vocab_size={text.DEFAULT_VOCAB_SIZE}')
  texts: list[str] = []
  items = sources.items(config, 'train')
  for item in items:
    try:
      texts.extend(text.piece_texts(item['meta']))
    except song_text.BadSongMetadata as e:
      raise song_text.BadSongMetadata(f'{item["name"]}: {e}') from e
  if not texts:
    logger.warning('musicjax: the %d train pieces of %s have no tags or '
                   'lyrics; the text tokenizer will have only byte tokens',
                   len(items), sources.describe(config))
  tok = text.TextTokenizer.train(texts, vocab_size, out_path)
  summary = {'path': tok.path, 'vocab_size': tok.vocab_size,
             'requested_vocab_size': vocab_size, 'pieces': len(items),
             'texts': len(texts), 'characters': sum(len(t) for t in texts)}
  logger.info('musicjax: wrote text tokenizer %s', summary)
  return summary
