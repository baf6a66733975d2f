"""Evaluation and benchmarking: accuracy-versus-FLOPs grids (runner, offline tasks, lmms-eval bridge, report)
and the latency / memory benchmark (:mod:`tokprune.eval.bench`).

Nothing here is imported by ``import tokprune``, and no module of the core imports lmms_eval.
"""
