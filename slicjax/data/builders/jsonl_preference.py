"""``jsonl_preference``: local preference pairs and SLiC candidate sets as JSON-lines files.

Two record formats, one JSON object per line (blank lines skipped, extra fields ignored):

**pairs** — human or model preference pairs (DPO / IPO / hinge / SLiC-HF training)::

  {"prompt": str, "chosen": str, "rejected": str}

(field names configurable with ``prompt_key``, ``chosen_key``, ``rejected_key``).

**candidates** — what the SLiC candidate-generation stage writes, one line per input::

  {"input": str, "target": str,
   "candidates": [str, ...],   # K >= 1 decoded candidates for the input
   "scores": [float, ...],     # K similarities of each candidate to the target (higher = closer)
   "logp": [float, ...]}       # K model log-likelihoods, sum_t log P(y_t | y_<t, x) (not
                               # length-normalised), from the model that produced the candidates

The three lists have the same length K (per line; ``num_candidates`` can require a fixed K),
and every number is finite. Files that use other field names (e.g. ``sim`` for ``scores``)
read with ``candidate_keys={"scores": "sim", ...}`` and come back under the names above. :func:`write_candidates_jsonl` validates and writes this format;
:func:`read_preference_jsonl` reads either one (``format="auto"`` looks at the first record).
Malformed lines raise :class:`~slicjax.data.builders.jsonl_seq2seq.JsonlError` naming the file,
line and fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable

import numpy as np
import tensorflow_datasets as tfds

from slicjax.data.builders import base
from slicjax.data.builders.jsonl_seq2seq import (
  JsonlError,
  iter_jsonl,
  normalize_paths,
  require_str,
)

FORMATS = ("pairs", "candidates")
CANDIDATE_LISTS = ("candidates", "scores", "logp")


def _number_list(path, lineno, obj, key) -> list[float]:
  value = obj[key]
  if not isinstance(value, list) or not all(
    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
  ):
    raise JsonlError(f"{path}:{lineno}: {key!r} must be a list of numbers; write e.g. [0.5, 0.25].")
  if not all(math.isfinite(v) for v in value):
    raise JsonlError(
      f"{path}:{lineno}: {key!r} holds a non-finite number (NaN or inf); fix the stage that "
      "wrote it (e.g. an empty candidate scored as -inf)."
    )
  return [float(v) for v in value]


def validate_candidate_record(
  obj: dict[str, Any],
  *,
  path: str = "<record>",
  lineno: int = 0,
  num_candidates: int | None = None,
  keys: dict[str, str] | None = None,
) -> dict[str, Any]:
  """Checks one candidate-set record and returns it under the canonical field names.

  Args:
    obj: the record.
    path, lineno: where it came from (for error messages).
    num_candidates: require exactly this many candidates.
    keys: canonical name -> the name used in ``obj`` for any of ``input``, ``target``,
      ``candidates``, ``scores``, ``logp`` (e.g. ``{"scores": "sim"}``).
  """
  keys = {k: k for k in ("input", "target") + CANDIDATE_LISTS} | dict(keys or {})
  out = {
    name: require_str(path, lineno, obj, keys[name], option=f"candidate_keys['{name}']")
    for name in ("input", "target")
  }
  missing = [keys[k] for k in CANDIDATE_LISTS if keys[k] not in obj]
  if missing:
    raise JsonlError(
      f"{path}:{lineno}: missing field(s) {missing} (present: {sorted(obj)}); candidate records "
      "need candidates, scores and logp lists of equal length (rename fields with "
      "candidate_keys)."
    )
  cands = obj[keys["candidates"]]
  if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
    raise JsonlError(
      f"{path}:{lineno}: {keys['candidates']!r} must be a non-empty list of strings; write at "
      "least one decoded candidate."
    )
  out["candidates"] = list(cands)
  out["scores"] = _number_list(path, lineno, obj, keys["scores"])
  out["logp"] = _number_list(path, lineno, obj, keys["logp"])
  k = len(cands)
  if len(out["scores"]) != k or len(out["logp"]) != k:
    raise JsonlError(
      f"{path}:{lineno}: {k} candidates but {len(out['scores'])} scores and {len(out['logp'])} "
      "logp values; write one score and one logp per candidate."
    )
  if num_candidates is not None and k != num_candidates:
    raise JsonlError(
      f"{path}:{lineno}: {k} candidates where num_candidates={num_candidates}; regenerate with "
      "that many candidates or change num_candidates."
    )
  return out


def read_preference_jsonl(
  path: str,
  *,
  format: str = "auto",
  prompt_key: str = "prompt",
  chosen_key: str = "chosen",
  rejected_key: str = "rejected",
  num_candidates: int | None = None,
  candidate_keys: dict[str, str] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
  """Reads and validates a preference file. Returns ``(format, records)``.

  Pairs come back as ``{"prompt", "chosen", "rejected"}``; candidate sets as in the module
  docstring, under the canonical names whatever ``candidate_keys`` renamed (see
  :func:`validate_candidate_record`). ``format="auto"`` chooses ``candidates`` if the first
  record has a candidates field, else ``pairs``.
  """
  if format not in ("auto",) + FORMATS:
    raise ValueError(f"format must be 'auto', 'pairs' or 'candidates', got {format!r}.")
  cands_key = (candidate_keys or {}).get("candidates", "candidates")
  records: list[dict[str, Any]] = []
  for lineno, obj in iter_jsonl(path):
    if format == "auto":
      format = "candidates" if cands_key in obj else "pairs"
    if format == "candidates":
      records.append(
        validate_candidate_record(
          obj, path=path, lineno=lineno, num_candidates=num_candidates, keys=candidate_keys
        )
      )
    else:
      records.append(
        {
          "prompt": require_str(path, lineno, obj, prompt_key, option="prompt_key"),
          "chosen": require_str(path, lineno, obj, chosen_key, option="chosen_key"),
          "rejected": require_str(path, lineno, obj, rejected_key, option="rejected_key"),
        }
      )
  return format, records


def write_candidates_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
  """Validates candidate-set records and writes them (atomically) as JSON lines.

  Returns:
    the number of records written.
  """
  checked = [validate_candidate_record(r, lineno=i) for i, r in enumerate(records, start=1)]
  if not checked:
    raise ValueError("no candidate records to write; generate candidates first.")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in checked:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return len(checked)


def _features(fmt: str) -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  if fmt == "pairs":
    return tfds.features.FeaturesDict({"prompt": text(), "chosen": text(), "rejected": text()})
  return tfds.features.FeaturesDict(
    {
      "input": text(),
      "target": text(),
      "candidates": tfds.features.Sequence(text()),
      "scores": tfds.features.Sequence(np.float32),
      "logp": tfds.features.Sequence(np.float32),
    }
  )


@dataclasses.dataclass(eq=False)
class JsonlPreferenceConfig(tfds.core.BuilderConfig):
  """Split -> file mapping, the record format and reading options."""

  paths: dict[str, str] = dataclasses.field(default_factory=dict)
  format: str = "pairs"
  read_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_config(
  paths: str | dict[str, str], *, format: str = "auto", **read_options
) -> JsonlPreferenceConfig:
  """A config whose name hashes the files' contents, the format and the options."""
  paths = normalize_paths(paths)
  if format == "auto":  # decide from the first file so the features are fixed up front
    first = paths.get("train", next(iter(paths.values())))
    format, _ = read_preference_jsonl(first, **read_options)
  if format not in FORMATS:
    raise ValueError(f"format must be 'auto', 'pairs' or 'candidates', got {format!r}.")
  for split, p in paths.items():
    if not os.path.isfile(p):
      raise JsonlError(f"{p} (split {split!r}): no such file; pass an existing .jsonl path.")
  payload = {
    "files": {s: base.file_sha256(p) for s, p in sorted(paths.items())},
    "format": format, "options": read_options,
  }  # fmt: skip
  return JsonlPreferenceConfig(
    name=base.config_name(format, payload), paths=paths, format=format, read_options=read_options
  )


class JsonlPreference(base.LocalBuilder):
  """Local preference-pair or candidate-set JSON-lines files (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=_features(self.builder_config.format),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    out, counts = {}, {}
    for split, path in cfg.paths.items():
      _, records = read_preference_jsonl(path, format=cfg.format, **cfg.read_options)
      counts[split] = len(records)
      out[split] = self._generate_examples(records)
    self.info.metadata.update({"files": cfg.paths, "format": cfg.format, "counts": counts})
    return out

  def _generate_examples(self, records):
    for i, r in enumerate(records):
      yield i, r


def builder(
  paths: str | dict[str, str], *, data_dir: str | None = None, prepare: bool = True, **options
) -> JsonlPreference:
  """The prepared builder for ``paths`` (split -> file); options as in :func:`make_config`."""
  b = JsonlPreference(
    config=make_config(paths, **options),
    data_dir=data_dir or base.default_data_dir(),
    file_format="array_record",
  )
  return base.prepare(b) if prepare else b


def load_split(paths: str | dict[str, str], split: str = "train", **kwargs):
  """A random-access source of preference records for ``split``."""
  return base.data_source(builder(paths, **kwargs), split)
