"""``jsonl_seq2seq``: local JSON-lines files of ``{"input": ..., "target": ...}`` records.

One JSON object per line (blank lines are skipped); the field names are configurable
(``input_key``, ``target_key``; other fields are ignored). Each split is its own file::

  builder({"train": "train.jsonl", "validation": "dev.jsonl"}, input_key="document")

Malformed lines (not JSON, not an object, a missing or non-string field) raise
:class:`JsonlError` naming the file, the line number and the fix; an empty file raises too.
Policies, each counted in the dataset's metadata (``stats``) and logged:

* ``on_empty_target``: ``"drop"`` (default) / ``"keep"`` / ``"error"`` for a target that is
  empty or only whitespace;
* ``max_input_chars`` with ``on_too_long``: ``"error"`` (default) / ``"truncate"`` (keep the
  first ``max_input_chars`` characters) / ``"drop"``.

Record fields: ``input``, ``target`` (str) and ``line`` (int32, 1-based line in its file).
The config name hashes the files' contents and the options, so editing a file rebuilds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from slicjax.data.builders import base

_EMPTY_POLICIES = ("drop", "keep", "error")
_LONG_POLICIES = ("error", "truncate", "drop")


class JsonlError(ValueError):
  """A JSON-lines file is missing, empty or has a malformed line."""


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields ``(line_number, object)`` for each non-blank line of a JSON-lines file.

  Raises:
    JsonlError: the file is missing or empty, or a line is not a JSON object.
  """
  if not os.path.isfile(path):
    raise JsonlError(f"{path}: no such file; pass the path of an existing .jsonl file.")
  n = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise JsonlError(
          f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
          f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > fixed.jsonl."
        ) from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise JsonlError(
          f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); write one JSON "
          "object per line (escape newlines inside strings as \\n)."
        ) from None
      if not isinstance(obj, dict):
        raise JsonlError(
          f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; write one "
          '{"key": value, ...} object per line.'
        )
      n += 1
      yield lineno, obj
  if n == 0:
    raise JsonlError(f"{path}: the file is empty (no JSON lines); add records or fix the path.")


def require_str(path: str, lineno: int, obj: dict, key: str, *, option: str) -> str:
  """``obj[key]`` as a string, or a :class:`JsonlError` naming the line and the fix."""
  if key not in obj:
    raise JsonlError(
      f"{path}:{lineno}: missing field {key!r} (fields present: {sorted(obj)}); add it, or "
      f"set {option}= to the name your file uses."
    )
  value = obj[key]
  if not isinstance(value, str):
    raise JsonlError(
      f"{path}:{lineno}: field {key!r} must be a string, got {type(value).__name__}; write it "
      "as a JSON string."
    )
  return value


def read_seq2seq_jsonl(
  path: str,
  *,
  input_key: str = "input",
  target_key: str = "target",
  max_input_chars: int | None = None,
  on_too_long: str = "error",
  on_empty_target: str = "drop",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Reads and validates one seq2seq JSON-lines file (policies: see the module docstring).

  Returns:
    ``(records, stats)``: records ``{"input", "target", "line"}`` in file order, and counts
    ``read``, ``kept``, ``dropped_empty_target``, ``truncated_input``, ``dropped_too_long``.
  """
  if on_empty_target not in _EMPTY_POLICIES:
    raise ValueError(f"on_empty_target must be one of {_EMPTY_POLICIES}, got {on_empty_target!r}.")
  if on_too_long not in _LONG_POLICIES:
    raise ValueError(f"on_too_long must be one of {_LONG_POLICIES}, got {on_too_long!r}.")
  if max_input_chars is not None and max_input_chars < 1:
    raise ValueError(f"max_input_chars must be >= 1 or None, got {max_input_chars}.")
  stats = dict(read=0, kept=0, dropped_empty_target=0, truncated_input=0, dropped_too_long=0)
  records = []
  for lineno, obj in iter_jsonl(path):
    stats["read"] += 1
    text = require_str(path, lineno, obj, input_key, option="input_key")
    target = require_str(path, lineno, obj, target_key, option="target_key")
    if not target.strip():
      if on_empty_target == "error":
        raise JsonlError(
          f"{path}:{lineno}: empty target; fill it in, or pass on_empty_target='drop' or 'keep'."
        )
      if on_empty_target == "drop":
        stats["dropped_empty_target"] += 1
        continue
    if max_input_chars is not None and len(text) > max_input_chars:
      if on_too_long == "error":
        raise JsonlError(
          f"{path}:{lineno}: input has {len(text)} characters, over max_input_chars="
          f"{max_input_chars}; raise max_input_chars, or pass on_too_long='truncate' or 'drop'."
        )
      if on_too_long == "drop":
        stats["dropped_too_long"] += 1
        continue
      text = text[:max_input_chars]
      stats["truncated_input"] += 1
    records.append({"input": text, "target": target, "line": lineno})
  stats["kept"] = len(records)
  dropped = stats["dropped_empty_target"] + stats["dropped_too_long"]
  if dropped or stats["truncated_input"]:
    logging.warning(
      "%s: dropped %d empty-target and %d over-long records, truncated %d inputs (of %d read).",
      path, stats["dropped_empty_target"], stats["dropped_too_long"], stats["truncated_input"],
      stats["read"],
    )  # fmt: skip
  if not records:
    raise JsonlError(
      f"{path}: no records left after the policies ({stats}); check the file or relax "
      "on_empty_target / on_too_long."
    )
  return records, stats


@dataclasses.dataclass(eq=False)
class JsonlSeq2seqConfig(tfds.core.BuilderConfig):
  """Split -> file mapping and reading options (see :func:`read_seq2seq_jsonl`)."""

  paths: dict[str, str] = dataclasses.field(default_factory=dict)
  read_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def normalize_paths(paths: str | dict[str, str]) -> dict[str, str]:
  """A single path means ``{"train": path}``; paths become absolute."""
  if isinstance(paths, str):
    paths = {"train": paths}
  if not paths:
    raise ValueError("no files given; pass {'train': 'path.jsonl', ...} or a single path.")
  return {split: os.path.abspath(p) for split, p in paths.items()}


def _content_payload(paths: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
  for split, p in paths.items():
    if not os.path.isfile(p):
      raise JsonlError(f"{p} (split {split!r}): no such file; pass an existing .jsonl path.")
  return {"files": {s: base.file_sha256(p) for s, p in sorted(paths.items())}, "options": options}


def make_config(paths: str | dict[str, str], **read_options: Any) -> JsonlSeq2seqConfig:
  paths = normalize_paths(paths)
  return JsonlSeq2seqConfig(
    name=base.config_name("files", _content_payload(paths, read_options)),
    paths=paths, read_options=read_options,
  )  # fmt: skip


class JsonlSeq2seq(base.LocalBuilder):
  """Local seq2seq JSON-lines files (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {"input": tfds.features.Text(), "target": tfds.features.Text(), "line": np.int32}
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    out, stats = {}, {}
    for split, path in cfg.paths.items():
      records, stats[split] = read_seq2seq_jsonl(path, **cfg.read_options)
      out[split] = self._generate_examples(records)
    self.info.metadata.update({"files": cfg.paths, "stats": stats})
    return out

  def _generate_examples(self, records):
    for r in records:
      yield r["line"], r


def builder(
  paths: str | dict[str, str], *, data_dir: str | None = None, prepare: bool = True, **options
) -> JsonlSeq2seq:
  """The prepared builder for ``paths`` (split -> file) and reading options."""
  b = JsonlSeq2seq(
    config=make_config(paths, **options),
    data_dir=data_dir or base.default_data_dir(),
    file_format="array_record",
  )
  return base.prepare(b) if prepare else b


def load_split(paths: str | dict[str, str], split: str = "train", **kwargs):
  """A random-access source of ``{"input", "target", "line"}`` records for ``split``."""
  return base.data_source(builder(paths, **kwargs), split)
