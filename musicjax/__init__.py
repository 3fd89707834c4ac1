"""musicjax: JAX/Flax training stack for music generation."""
__version__ = "0.1.0"
