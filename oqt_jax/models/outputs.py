"""Model output container (same fields for FP, quantized and int8 models)."""
from typing import Any, Optional

import flax


@flax.struct.dataclass
class ModelOutput:
  """logits: (B, T, V) for LM heads, (B, num_labels) for classification, None without head.

  hidden_states: embeddings output first, final encoder/decoder output last (HF convention).
  lm_loss: (sum, count) of the causal-LM loss when the model was called with `loss_labels`
    (OPT); the logits are then computed, quantized and reduced in chunks of positions and
    not returned (logits=None) where the quantization hooks allow it (none, 'frozen', 'fp').
  """
  logits: Optional[Any]
  hidden_states: tuple
  last_hidden_state: Any
  pooler_output: Optional[Any] = None
  lm_loss: Optional[Any] = None
