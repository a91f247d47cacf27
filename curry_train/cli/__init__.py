"""The commands: console scripts (pyproject.toml), each with a ``scripts/*.py`` shim.

* ``curry-train`` (``python train.py``): compose a run with Hydra, check it, train;
* ``curry-validate`` (``scripts/validate.py``): whitebox check of a layout against one process;
* ``curry-bench`` (``scripts/bench.py``): throughput, memory, layouts side by side, bubble, CP;
* ``curry-advise`` (``scripts/advise.py``): the lightest layout that fits, and why;
* ``curry-capacity`` (``scripts/capacity_sweep.py``): the largest model or micro-batch each layout fits;
* ``curry-runs-diff`` (``scripts/runs_diff.py``): config diff, metrics and loss curves of runs;
* ``curry-export`` (``scripts/export_checkpoint.py``): a checkpoint's weights as safetensors;
* ``curry-tokenize`` (``scripts/tokenize_data.py``): text to a token file for ``data=tokens``.
"""
