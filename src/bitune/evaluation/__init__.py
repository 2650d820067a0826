"""Evaluation: benchmark tasks (`bitune.evaluation.tasks`) and lm-eval-compatible metrics (`bitune.evaluation.metrics`)."""
