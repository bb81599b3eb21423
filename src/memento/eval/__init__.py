"""Evaluation: run a model through the engine on a task set, grade, measure KV, write a report.

- :mod:`~memento.eval.grading`: exact, multiple-choice and math (math-verify) grading, own timeout;
- :mod:`~memento.eval.metrics`: pass@1, unbiased pass@k, maj@k, KV summaries;
- :mod:`~memento.eval.kvsim`: the KV memory real model sizes would need for the same traces;
- :mod:`~memento.eval.tasks`: problem sets (synthetic tasks, JSONL / Parquet / HF datasets);
- :mod:`~memento.eval.run`: generation under each mode (memento, vanilla, keep-N, restart);
- :mod:`~memento.eval.report`: report.md and the plots.
"""
