"""A small built-in seq2seq task and an in-memory, checkpointable batch iterator.

``reverse_task``: inputs are random token strings, targets their reversal followed by EOS.
Useful for tests and benchmarks that must not depend on any dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slicjax.models.seq_model import EOS_ID, PAD_ID

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


def pad_batch(examples, input_len: int, target_len: int) -> dict[str, np.ndarray]:
  """Right-pads a list of examples to fixed lengths (raises if one is longer)."""
  b = len(examples)
  inputs = np.full((b, input_len), PAD_ID, np.int32)
  targets = np.full((b, target_len), PAD_ID, np.int32)
  for i, ex in enumerate(examples):
    if len(ex["inputs"]) > input_len or len(ex["targets"]) > target_len:
      raise ValueError(
        f"example {i} has lengths ({len(ex['inputs'])}, {len(ex['targets'])}) over the padded "
        f"lengths ({input_len}, {target_len}); raise the lengths or truncate."
      )
    inputs[i, : len(ex["inputs"])] = ex["inputs"]
    targets[i, : len(ex["targets"])] = ex["targets"]
  return {"inputs": inputs, "targets": targets}


class ArrayBatchIterator:
  """Infinite, seeded, epoch-shuffled batches over a list of examples, with get/set_state.

  Args:
    examples: list of ``{"inputs", "targets"}`` dicts.
    batch_size: per-process batch size.
    input_len, target_len: padded lengths.
    seed: shuffle seed (each epoch reshuffles deterministically).
    shuffle: whether to shuffle.
  """

  def __init__(self, examples, batch_size, input_len, target_len, *, seed=0, shuffle=True):
    if not examples:
      raise ValueError("no examples: the dataset is empty; check the data path and split.")
    if batch_size > len(examples):
      raise ValueError(f"batch_size {batch_size} exceeds the {len(examples)} examples available.")
    self.examples = examples
    self.batch_size = batch_size
    self.input_len, self.target_len = input_len, target_len
    self.seed, self.shuffle = seed, shuffle
    self._pos = 0  # examples consumed

  def _order(self, epoch: int) -> np.ndarray:
    idx = np.arange(len(self.examples))
    if self.shuffle:
      np.random.default_rng([self.seed, epoch]).shuffle(idx)
    return idx

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    n = len(self.examples)
    chosen = []
    for _ in range(self.batch_size):
      epoch, i = divmod(self._pos, n)
      chosen.append(self.examples[self._order(epoch)[i]])
      self._pos += 1
    return pad_batch(chosen, self.input_len, self.target_len)

  def get_state(self) -> dict[str, Any]:
    return {"position": self._pos, "seed": self.seed}

  def set_state(self, state: dict[str, Any]):
    self._pos = int(state["position"])
    self.seed = int(state["seed"])
