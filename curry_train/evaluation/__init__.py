"""Evaluation while a run trains, and of a checkpoint: named held-out sets (``sets``), and
lm-evaluation-harness tasks over the live model in any layout (``scoring``, ``harness``)."""
