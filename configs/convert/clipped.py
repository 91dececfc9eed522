"""Checkpoint conversion by distillation, variant 'clipped' (see configs/convert/common.py)."""
from configs.convert import common


def get_config():
  return common.convert('clipped')
