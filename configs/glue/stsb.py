"""GLUE stsb: FP32 fine-tuning recipe (see configs/glue/common.py for the sources)."""
from configs.glue import common


def get_config():
  # W8A{8,16} for this regression task (original README): --config.quant.quant_dict="{'y': 16, 'h': 16, 'x': 16, 'P': 16, 'C': 16}" --config.quant.quant_setup=MSE_logits
  return common.glue('stsb', learning_rate=2e-5, batch_size=32, num_epochs=3)  # [BERT]
