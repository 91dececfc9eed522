"""OPT-125m (12L12H), vanilla softmax (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.vanilla(recipes.opt_125m())
