"""Evaluation of exported models (reads Hugging Face model directories only; imports neither
engine nor pruning).

- ``metrics``: accuracy, F1, Matthews, Pearson/Spearman, SQuAD v1.1/v2.0 (official rules).
- ``tasks``: the task registry (offline ``rt-polarity``/``rt-score``/``tweets-3class``, GLUE,
  SQuAD; hub or local files).
- ``finetune``: fine-tune + score; ``probe``: linear probe, latency, parameter counts.
- ``report``: ``evaluate_models`` / ``evaluate_main`` -> ``eval_results.json`` + ``.md``.
"""
