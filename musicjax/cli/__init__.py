"""`musicjax <verb>`: wires configs to library entry points. Nothing else lives here.

app.py parses argv and dispatches through a table verb -> handler; each verb
(or pair of verbs) has its own module that adds its subparser and holds its
handler: train, evaluate (eval), encode_decode, codec_quality, prepare,
tokenizer, generate, accompany, prefs, export (export, import-torch),
import_released (import-heartmula), bench.
flags.py and configs.py hold what several verbs share.
"""
from musicjax.cli.app import configure_logging
from musicjax.cli.app import main

__all__ = ['configure_logging', 'main']
