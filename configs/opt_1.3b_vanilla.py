"""OPT-1.3B (pre-LN, project_in/out 768 <-> 2048), vanilla softmax (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.vanilla(recipes.opt_1_3b())
