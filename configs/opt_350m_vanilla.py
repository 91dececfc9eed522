"""OPT-350m (pre-LN, project_in/out 768 <-> 1024), vanilla softmax (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.vanilla(recipes.opt_350m())
