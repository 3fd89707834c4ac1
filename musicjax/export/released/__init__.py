"""Released checkpoints of other projects into our models: reader.py (a
folder's safetensors), mapping.py (their tensors -> our state, checked), one
module per model family (heartmula.py, heartcodec.py)."""
