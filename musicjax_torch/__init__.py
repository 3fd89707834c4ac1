"""PyTorch models for musicjax exports (needs only torch, numpy, safetensors).

    import musicjax_torch
    codec = musicjax_torch.from_pretrained('exports/codec')
    codes = codec.encode(audio)          # audio [B, T, C] float
    musicjax_torch.save_pretrained(codec, 'exports/codec-tuned')

An export directory is written by `musicjax export` (or save_pretrained) and
read back into JAX by `musicjax import-torch`; see musicjax_torch/io.py.
"""
from musicjax_torch.io import ExportError, from_pretrained, save_pretrained

__all__ = ['ExportError', 'from_pretrained', 'save_pretrained']
