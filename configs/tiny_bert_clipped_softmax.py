"""Tiny BERT (clipped_softmax recipe) that trains on the embedded corpus on a CPU."""
from configs import recipes


def get_config():
  return recipes.tiny(recipes.clipped_softmax(recipes.bert_base()))
