"""The plumbing every script shares and no paper describes: data sets, networks, presets and the
command line, training utilities (checkpoints, RNG state, EMA, logs, progress), metrics and reports, and what
torchrun changes (`distributed.py`).

The algorithms are in the top-level files: `common.py` (the shared math) and one file per paper.
"""
