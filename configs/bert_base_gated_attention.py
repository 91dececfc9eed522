"""BERT-base, gated attention: conditional_per_token with an MLP gate (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.gated_attention(recipes.bert_base())
