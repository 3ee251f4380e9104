"""Grain input pipeline for seq2seq data: records -> tokens -> fixed-shape batches.

Stages, in order::

  records (random access: a TFDS data source, grain MapDataset or list of dicts)
    -> shard per process (records shard_index, shard_index + shard_count, ...)
    -> [train] global shuffle with ``seed``, reshuffled every epoch; repeat
    -> tokenize + truncate (counted and logged; ``truncate=False`` raises instead)
    -> pad to fixed lengths, or pack several examples per row (first fit)
    -> batch (``drop_remainder`` for train; eval pads its last batch with empty rows)

A record is text ``{"input": str|bytes, "target": str|bytes}`` (tokenized here) or already
tokens ``{"inputs": int array, "targets": int array}`` (targets already ending in EOS).

Batches are dicts of numpy int32:

* ``inputs`` ``[B, S]`` — input tokens, right-padded with 0 (no EOS appended);
* ``targets`` ``[B, L]`` — target tokens followed by EOS (1), right-padded with 0;
* when packed also ``inputs_segment_ids``, ``targets_segment_ids`` ``[B, S]``/``[B, L]``
  (1, 2, ... per packed example, the same number for an example's inputs and targets; 0 on
  padding) and ``inputs_positions``, ``targets_positions`` (0, 1, ... restarting per segment).

Truncation keeps the first ``S`` input tokens and the first ``L - 1`` target tokens plus EOS.
Rows that are all zeros (eval padding) carry no target tokens, so target-masked losses and
metrics ignore them. Evaluation gives every process the same number of batches
(``ceil(ceil(N / shard_count) / B)``), padding where a shard is one example short, so
multi-host evaluation steps stay in lockstep.

The returned iterator is a grain ``DatasetIterator``: ``get_state()`` is a small JSON-able
dict and ``set_state(state)`` on a fresh iterator resumes at the next unseen example.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from grain import experimental as grain_exp

from slicjax.data.builders.base import as_text
from slicjax.data.tokenizer import EOS_ID, PAD_ID

BATCH_KEYS = ("inputs", "targets")
_PAD_SLOT = "__slicjax_pad_slot__"
PACKED_KEYS = (
  "inputs", "targets", "inputs_segment_ids", "inputs_positions", "targets_segment_ids",
  "targets_positions",
)  # fmt: skip


class TruncationStats:
  """Thread-safe counts of examples seen and truncated, logged once per completed epoch."""

  def __init__(self, epoch_size: int | None = None, *, what: str = "examples"):
    self.epoch_size = epoch_size
    self.what = what
    self._lock = threading.Lock()
    self.seen = 0
    self.truncated_inputs = 0
    self.truncated_targets = 0
    self.truncated = 0  # examples with either part truncated
    self._per_epoch: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    self._warned = False

  def record(self, epoch: int, in_len: int, tgt_len: int, input_len: int, target_len: int):
    cut_in, cut_tgt = in_len > input_len, tgt_len > target_len
    with self._lock:
      self.seen += 1
      self.truncated_inputs += cut_in
      self.truncated_targets += cut_tgt
      self.truncated += cut_in or cut_tgt
      counts = self._per_epoch[epoch]
      counts[0] += 1
      counts[1] += cut_in or cut_tgt
      first = (cut_in or cut_tgt) and not self._warned
      self._warned |= first
      done = self.epoch_size is not None and counts[0] == self.epoch_size
      if done:
        del self._per_epoch[epoch]
    if first:
      logging.warning(
        "Truncating %s: one has %d input / %d target tokens (EOS included) over input_len=%d / "
        "target_len=%d; the count is logged per epoch. Raise the lengths to keep more.",
        self.what, in_len, tgt_len, input_len, target_len,
      )  # fmt: skip
    if done:
      logging.log(
        logging.WARNING if counts[1] else logging.INFO,
        "Epoch %d: truncated %d of %d %s (inputs %d, targets %d so far in total).",
        epoch, counts[1], counts[0], self.what, self.truncated_inputs, self.truncated_targets,
      )  # fmt: skip

  def as_dict(self) -> dict[str, int]:
    return dict(
      seen=self.seen, truncated=self.truncated, truncated_inputs=self.truncated_inputs,
      truncated_targets=self.truncated_targets,
    )  # fmt: skip


def _check_lengths(input_len: int, target_len: int, batch_size: int):
  if input_len < 1 or target_len < 2:
    raise ValueError(
      f"need input_len >= 1 and target_len >= 2 (room for a token and EOS), got {input_len}, "
      f"{target_len}."
    )
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")


def tokenize_example(
  record: dict[str, Any] | None,
  tokenizer=None,
  *,
  input_len: int,
  target_len: int,
  truncate: bool = True,
  stats: TruncationStats | None = None,
  epoch: int = 0,
) -> dict[str, np.ndarray]:
  """``{"inputs": int32[<=S], "targets": int32[<=L]}`` for one record (padding -> empty).

  Raises:
    ValueError: an example is longer than the lengths and ``truncate`` is False.
  """
  if record is None or record.get(_PAD_SLOT):  # eval padding
    return {"inputs": np.zeros((0,), np.int32), "targets": np.zeros((0,), np.int32)}
  if "inputs" in record and "targets" in record:
    inputs = np.asarray(record["inputs"], np.int32).reshape(-1)
    targets = np.asarray(record["targets"], np.int32).reshape(-1)
    if stats is not None:
      stats.record(epoch, len(inputs), len(targets), input_len, target_len)
  else:
    if tokenizer is None:
      raise ValueError(
        "records hold text ('input'/'target') but no tokenizer was given; pass tokenizer=, "
        "or give token records {'inputs', 'targets'}."
      )
    missing = [k for k in ("input", "target") if k not in record]
    if missing:
      raise KeyError(
        f"record has no {missing} field (fields: {sorted(record)}); map the source to "
        "{'input', 'target'} first (see slicjax.data.sources)."
      )
    text = as_text(record["input"])
    inputs = np.asarray(
      tokenizer.encode_prompt(text) if hasattr(tokenizer, "encode_prompt")
      else tokenizer.encode(text), np.int32,
    )
    targets = np.asarray(tokenizer.encode(as_text(record["target"])) + [EOS_ID], np.int32)
    if stats is not None:
      stats.record(epoch, len(inputs), len(targets), input_len, target_len)
    if len(inputs) > input_len and truncate and hasattr(tokenizer, "encode_prompt"):
      # A pretrained model's prompt format: cut the input text, not the template around it.
      inputs = np.asarray(tokenizer.encode_prompt(text, max_tokens=input_len), np.int32)
  if len(inputs) > input_len or len(targets) > target_len:
    if not truncate:
      raise ValueError(
        f"an example has {len(inputs)} input and {len(targets)} target tokens (EOS included), "
        f"over input_len={input_len} / target_len={target_len}; raise the lengths, shorten the "
        "data, or pass truncate=True to cut (with a logged count)."
      )
    inputs = inputs[:input_len]
    if len(targets) > target_len:
      targets = np.concatenate([targets[: target_len - 1], [EOS_ID]]).astype(np.int32)
  return {"inputs": inputs, "targets": targets}


def tokenize_records(
  records, tokenizer=None, *, input_len: int, target_len: int, truncate: bool = True,
  keep_reference: bool = False, stats: TruncationStats | None = None,
) -> list[dict[str, np.ndarray]]:
  """Eagerly tokenizes (and truncates, with a logged count) every record, in order.

  ``keep_reference``: text records also keep their whole target text as ``"reference"``, so
  evaluation scores against the untruncated reference. ``stats``: receives the counts.
  """
  stats = stats if stats is not None else TruncationStats(len(records))
  out = []
  for r in records:
    ex = tokenize_example(
      r, tokenizer, input_len=input_len, target_len=target_len, truncate=truncate, stats=stats
    )
    if keep_reference and r is not None and "target" in r:
      ex["reference"] = as_text(r["target"])
    out.append(ex)
  return out


def pad_example(example: dict[str, np.ndarray], input_len: int, target_len: int):
  """Right-pads one tokenized example to ``[S]`` / ``[L]`` with PAD (0)."""
  out = {}
  for key, n in (("inputs", input_len), ("targets", target_len)):
    row = np.full((n,), PAD_ID, np.int32)
    row[: len(example[key])] = example[key]
    out[key] = row
  return out


def _pad_batch_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Appends all-zero rows so the leading dimension is ``batch_size``."""
  out = {}
  for k, v in batch.items():
    extra = batch_size - v.shape[0]
    out[k] = np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) if extra else v
  return out


def _as_map_dataset(records) -> grain.MapDataset:
  ds = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(records)
  if len(ds) == 0:
    raise ValueError(
      "the dataset is empty (0 records); check the data path, the split name and any filters."
    )
  return ds


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if shard_index is None else int(shard_index)
  count = jax.process_count() if shard_count is None else int(shard_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {index} and {count}.")
  return index, count


def make_seq2seq_dataset(
  records,
  tokenizer=None,
  *,
  batch_size: int,
  input_len: int,
  target_len: int,
  train: bool = True,
  seed: int = 0,
  packing: bool = False,
  truncate: bool = True,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_packing_bins: int | None = None,
  drop_remainder: bool | None = None,
  read_threads: int = 1,
) -> grain.IterDataset:
  """The batched grain dataset; see :func:`make_seq2seq_iterator` for the arguments."""
  _check_lengths(input_len, target_len, batch_size)
  source = _as_map_dataset(records)
  index, count = _resolve_shard(shard_index, shard_count)
  n = len(source)
  if train:
    ds = source[index::count]
    shard_len = len(ds)
    if shard_len == 0:
      raise ValueError(
        f"process shard {index} of {count} is empty (the dataset has {n} records); use fewer "
        "processes or more data."
      )
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
  else:
    if num_epochs not in (None, 1):
      raise ValueError(f"evaluation makes one pass; got num_epochs={num_epochs}.")
    # Every process gets ceil(n / count) slots; a slot past the data is an empty example
    # (grain drops None elements, hence a marker record).
    shard_len = -(-n // count)
    ds = grain.MapDataset.range(shard_len).map(
      lambda i: source[index + i * count] if index + i * count < n else {_PAD_SLOT: True}
    )
    if packing:
      ds = ds.filter(lambda r: not r.get(_PAD_SLOT))
  stats = TruncationStats(shard_len)

  def tokenize(i, record):
    return tokenize_example(
      record, tokenizer, input_len=input_len, target_len=target_len, truncate=truncate,
      stats=stats, epoch=i // shard_len,
    )  # fmt: skip

  ds = ds.map_with_index(tokenize)
  if drop_remainder is None:
    drop_remainder = train
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size)
  if packing:
    it = grain_exp.FirstFitPackIterDataset(
      ds.to_iter_dataset(options),
      length_struct={"inputs": input_len, "targets": target_len},
      num_packing_bins=num_packing_bins or batch_size,
      seed=seed,
      shuffle_bins=train,
    )
  else:
    it = ds.map(lambda ex: pad_example(ex, input_len, target_len)).to_iter_dataset(options)
  it = it.batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    it = it.map(lambda b: _pad_batch_rows(b, batch_size))
  it.truncation_stats = stats
  return it


def make_seq2seq_iterator(
  records,
  tokenizer=None,
  *,
  batch_size: int,
  input_len: int,
  target_len: int,
  train: bool = True,
  seed: int = 0,
  packing: bool = False,
  truncate: bool = True,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_packing_bins: int | None = None,
  drop_remainder: bool | None = None,
  read_threads: int = 1,
) -> grain.DatasetIterator:
  """A checkpointable iterator of seq2seq batches (see the module docstring for the layout).

  Args:
    records: random-access text or token records.
    tokenizer: a :class:`~slicjax.data.tokenizer.Tokenizer` (needed for text records).
    batch_size: rows per batch on this process.
    input_len: ``S``, padded input length.
    target_len: ``L``, padded target length (EOS included).
    train: shuffle and repeat (``num_epochs=None``: forever) and drop the last partial batch;
      otherwise one pass in order, the last batch padded with empty rows.
    seed: shuffle seed (each epoch is reshuffled from it deterministically).
    packing: pack several examples per row (first fit), adding segment ids and positions.
    truncate: cut over-long examples (counted and logged); False raises instead.
    num_epochs: passes over the data when training; None repeats forever.
    shard_index: this process's shard (default ``jax.process_index()``).
    shard_count: number of shards (default ``jax.process_count()``).
    num_packing_bins: rows packed at once (default ``batch_size``); more bins, less padding.
    drop_remainder: override the default (``train``).
    read_threads: grain reader threads (0 reads in the calling thread).

  Returns:
    A grain ``DatasetIterator`` with ``get_state`` / ``set_state``. Its truncation counts
    are in ``iterator.truncation_stats`` (:class:`TruncationStats`).
  """
  ds = make_seq2seq_dataset(
    records, tokenizer, batch_size=batch_size, input_len=input_len, target_len=target_len,
    train=train, seed=seed, packing=packing, truncate=truncate, num_epochs=num_epochs,
    shard_index=shard_index, shard_count=shard_count, num_packing_bins=num_packing_bins,
    drop_remainder=drop_remainder, read_threads=read_threads,
  )  # fmt: skip
  it = iter(ds)
  it.truncation_stats = ds.truncation_stats
  return it


def make_eval_batches(
  records,
  tokenizer=None,
  *,
  batch_size: int,
  input_len: int,
  target_len: int,
  max_batches: int | None = None,
  **kwargs,
) -> list[dict[str, np.ndarray]]:
  """One in-order pass over ``records`` as a list of batches (last one padded with empty rows).

  Args:
    records, tokenizer, batch_size, input_len, target_len: as in :func:`make_seq2seq_iterator`.
    max_batches: stop after this many batches.
    **kwargs: ``packing``, ``truncate``, ``shard_index``, ``shard_count``, ``read_threads``.
  """
  it = make_seq2seq_iterator(
    records, tokenizer, batch_size=batch_size, input_len=input_len, target_len=target_len,
    train=False, **kwargs,
  )  # fmt: skip
  batches = []
  for batch in it:
    batches.append(batch)
    if max_batches is not None and len(batches) >= max_batches:
      break
  stats = it.truncation_stats
  if stats.truncated:
    logging.warning("Evaluation data: truncated %d of %d examples.", stats.truncated, stats.seen)
  return batches


def unpack_row(batch: dict[str, np.ndarray], row: int) -> list[dict[str, np.ndarray]]:
  """The examples packed in one row, in segment order (for inspection and tests)."""
  out = []
  segs = sorted(set(batch["targets_segment_ids"][row].tolist()) - {0})
  for s in segs:
    out.append({k: batch[k][row][batch[f"{k}_segment_ids"][row] == s] for k in BATCH_KEYS})
  return out
