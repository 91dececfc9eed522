"""Model output container (same fields for FP, quantized and int8 models)."""
from typing import Any, Optional

import flax


@flax.struct.dataclass
class ModelOutput:
  """logits: (B, T, V) for LM heads, (B, num_labels) for classification, None without head.

  hidden_states: embeddings output first, final encoder/decoder output last (HF convention).
  """
  logits: Optional[Any]
  hidden_states: tuple
  last_hidden_state: Any
  pooler_output: Optional[Any] = None
