"""OPT-350m (pre-LN, project_in/out 768 <-> 1024), gated attention: conditional_per_token,
gate_init 0.25 (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.gated_attention(recipes.opt_350m())
