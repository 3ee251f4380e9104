"""Text tasks for jobs: a source from ``slicjax.data.sources`` + a SentencePiece tokenizer ->
:class:`~slicjax.pipelines.tasks.TaskData` (grain train iterator, tokenized eval examples)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from slicjax.data import pipeline, sources
from slicjax.pipelines.tasks import TaskData


def _source_options(d: dict[str, Any]) -> dict[str, Any]:
  name = d["name"]
  opts: dict[str, Any] = {}
  if d["data_dir"]:
    opts["data_dir"] = d["data_dir"]
  if name == "stdlib_docstrings":
    opts["max_input_chars"] = d["max_input_chars"]
  elif name == "debian_descriptions":
    if d["dpkg_status"]:
      opts["status_path"] = d["dpkg_status"]
  elif name == "jsonl":
    if not d["train_path"]:
      raise ValueError("data.name=jsonl needs data.train_path (and data.eval_path) jsonl files.")
    paths = {"train": d["train_path"]}
    if d["eval_path"]:
      paths["validation"] = d["eval_path"]
    if d["test_path"]:
      paths["test"] = d["test_path"]
    opts["paths"] = paths
    opts["input_key"], opts["target_key"] = d["input_key"], d["target_key"]
  return opts


LENGTH_PERCENTILE = 98


def token_lengths(records, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Untruncated token counts ``(inputs, targets)`` of text records; targets count EOS and
  inputs are encoded as the pipeline encodes them (a pretrained model's prompt format too)."""
  from slicjax.data.builders.base import as_text

  enc_in = getattr(tokenizer, "encode_prompt", tokenizer.encode)
  ins, tgts = [], []
  for r in records:
    ins.append(len(enc_in(as_text(r["input"]))))
    tgts.append(len(tokenizer.encode(as_text(r["target"]))) + 1)
  return np.asarray(ins, np.int64), np.asarray(tgts, np.int64)


def choose_lengths(d: dict[str, Any], train_records, tokenizer,
                   percentile: float = LENGTH_PERCENTILE) -> dict[str, Any]:
  """``data.input_len`` / ``data.target_len``, each 0 replaced by the ``percentile``-th
  percentile (rounded up) of the train split's token lengths; logged. Returns the record kept
  in :attr:`TaskData.lengths`."""
  chosen = [k for k in ("input_len", "target_len") if not d[k]]
  out = {"input_len": int(d["input_len"]), "target_len": int(d["target_len"]),
         "chosen_from_data": chosen, "percentile": percentile,
         "train_examples": len(train_records)}
  if not chosen:
    return out
  ins, tgts = token_lengths(train_records, tokenizer)
  for key, lens, floor in (("input_len", ins, 1), ("target_len", tgts, 2)):
    if key in chosen:
      out[key] = max(floor, int(np.ceil(np.percentile(lens, percentile))))
      logging.info(
        "data.%s=0: chose %d, the %gth percentile of %d tokenized train %s (max %d).", key,
        out[key], percentile, len(lens), "inputs" if key == "input_len" else "targets (+EOS)",
        int(lens.max()),
      )
  return out


def load_text_task(d: dict[str, Any], *, batch_size: int, seed: int, tokenizer=None) -> TaskData:
  """A text task; ``tokenizer`` (a pretrained model's) replaces the task's SentencePiece model."""
  name = d["name"]
  opts = _source_options(d)
  tok = tokenizer or sources.tokenizer_for_source(
    name, tokenizer_path=d["tokenizer_path"] or None, vocab_size=d["vocab_size"],
    cache_dir=d["cache_dir"] or None, **opts,
  )
  train_records = sources.load_text_source(name, "train", **opts)
  try:
    eval_records = sources.load_text_source(name, "validation", **opts)
  except ValueError:
    logging.warning("%s has no validation split; evaluating on the last 10%% of train.", name)
    n = len(train_records)
    eval_records = train_records[int(n * 0.9) :]
    train_records = train_records[: int(n * 0.9)]
  lengths = choose_lengths(d, train_records, tok)
  s, length = lengths["input_len"], lengths["target_len"]
  stats = {k: pipeline.TruncationStats(len(r), what=f"{k} examples")
           for k, r in (("train", train_records), ("validation", eval_records))}
  train_tok = pipeline.tokenize_records(train_records, tok, input_len=s, target_len=length,
                                        stats=stats["train"])
  eval_tok = pipeline.tokenize_records(eval_records, tok, input_len=s, target_len=length,
                                       keep_reference=True, stats=stats["validation"])
  if not train_tok:
    raise ValueError(f"dataset {name!r} has an empty train split; check the data source.")
  test_tok = None
  if name in ("stdlib_docstrings", "debian_descriptions") or (
    name == "jsonl" and d["test_path"]
  ):
    test_records = sources.load_text_source(name, "test", **opts)
    stats["test"] = pipeline.TruncationStats(len(test_records), what="test examples")
    test_tok = pipeline.tokenize_records(test_records, tok, input_len=s, target_len=length,
                                         keep_reference=True, stats=stats["test"])

  def make_train_iter():
    return pipeline.make_seq2seq_iterator(
      train_records, tok, batch_size=batch_size, input_len=s, target_len=length, train=True,
      seed=seed, packing=d["packing"], shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )

  return TaskData(
    name=name, vocab_size=tok.vocab_size, input_len=s, target_len=length,
    train_examples=train_tok, eval_examples=eval_tok, batch_size=batch_size, seed=seed,
    tokenizer=tok, make_train_iter=make_train_iter, test_examples=test_tok,
    truncation={k: v.as_dict() for k, v in stats.items()}, lengths=lengths,
  )
