"""Evaluation: report-quality metrics (`echocxr.eval.metrics`) and bootstrap confidence intervals."""
