"""Speed benchmarks (`musicjax bench WHAT`). Each prints what it measured, on
what, against what target.

machine.py describes where a figure was measured (CPU, cores, load, GEMM
peak); measure.py times jitted calls. One module per benchmark: codec.py,
lm.py, accomp.py (and accomp_experiments.py, small training runs), kernels.py
(the decode-attention kernel).
"""
