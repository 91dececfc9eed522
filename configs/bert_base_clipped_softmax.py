"""BERT-base, clipped softmax clipped(-.025:1) (paper Table 2)."""
from configs import recipes


def get_config():
  return recipes.clipped_softmax(recipes.bert_base())
