"""GLUE rte: FP32 fine-tuning recipe (see configs/glue/common.py for the sources)."""
from configs.glue import common


def get_config():
  return common.glue('rte', learning_rate=3e-5, batch_size=8, num_epochs=3)  # [README]
