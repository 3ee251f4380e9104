"""One entry point from a dataset name to records ``{"input": str, "target": str}``.

=========================  ==============================================================
name                       source
=========================  ==============================================================
``stdlib_docstrings``      the embedded default (``builders/stdlib_docstrings.py``): Python
                           stdlib function source -> first docstring sentence
``debian_descriptions``    the installed packages' dpkg database
                           (``builders/debian_descriptions.py``): long description ->
                           one-line synopsis
``jsonl``                  local files; ``paths={"train": ..., "validation": ...}`` and the
                           options of ``builders/jsonl_seq2seq.py`` (``input_key``, ...)
``xsum``,                  TFDS catalog sets already prepared as array_record
``cnn_dailymail``,         (``builders/catalog.py``); ``tfds:<name>`` works too
``samsum``,
``reddit_tifu``
=========================  ==============================================================

Every source is a random-access ``grain.MapDataset``, so it feeds
:func:`slicjax.data.pipeline.make_seq2seq_iterator` and
:func:`slicjax.data.tokenizer.train_on_records` directly.
"""

from __future__ import annotations

from typing import Any

import grain

from slicjax.data import tokenizer as tokenizer_lib
from slicjax.data.builders import (
  base,
  catalog,
  debian_descriptions,
  jsonl_seq2seq,
  stdlib_docstrings,
)

LOCAL_SOURCES = ("stdlib_docstrings", "debian_descriptions", "jsonl")


def _text_pair(record: dict[str, Any]) -> dict[str, str]:
  return {"input": base.as_text(record["input"]), "target": base.as_text(record["target"])}


def load_text_source(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  paths: str | dict[str, str] | None = None,
  **options: Any,
) -> grain.MapDataset:
  """Records ``{"input", "target"}`` (str) of ``split`` of dataset ``name``.

  Args:
    name: see the module docstring.
    split: ``train``, ``validation``, ``test`` or a TFDS slice (``train[:10%]``).
    data_dir: where prepared datasets live (default ``$SLICJAX_DATA_DIR`` or
      ``~/.cache/slicjax/tfds``).
    paths: for ``jsonl``: split -> file (a single path means the train split).
    **options: builder options: stdlib ``ExtractOptions`` fields and ``stdlib_dir``; debian
      ``status_path`` and its ``ExtractOptions`` fields; jsonl
      reading options; catalog ``manual_dir`` / ``download``.
  """
  if name == "stdlib_docstrings":
    source = stdlib_docstrings.load_split(split, data_dir=data_dir, **options)
  elif name == "debian_descriptions":
    source = debian_descriptions.load_split(split, data_dir=data_dir, **options)
  elif name == "jsonl":
    if not paths:
      raise ValueError(
        "the jsonl source needs paths={'train': 'train.jsonl', 'validation': 'dev.jsonl'}."
      )
    source = jsonl_seq2seq.load_split(paths, split, data_dir=data_dir, **options)
  elif name.removeprefix("tfds:") in catalog.CATALOG:
    return catalog.catalog_source(name, split, data_dir=data_dir, **options)
  else:
    raise ValueError(
      f"unknown dataset {name!r}; choose one of {list(LOCAL_SOURCES) + sorted(catalog.CATALOG)} "
      "(catalog names may carry a 'tfds:' prefix)."
    )
  return grain.MapDataset.source(source).map(_text_pair)


def tokenizer_for_source(
  name: str,
  *,
  tokenizer_path: str | None = None,
  split: str = "train",
  vocab_size: int = 2000,
  cache_dir: str | None = None,
  max_texts: int | None = 20_000,
  **source_options: Any,
) -> tokenizer_lib.Tokenizer:
  """Loads ``tokenizer_path`` if given, else trains (cached) on the source's training split.

  Args:
    name: dataset name, as in :func:`load_text_source`.
    tokenizer_path: an existing SentencePiece ``.model`` to load instead of training.
    split: the split to train on.
    vocab_size, cache_dir, max_texts: see :func:`slicjax.data.tokenizer.train_tokenizer`.
    **source_options: passed to :func:`load_text_source`.
  """
  if tokenizer_path:
    return tokenizer_lib.load_tokenizer(tokenizer_path)
  records = load_text_source(name, split, **source_options)
  return tokenizer_lib.train_on_records(
    records, vocab_size=vocab_size, cache_dir=cache_dir, max_texts=max_texts
  )
