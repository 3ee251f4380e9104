"""In-memory, seeded, checkpointable batch iterators (``get_state``/``set_state``).

Used for token-id examples already in memory (the synthetic task, candidate sets, preference
pairs). Large text datasets go through the grain pipeline in ``slicjax/data/pipeline.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slicjax.models.seq_model import PAD_ID


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
    shard_index, shard_count: this process's slice of each global batch (the global batch is
      ``batch_size * shard_count`` rows, identical to a single process with that batch size).
  """

  def __init__(self, examples, batch_size, input_len, target_len, *, seed=0, shuffle=True,
               shard_index=0, shard_count=1):
    if not examples:
      raise ValueError("no examples: the dataset is empty; check the data path and split.")
    if batch_size > len(examples):
      raise ValueError(f"batch_size {batch_size} exceeds the {len(examples)} examples available; lower the batch size or add data.")
    self.examples = examples
    self.batch_size = batch_size
    self.input_len, self.target_len = input_len, target_len
    self.seed, self.shuffle = seed, shuffle
    self.shard_index, self.shard_count = shard_index, shard_count
    self._pos = 0  # examples consumed (globally, over all processes)

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
    for _ in range(self.batch_size * self.shard_count):
      epoch, i = divmod(self._pos, n)
      chosen.append(self.examples[self._order(epoch)[i]])
      self._pos += 1
    lo = self.shard_index * self.batch_size
    return pad_batch(chosen[lo : lo + self.batch_size], self.input_len, self.target_len)

  def get_state(self) -> dict[str, Any]:
    return {"position": self._pos, "seed": self.seed}

  def set_state(self, state: dict[str, Any]):
    self._pos = int(state["position"])
    self.seed = int(state["seed"])


class ArrayDictIterator:
  """Infinite, seeded, epoch-shuffled batches of rows of equally-long arrays (``{name: [N, ...]}``).

  The state is the number of rows consumed, so a restored iterator yields the next unseen row.
  """

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, seed: int = 0,
               shuffle: bool = True, shard_index: int = 0, shard_count: int = 1):
    sizes = {k: len(v) for k, v in arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
      raise ValueError(f"arrays must be non-empty and share their first dimension, got {sizes}.")
    self.n = next(iter(sizes.values()))
    if self.n == 0:
      raise ValueError("no rows: the dataset is empty.")
    if batch_size > self.n:
      raise ValueError(f"batch_size {batch_size} exceeds the {self.n} rows available; lower the batch size or add data.")
    self.arrays, self.batch_size, self.seed, self.shuffle = arrays, batch_size, seed, shuffle
    self.shard_index, self.shard_count = shard_index, shard_count
    self._pos = 0

  def _order(self, epoch):
    idx = np.arange(self.n)
    if self.shuffle:
      np.random.default_rng([self.seed, epoch]).shuffle(idx)
    return idx

  def __iter__(self):
    return self

  def __next__(self):
    rows = []
    for _ in range(self.batch_size * self.shard_count):
      epoch, i = divmod(self._pos, self.n)
      rows.append(self._order(epoch)[i])
      self._pos += 1
    lo = self.shard_index * self.batch_size
    rows = np.asarray(rows[lo : lo + self.batch_size])
    return {k: v[rows] for k, v in self.arrays.items()}

  def get_state(self):
    return {"position": self._pos, "seed": self.seed}

  def set_state(self, state):
    self._pos, self.seed = int(state["position"]), int(state["seed"])
