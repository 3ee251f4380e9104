"""Preference pairs on disk and in arrays: a pair directory written by ``rso_sample``
(``chunk-*.jsonl``, one line per prompt with its labeled pairs; format in
:mod:`slicjax.pipelines.rso`) or a ``{prompt, chosen, rejected}`` text JSON-lines file ->
one dict per pair -> padded training arrays. Used by reward-model training, preference training
and the synthetic-gold experiment; it imports none of them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from slicjax.pipelines import candidates as cand_lib


def has_chunks(out_dir: str) -> bool:
  import glob

  return bool(out_dir) and bool(glob.glob(os.path.join(out_dir, "chunk-*.jsonl")))


def read_rows(out_dir: str) -> list[dict[str, Any]]:
  """Every prompt line of a pair directory, in index order (raises on gaps or bad lines)."""
  if not has_chunks(out_dir):
    raise ValueError(f"no pair chunks (chunk-*.jsonl) in {out_dir!r}; run rso_sample first.")
  try:
    return cand_lib.read_candidates(out_dir)
  except ValueError as e:
    raise ValueError(f"pair directory {out_dir}: {e} (rerun rso_sample to rewrite it)") from e


def flatten_pairs(rows) -> list[dict[str, Any]]:
  """Per-prompt rows -> one dict per pair (``prompt``, ``chosen``, ``rejected``, ``target``,
  ``ref_chosen_logp``, ``ref_rejected_logp``, ``chosen_reward``, ``rejected_reward``, ``best``
  (``None`` if absent), ``index``, ``source``)."""
  out = []
  for r in rows:
    for p in r["pairs"]:
      out.append(
        dict(
          index=r["index"],
          source=r.get("source"),
          prompt=r["prompt"],
          target=r.get("target") or p["chosen"],
          chosen=p["chosen"],
          rejected=p["rejected"],
          ref_chosen_logp=p.get("ref_chosen_logp"),
          ref_rejected_logp=p.get("ref_rejected_logp"),
          chosen_reward=p.get("chosen_reward"),
          rejected_reward=p.get("rejected_reward"),
          best=r.get("best"),
        )
      )
  return out


def read_text_pairs(path: str, data) -> list[dict[str, Any]]:
  """``{"prompt", "chosen", "rejected"}`` text JSON lines, tokenized with the task's tokenizer
  (completions end with EOS). Reference log-probs are absent (computed later, once)."""
  from slicjax.data.builders import jsonl_preference
  from slicjax.data.pipeline import TruncationStats, tokenize_example

  if data.tokenizer is None:
    raise ValueError(
      f"{path} holds text pairs but task {data.name!r} has no tokenizer; use a "
      "text task (data.name) or give token-id pairs as a pair directory."
    )
  _, records = jsonl_preference.read_preference_jsonl(path, format="pairs")
  stats = TruncationStats(2 * len(records), what="pair completions")  # logs the cut count
  opts = dict(input_len=data.input_len, target_len=data.target_len, stats=stats)
  out = []
  for i, r in enumerate(records):
    w = tokenize_example({"input": r["prompt"], "target": r["chosen"]}, data.tokenizer, **opts)
    lose = tokenize_example({"input": r["prompt"], "target": r["rejected"]}, data.tokenizer, **opts)
    out.append(
      dict(
        index=i,
        source="direct",
        prompt=w["inputs"].tolist(),
        chosen=w["targets"].tolist(),
        rejected=lose["targets"].tolist(),
        target=w["targets"].tolist(),
        ref_chosen_logp=None,
        ref_rejected_logp=None,
      )
    )
  return out


def read_pairs(path: str, data=None) -> list[dict[str, Any]]:
  """Pairs from a pair directory (``rso_sample`` output) or a text ``.jsonl`` pairs file."""
  if os.path.isdir(path):
    pairs = flatten_pairs(read_rows(path))
  elif os.path.isfile(path):
    pairs = read_text_pairs(path, data)
  else:
    raise ValueError(
      f"pairs path {path!r} does not exist; give a pair directory written by "
      "rso_sample or a {prompt, chosen, rejected} .jsonl file."
    )
  if not pairs:
    raise ValueError(
      f"{path} holds no preference pairs (every prompt tied or had < 2 unique "
      "samples); sample more or lower the temperature of the reward."
    )
  return pairs


def pairs_to_arrays(pairs, input_len: int, target_len: int) -> dict[str, np.ndarray]:
  """Stacks pairs into padded arrays: ``inputs [P, S]``, ``chosen``, ``rejected``, ``target``
  ``[P, L]``, ``index [P]`` and, when every pair has them, ``ref_chosen_logp``,
  ``ref_rejected_logp [P]``. Raises on a sequence longer than its padded length."""
  n = len(pairs)
  out = {"inputs": np.zeros((n, input_len), np.int32)}
  for key in ("chosen", "rejected", "target"):
    out[key] = np.zeros((n, target_len), np.int32)
  for i, p in enumerate(pairs):
    for key, width in (
      ("prompt", input_len),
      ("chosen", target_len),
      ("rejected", target_len),
      ("target", target_len),
    ):
      seq = p[key]
      if len(seq) > width:
        raise ValueError(
          f"pair {i} ({key}) has {len(seq)} tokens, over the padded length "
          f"{width}; raise data.input_len / data.target_len."
        )
      out["inputs" if key == "prompt" else key][i, : len(seq)] = seq
  same = np.all(out["chosen"] == out["rejected"], axis=1)
  if same.any():
    first = int(np.argmax(same))
    raise ValueError(
      f"{int(same.sum())} of {n} preference pair(s) have chosen == rejected (first: pair "
      f"{first}, prompt index {pairs[first]['index']}); such a pair states no preference. "
      "Remove them from the pairs file (or fix how it was made)."
    )
  out["index"] = np.asarray([p["index"] for p in pairs], np.int32)
  if all(p.get("ref_chosen_logp") is not None for p in pairs):
    out["ref_chosen_logp"] = np.asarray([p["ref_chosen_logp"] for p in pairs], np.float32)
    out["ref_rejected_logp"] = np.asarray([p["ref_rejected_logp"] for p in pairs], np.float32)
  return out
