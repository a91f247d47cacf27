"""Planning a run by arithmetic: which layout fits, how long a step takes, how large a model fits.

``layout`` names layouts and parses them; ``memory`` and ``step_time`` estimate a rank's bytes and a
step's seconds; ``advise`` walks the decision guide; ``families``, ``capacity``, ``capacity_report``
and ``trials`` sweep model sizes; ``plot`` draws the charts. The derivations are in docs/planning.md.
Nothing here imports the training path (``run``, ``launch``, ``strategy``, ``module``), the commands
(``cli``) or ``validation``, which measures what these modules estimate.
"""
