"""Tiny BERT (gated_attention recipe) that trains on the embedded corpus on a CPU."""
from configs import recipes


def get_config():
  return recipes.tiny(recipes.gated_attention(recipes.bert_base()))
