"""Where quantization state lives and how tensors are laid out: the name of the Flax variable
collection holding every quantizer's state, the axes a weight's range reduces over, and the
token mask broadcast to a tensor. Shared by the hooks, the int8 adapter and the methods.
"""
from __future__ import annotations

COLLECTION = 'quant'
TIED_TABLES = ('Et', 'Ep', 'Ets', 'wM')   # (rows, features) tables: output channel = axis 0


def token_mask_for(x, mask):
  """The (B, T) token mask broadcast for x: (B,T,D) -> (B,T,1); (B,H,T,T) -> query & key valid."""
  if mask is None:
    return None
  mask = mask.astype(bool)
  if mask.ndim == x.ndim and mask.ndim > 2:   # already per entry (broadcastable)
    return mask
  if x.ndim == 4 and mask.ndim == 2 and x.shape[2] == x.shape[3] == mask.shape[1]:
    return mask[:, None, :, None] & mask[:, None, None, :]
  if x.ndim >= mask.ndim and tuple(x.shape[:mask.ndim]) == tuple(mask.shape):
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
  return None


def weight_reduce_axes(name: str, w, per_channel: bool) -> tuple[int, ...]:
  """Axes the weight's range reduces over: all (per tensor) or all but the output channel."""
  if not per_channel or w.ndim < 2:
    return tuple(range(w.ndim))
  channel = 0 if name in TIED_TABLES else w.ndim - 1   # Dense kernels are (in, out)
  return tuple(a for a in range(w.ndim) if a != channel)
