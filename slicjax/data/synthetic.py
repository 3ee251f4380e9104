"""A small built-in seq2seq task: inputs are random token strings, targets their reversal + EOS.

Useful for tests and benchmarks that must not depend on any dataset.
"""

from __future__ import annotations

import numpy as np

from slicjax.models.seq_model import EOS_ID

FIRST_TOKEN = 4  # ids 0..3 are pad, eos, bos, unk


def reverse_task(
  num_examples: int, *, vocab_size: int = 32, min_len: int = 2, max_len: int = 8, seed: int = 0
) -> list[dict[str, np.ndarray]]:
  """Examples ``{"inputs": x, "targets": reversed(x) + [EOS]}`` (unpadded int32 arrays)."""
  if vocab_size <= FIRST_TOKEN + 1:
    raise ValueError(f"vocab_size must exceed {FIRST_TOKEN + 1}, got {vocab_size}.")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_examples):
    n = int(rng.integers(min_len, max_len + 1))
    x = rng.integers(FIRST_TOKEN, vocab_size, size=n).astype(np.int32)
    out.append({"inputs": x, "targets": np.concatenate([x[::-1], [EOS_ID]]).astype(np.int32)})
  return out
