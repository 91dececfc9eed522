"""BERT-base, vanilla softmax (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.vanilla(recipes.bert_base())
