"""OPT-125m, clipped softmax in the alpha form: alpha=12, gamma=-12/512 (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.clipped_softmax(recipes.opt_125m())
