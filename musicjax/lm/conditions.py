"""Condition text -> text-column ids, shared by the training pipeline and `generate`.

A dropped or missing field becomes its learned null token (classifier-free
guidance), so a null condition is a real, trained input rather than nothing:

  tags      '<tag>genre: chorale; ...</tag>'   or '<null_tags>'
  lyrics    '<lyrics>[verse] ...</lyrics>'     or '<null_lyrics>'
  reference '<ref>' (its slot gets the pooled reference embedding) or '<null_ref>'
  section   '[verse] <style>..</style> text'   or '<null_section>', then '<audio>'
"""
from __future__ import annotations

from musicjax.data import text as text_lib
from musicjax.lm import layout


class ConditionText:
  """Builds id lists with one tokenizer for an LM of `text_vocab_size` ids."""

  def __init__(self, tokenizer: text_lib.TextTokenizer, text_vocab_size: int):
    self.tok = tokenizer
    self.vocab = text_vocab_size
    self.bos = tokenizer.special_id('<bos>')
    self.lyrics_open = tokenizer.special_id('<lyrics>')
    self.lyrics_close = tokenizer.special_id('</lyrics>')

  def extra(self, token: str) -> int:
    return layout.extra_id(self.vocab, token)

  def tags(self, tags_text: str | None) -> list[int]:
    if not tags_text:
      return [self.extra('<null_tags>')]
    return self.tok.encode(tags_text)

  def lyrics(self, lyrics_text: str | None, budget: int) -> list[int]:
    """'<lyrics> ... </lyrics>' cut to `budget` ids (the closing tag kept)."""
    if not lyrics_text or budget < 3:
      return [self.extra('<null_lyrics>')]
    body = self.tok.encode(lyrics_text)[:budget - 2]
    return [self.lyrics_open] + body + [self.lyrics_close]

  def reference(self, present: bool) -> list[int]:
    return [self.extra('<ref>' if present else '<null_ref>')]

  def prefix(self, tags_text: str | None, lyrics_text: str | None,
             has_ref: bool, budget: int) -> list[int]:
    """The whole condition before the audio (HeartMuLa), ending in '<audio>'."""
    head = [self.bos] + self.tags(tags_text)
    tail = self.reference(has_ref) + [self.extra('<audio>')]
    head = head[:max(budget - len(tail) - 1, 1)]
    return head + self.lyrics(lyrics_text, budget - len(head) - len(tail)) + tail

  def global_style(self, tags_text: str | None, has_ref: bool,
                   budget: int) -> list[int]:
    """Interleaved layout: global style first (Muse)."""
    ids = [self.bos] + self.tags(tags_text)
    ids = ids[:max(budget - 1, 1)]
    return ids + self.reference(has_ref)

  def section(self, section_text: str | None, budget: int) -> list[int]:
    """One section's text, ending in '<audio>' (its audio follows)."""
    if not section_text or budget < 2:
      return [self.extra('<null_section>'), self.extra('<audio>')]
    return self.tok.encode(section_text)[:budget - 1] + [self.extra('<audio>')]
