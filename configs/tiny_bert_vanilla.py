"""Tiny BERT (vanilla recipe) that trains on the embedded corpus on a CPU."""
from configs import recipes


def get_config():
  return recipes.tiny(recipes.vanilla(recipes.bert_base()))
