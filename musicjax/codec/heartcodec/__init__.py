"""HeartCodec's decode path in JAX: codes -> flow-matching latent -> waveform.

config.py (numbers), code_embedding.py, timestep.py + ada_block.py +
estimator.py (the velocity transformer), flow_matching.py (Euler sampler),
scalar_decoder.py (waveform decoder), windows.py + decoder.py (whole songs).
heartlib's checkpoint folders load with musicjax/export/released/heartcodec.py.
"""
