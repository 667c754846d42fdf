"""Evaluation and promotion: candidate vs base on held-out tasks, statistics, gate, report.

`models` resolves the two models, `items` the evaluation data, `tasks` the task kinds
(registry `TASKS`), `gate` the per-metric comparison and the decision, `report` and
`card` what is written. The stage that runs them is orchestrator/stages/eval.py; the
statistics are pure functions in orchestrator/algos/eval_stats.py.
"""
