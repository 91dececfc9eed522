"""Evaluation: perplexity and outlier statistics (inf norm, kurtosis), reports and plots.

  from oqt_jax.evaluate import outliers
  metrics = outliers.evaluate(model, variables, batches)      # one jitted forward per batch
  from oqt_jax.evaluate.run import evaluate_run                # what eval.py does
"""
from oqt_jax.evaluate.outliers import (HEADLINE, TENSORS, evaluate, format_summary,
                                       format_table, inf_norm_per_sequence, kurtosis_per_row,
                                       kurtosis_per_sequence)

__all__ = ['HEADLINE', 'TENSORS', 'evaluate', 'format_summary', 'format_table',
           'inf_norm_per_sequence', 'kurtosis_per_row', 'kurtosis_per_sequence']
