"""OPT-1.3B, vanilla softmax (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.vanilla(recipes.opt_1_3b())
