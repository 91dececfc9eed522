"""Small OPT, vanilla softmax, on the synthetic Bigram-Backcopy task (CPU-sized)."""
from configs import recipes


def get_config():
  return recipes.bigram_backcopy(recipes.vanilla(recipes.opt_125m()))
