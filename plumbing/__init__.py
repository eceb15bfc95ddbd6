"""The plumbing every script shares and no paper describes: one-line errors, data sets, presets and the
command line, the run folders' names, networks built from configs, training utilities (checkpoints, RNG
state, EMA, logs, progress), metrics and reports, and what torchrun changes (`distributed.py`).

The algorithms are in the top-level files: `common.py` (the shared math and the networks) and one file
per paper. The plumbing stands on `common.py` and knows no method file (tests/test_layers.py).
"""
