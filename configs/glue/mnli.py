"""GLUE mnli: FP32 fine-tuning recipe (see configs/glue/common.py for the sources)."""
from configs.glue import common


def get_config():
  # eval.py reports validation_matched ('validation') and validation_mismatched.
  return common.glue('mnli', learning_rate=2e-5, batch_size=32, num_epochs=3)  # [BERT]
