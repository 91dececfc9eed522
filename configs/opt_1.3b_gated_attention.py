"""OPT-1.3B (pre-LN, project_in/out 768 <-> 2048), gated attention: conditional_per_token
over all features (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.gated_attention(recipes.opt_1_3b())
