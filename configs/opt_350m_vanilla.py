"""OPT-350m, vanilla softmax (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.vanilla(recipes.opt_350m())
