"""Task loading for jobs: ``config.data`` -> tokenized splits, iterators and a tokenizer.

``data.name`` selects the source:

* ``reverse`` — the built-in synthetic task (``slicjax/data/synthetic.py``), token ids only;
* ``stdlib_docstrings`` — the embedded default: code -> docstring summary;
* ``debian_descriptions`` — the machine's dpkg database (``data.dpkg_status``): package long
  description -> one-line synopsis;
* ``jsonl`` — local ``{"input", "target"}`` files (``train_path``, ``eval_path``,
  ``test_path``);
* ``tfds:<name>`` — a TFDS catalog summarization set (needs its data on this machine).

``data.input_len`` / ``data.target_len`` = 0 (text tasks) choose the length from the data: the
98th percentile of the tokenized train split (targets counting EOS); the choice is logged and
kept in :attr:`TaskData.lengths`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from slicjax.data import iterators, synthetic
from slicjax.pipelines import common

DATA_KEYS = dict(
  name="reverse", input_len=64, target_len=32, vocab_size=2000, num_train=4096, num_eval=256,
  data_dir="", cache_dir="", train_path="", eval_path="", test_path="", input_key="input",
  target_key="target", dpkg_status="",
  tokenizer_path="", packing=False, max_input_chars=4000, synthetic_vocab=32, distill_from="",
)


@dataclasses.dataclass
class TaskData:
  """What a job needs from a task. Examples are dicts of unpadded int32 token arrays."""

  name: str
  vocab_size: int
  input_len: int
  target_len: int
  train_examples: list[dict[str, Any]]
  eval_examples: list[dict[str, Any]]
  batch_size: int
  seed: int
  tokenizer: Any = None
  make_train_iter: Callable[[], Any] | None = None
  eval_texts: list[dict[str, str]] | None = None
  test_examples: list[dict[str, Any]] | None = None
  # Per split: {seen, truncated, truncated_inputs, truncated_targets} at tokenization.
  truncation: dict[str, dict[str, int]] | None = None
  # How input_len / target_len were set: {"input_len": int, "target_len": int,
  # "chosen_from_data": [keys that were 0], "percentile": 98, "train_examples": int}.
  lengths: dict[str, Any] | None = None

  def reference(self, example) -> str:
    """The reference text to score against: the whole target (kept at tokenization for text
    tasks), never the truncated one."""
    ref = example.get("reference")
    return ref if ref is not None else self.detokenize(example["targets"])

  def split_examples(self, split: str) -> list[dict[str, Any]]:
    """``train``, ``validation`` or ``test`` examples (choose recipes on validation, report on
    test)."""
    if split == "train":
      return self.train_examples
    if split == "validation":
      return self.eval_examples
    if split == "test":
      if not self.test_examples:
        raise ValueError(
          f"task {self.name!r} has no test split; for data.name=jsonl set data.test_path, or "
          "evaluate on split='validation'."
        )
      return self.test_examples
    raise ValueError(f"unknown split {split!r}; use train, validation or test.")

  def train_iter(self):
    if self.make_train_iter is not None:
      return self.make_train_iter()
    return iterators.ArrayBatchIterator(
      self.train_examples, self.batch_size, self.input_len, self.target_len, seed=self.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
    )

  def eval_batches(self, n: int | None = None, batch_size: int | None = None):
    bs = batch_size or self.batch_size
    ex = self.eval_examples
    batches = []
    for i in range(0, len(ex) - bs + 1, bs):
      batches.append(iterators.pad_batch(ex[i : i + bs], self.input_len, self.target_len))
      if n is not None and len(batches) >= n:
        break
    if not batches:
      raise ValueError(
        f"the eval split has {len(ex)} examples, fewer than one batch of {bs}; lower the batch "
        "size or add evaluation data."
      )
    return batches

  def detokenize(self, ids) -> str:
    if self.tokenizer is None:
      return " ".join(str(int(t)) for t in ids if int(t) > 1)
    return self.tokenizer.decode([int(t) for t in ids])


def data_config(config) -> dict[str, Any]:
  d = common.to_dict(config.get("data"))
  common.check_keys(d, DATA_KEYS, "data")
  return {**DATA_KEYS, **d}


def load(config, *, batch_size: int, seed: int = 0, mesh=None) -> TaskData:
  """The task of ``config.data``; with ``data.distill_from`` its train targets are replaced by
  a candidate directory's outputs (see :func:`distilled`)."""
  data = _load(config, batch_size=batch_size, seed=seed, mesh=mesh)
  src = data_config(config)["distill_from"]
  return distilled(data, src) if src else data


def distilled(data: TaskData, candidates_dir: str) -> TaskData:
  """``data`` whose training examples are ``(inputs, first candidate)`` of a candidate
  directory (e.g. a model's greedy outputs from ``experiments/decode.py``), in token ids of the
  same tokenizer: an MLE run on it trains a model to imitate that model, e.g. a small
  speculative-decoding draft (``candidates.draft`` / ``rso.draft``). Evaluation data is kept.

  Raises:
    ValueError: the directory has no candidates, or a sequence does not fit the lengths.
  """
  import numpy as np
  from absl import logging

  from slicjax.pipelines import candidates

  rows = candidates.read_candidates(candidates_dir)
  examples = []
  for r in rows:
    target = r["candidates"][0] if r.get("candidates") else []
    if not target:
      continue
    if len(r["inputs"]) > data.input_len or len(target) > data.target_len:
      raise ValueError(
        f"{candidates_dir}: example {r['index']} has {len(r['inputs'])} input / {len(target)} "
        f"candidate tokens, over data.input_len={data.input_len} / data.target_len="
        f"{data.target_len}; use the lengths the candidates were generated with."
      )
    examples.append({"inputs": np.asarray(r["inputs"], np.int32),
                     "targets": np.asarray(target, np.int32)})
  if not examples:
    raise ValueError(f"{candidates_dir} holds no non-empty candidates to distill from.")
  logging.info("distilling from %s: %d training examples (%d empty skipped)", candidates_dir,
               len(examples), len(rows) - len(examples))
  return dataclasses.replace(data, train_examples=examples, make_train_iter=None)


def _load(config, *, batch_size: int, seed: int = 0, mesh=None) -> TaskData:
  d = data_config(config)
  if mesh is not None:
    from slicjax import sharding

    div = sharding.batch_divisor(mesh)
    global_batch = batch_size
    if global_batch % div:
      raise ValueError(
        f"batch_size {global_batch} is not divisible by the mesh's data x fsdp size {div}; use a "
        f"multiple of {div}."
      )
  per_process = batch_size // jax.process_count()
  name = d["name"]
  pre = common.pretrained(config)
  if pre is not None and name == "reverse":
    raise ValueError(
      "data.name=reverse is a synthetic token-id task without text; a pretrained model "
      "(pretrained.init_from) needs a text task: stdlib_docstrings, jsonl or tfds:<name>."
    )
  if name == "reverse":
    if not d["input_len"] or not d["target_len"]:
      raise ValueError(
        "data.input_len=0 / data.target_len=0 (choose from the data) needs a text task; the "
        "synthetic reverse task is generated from the lengths: set both to positive values."
      )
    n = d["num_train"] + d["num_eval"]
    ex = synthetic.reverse_task(
      n, vocab_size=d["synthetic_vocab"], max_len=min(d["input_len"], d["target_len"] - 1),
      seed=seed,
    )
    return TaskData(
      name, d["synthetic_vocab"], d["input_len"], d["target_len"], ex[: d["num_train"]],
      ex[d["num_train"] :], per_process, seed,
    )
  from slicjax.pipelines import text_tasks

  return text_tasks.load_text_task(
    d, batch_size=per_process, seed=seed, tokenizer=pre[2] if pre is not None else None
  )
