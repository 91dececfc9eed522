"""GLUE wnli: FP32 fine-tuning recipe (see configs/glue/common.py for the sources)."""
from configs.glue import common


def get_config():
  return common.glue('wnli', learning_rate=2e-5, batch_size=32, num_epochs=3)  # [BERT]
