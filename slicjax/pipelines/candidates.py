"""SLiC step 1-2: decode m candidates per training example and score them against the target.

Output: a directory of JSON-lines chunks ``chunk-00000.jsonl`` ... Chunk ``c`` always holds the
examples ``[c * chunk_size, (c + 1) * chunk_size)`` of the split, whatever the number of processes,
and process ``p`` of ``P`` writes the chunks with ``c % P == p``. Each chunk is written to a
temporary name and renamed, so a killed run leaves only complete chunks, and a restart skips
them: no example is duplicated or dropped. Every line is one example::

  {"index": int, "inputs": [ids], "targets": [ids], "candidates": [[ids] * K],
   "logp": [K floats], "sim": [K floats], "method": str,
   "input_text": str, "target_text": str, "candidate_texts": [str] * K,
   "ref_topk_logp": [[k floats] * L], "ref_topk_ids": [[k ints] * L]}   # last two optional

``logp`` is the decoding model's sequence log-likelihood of each candidate, ``sim`` the
similarity to the target (``latent``, ``rouge`` or ``token_embedding``).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from slicjax import scoring, similarity
from slicjax.data import iterators
from slicjax.decoding import api as decoding_api
from slicjax.pipelines import common, drafts, tasks, validation

CANDIDATE_KEYS = dict(
  finetuned_workdir="", split="train", num_examples=512, num_candidates=8, method="beam",
  similarity="rouge", batch_size=16, chunk_size=64, seed=0, temperature=0.7, top_k=40,
  top_p=1.0, alpha=0.0, num_groups=4, diversity_strength=0.5, store_ref_topk=0,
  rouge_workers=1, max_len=0, progress=True, length_penalty_style="gnmt", finish_top_2k=False,
  **drafts.DRAFT_KEYS,
)


METHODS = ("beam", "greedy", "sample", "diverse_beam")


def candidate_config(config) -> dict[str, Any]:
  c = common.to_dict(config.get("candidates"))
  common.check_keys(c, CANDIDATE_KEYS, "candidates")
  c = {**CANDIDATE_KEYS, **c}
  if c["method"] not in METHODS:
    raise ValueError(
      f"candidates.method={c['method']!r}; choose from {list(METHODS)} (speculative decoding: "
      "method=greedy or sample with candidates.draft)."
    )
  validation.count(c["num_candidates"], "candidates.num_candidates")
  for k in ("batch_size", "chunk_size", "rouge_workers"):
    validation.count(c[k], f"candidates.{k}")
  validation.count(c["num_examples"], "candidates.num_examples", minimum=0)
  validation.count(c["max_len"], "candidates.max_len", minimum=0)
  if c["method"] == "sample":
    validation.finite(c["temperature"], "candidates.temperature")
    validation.finite(c["top_p"], "candidates.top_p", high=1.0)
  if c["method"] == "diverse_beam" and c["num_candidates"] % c["num_groups"]:
    raise ValueError(
      f"candidates.num_candidates={c['num_candidates']} must be a multiple of "
      f"candidates.num_groups={c['num_groups']} for diverse beam search."
    )
  drafts.check(c, "candidates")
  return c


def decode_options(c: dict[str, Any]) -> dict[str, Any]:
  """The options of ``slicjax.decoding.api.decode`` for a candidate config."""
  k, method = c["num_candidates"], c["method"]
  beam = dict(alpha=c["alpha"], length_penalty_style=c["length_penalty_style"],
              finish_top_2k=bool(c["finish_top_2k"]))
  if method == "beam":
    return dict(beam_size=k, **beam)
  if method == "diverse_beam":
    return dict(beam_size=k, num_groups=c["num_groups"],
                diversity_strength=c["diversity_strength"], **beam)
  if method == "sample":
    return dict(num_samples=k, temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"])
  if method == "greedy":
    return {}
  raise ValueError(f"unknown decoding method {method!r}; use beam, diverse_beam, sample, greedy.")


def embedding_table(params) -> jax.Array:
  """The token embedding ``[V, D]`` of any family, found by name (``token_embed/embedding``,
  under a LoRA tree's ``base`` too), never a position or relative-position table."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  found = []
  for path, leaf in flat:
    keys = [str(getattr(p, "key", p)) for p in path]
    if keys[-2:] == ["token_embed", "embedding"] and getattr(leaf, "ndim", 0) == 2:
      found.append(leaf)
  if len(found) != 1:
    raise ValueError(
      f"token_embedding similarity needs exactly one token_embed/embedding table in params, "
      f"found {len(found)}; use similarity=latent or rouge for this model."
    )
  return found[0]


def similarity_scores(
  kind: str, model, params, inputs_BxS, targets_BxL, cands_BxKxL, cand_texts, target_texts,
  *, rouge_workers: int = 1,
) -> np.ndarray:
  """``[B, K]`` similarity of each candidate to its target."""
  cmask = (cands_BxKxL != 0).astype(jnp.float32)
  tmask = (targets_BxL != 0).astype(jnp.float32)
  if kind == "latent":
    hc = scoring.score_candidates(model, params, inputs_BxS, cands_BxKxL, return_hidden=True)
    ht = scoring.score_targets(
      model, params, {"inputs": inputs_BxS, "targets": targets_BxL}, return_hidden=True
    )
    return np.asarray(similarity.latent_similarity(hc["hidden"], cmask, ht["hidden"], tmask))
  if kind == "token_embedding":
    return np.asarray(similarity.token_embedding_similarity(
      cands_BxKxL, cmask, targets_BxL, tmask, embedding_table(params)
    ))
  if kind == "none":
    return None
  if kind == "rouge":
    b, k = len(cand_texts), len(cand_texts[0])
    flat_c = [c for row in cand_texts for c in row]
    flat_r = [r for r in target_texts for _ in range(k)]
    scores = similarity.rouge_scores(flat_c, flat_r, num_workers=rouge_workers)
    mean = np.mean([np.asarray(scores[t]) for t in ("rouge1", "rouge2", "rougeL")], axis=0)
    return mean.reshape(b, k)
  raise ValueError(f"unknown similarity {kind!r}; use latent, rouge, token_embedding or none.")


def _chunk_path(out_dir: str, c: int) -> str:
  return os.path.join(out_dir, f"chunk-{c:05d}.jsonl")


MANIFEST = "manifest.json"
# Keys that do not change what is written (speed, logging) stay out of the manifest's hash.
_UNHASHED = ("progress", "batch_size", "rouge_workers", "finetuned_workdir", "sft_workdir",
             "reward_workdir", "draft", "num_draft")


def manifest_for(config, section: str, *, num_items: int, per_item: int,
                 chunk_size: int) -> dict[str, Any]:
  """What an output directory's chunks were made with: a hash of the config sections that
  shape them (the job's section, data, model, pretrained), the count per example (K) and the
  number of examples."""
  import hashlib

  cfg = common.to_dict(config)
  shaping = {
    section: {k: v for k, v in (cfg.get(section) or {}).items() if k not in _UNHASHED},
    **{k: cfg.get(k) for k in ("data", "model", "pretrained", "lora")},
  }
  digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()
  return dict(kind=section, config_hash=digest[:16], per_example=int(per_item),
              num_examples=int(num_items), chunk_size=int(chunk_size), config=shaping)


def check_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
  """Writes ``manifest.json`` into a new output directory, or checks that an existing one (a
  resumed run) was made with the same config; refuses to mix two configs' chunks.

  Raises:
    ValueError: the directory holds chunks of another config (naming the differing keys).
  """
  path = os.path.join(out_dir, MANIFEST)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("config_hash") != manifest["config_hash"] or any(
      old.get(k) != manifest[k] for k in ("per_example", "num_examples", "chunk_size")
    ):
      diffs = _dict_diff(old.get("config", {}), manifest["config"])
      for k in ("per_example", "num_examples", "chunk_size"):
        if old.get(k) != manifest[k]:
          diffs.append(f"{k}: {old.get(k)!r} -> {manifest[k]!r}")
      raise ValueError(
        f"{out_dir} holds chunks written with another config ({'; '.join(diffs[:6])}); "
        "mixing them would give examples different candidate sets. Use a fresh --workdir, "
        "or delete the directory to regenerate it."
      )
    return
  if glob.glob(os.path.join(out_dir, "chunk-*.jsonl")):
    logging.warning("%s has chunks but no %s (written before manifests); resuming without "
                    "the config check.", out_dir, MANIFEST)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=2, default=str)
    os.replace(tmp, path)


def check_complete(out_dir: str, rows, *, allow_partial: bool = False) -> None:
  """Raises when a candidate directory holds fewer examples than its manifest promises (a
  generation stopped part-way), unless ``allow_partial`` (then it logs the shortfall)."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return
  with open(path) as f:
    expected = int(json.load(f)["num_examples"])
  if len(rows) >= expected:
    return
  msg = (f"{out_dir} holds {len(rows)} of the {expected} examples its generation was asked "
         "for (it stopped part-way)")
  if not allow_partial:
    raise ValueError(
      f"{msg}; rerun generate_candidates with the same config to finish it (it resumes), or "
      "set calibrate.allow_partial_candidates=True to calibrate on what is there."
    )
  logging.warning("%s; calibrating on those (allow_partial_candidates=True).", msg)


def _dict_diff(a, b, prefix="") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      out.extend(_dict_diff(x, y, f"{prefix}{k}."))
    elif x != y:
      out.append(f"{prefix}{k}: {x!r} -> {y!r}")
  return out


def generate(config, out_dir: str, *, params=None, model=None, data=None) -> str:
  """Writes the candidate set for ``config.candidates`` into ``out_dir``; returns ``out_dir``."""
  c = candidate_config(config)
  out_dir = validation.workdir(out_dir, "--workdir (candidate directory)")
  if params is None:
    validation.run_dir(c["finetuned_workdir"], "candidates.finetuned_workdir")
    if model is None:
      validation.model_matches_run(config, c["finetuned_workdir"], "candidates.finetuned_workdir")
  model = model or common.model_from(config)
  data = data or tasks.load(config, batch_size=c["batch_size"], seed=c["seed"])
  if params is None:
    params = common.params_from(config, c["finetuned_workdir"], "candidates.finetuned_workdir")
  examples = data.train_examples if c["split"] == "train" else data.eval_examples
  n = min(c["num_examples"], len(examples)) if c["num_examples"] else len(examples)
  if n == 0:
    raise ValueError(f"split {c['split']!r} is empty: nothing to generate candidates for.")
  draft = drafts.load(c["draft"], model, params, "candidates")
  chunk = c["chunk_size"]
  check_manifest(out_dir, manifest_for(config, "candidates", num_items=n,
                                       per_item=c["num_candidates"], chunk_size=chunk))
  num_chunks = (n + chunk - 1) // chunk
  mine = [i for i in range(num_chunks) if i % jax.process_count() == jax.process_index()]
  todo = [i for i in mine if not os.path.exists(_chunk_path(out_dir, i))]
  options = decode_options(c)
  max_len = c["max_len"] or data.target_len
  bar = None
  if c["progress"] and jax.process_index() == 0:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine) * chunk, initial=(len(mine) - len(todo)) * chunk,
               desc="candidates", unit="ex", dynamic_ncols=True)
  written = 0
  try:
    for ci in todo:
      lo, hi = ci * chunk, min((ci + 1) * chunk, n)
      rows = []
      for b0 in range(lo, hi, c["batch_size"]):
        idx = list(range(b0, min(b0 + c["batch_size"], hi)))
        rows.extend(_generate_batch(c, model, params, data, examples, idx, options, max_len,
                                    draft))
        if bar is not None:
          bar.update(len(idx))
      tmp = _chunk_path(out_dir, ci) + f".tmp{jax.process_index()}"
      with open(tmp, "w") as f:
        for r in rows:
          f.write(json.dumps(r) + "\n")
      os.replace(tmp, _chunk_path(out_dir, ci))
      written += 1
  except BaseException:  # KeyboardInterrupt / SIGTERM / errors: say what is there
    done = len(mine) - len(todo) + written
    logging.error(
      "candidate generation stopped after %d of %d chunks in %s; complete chunks are kept and "
      "rerunning the same command resumes from there.", done, len(mine), out_dir,
    )
    raise
  finally:
    if bar is not None:
      bar.close()
  return out_dir


def _generate_batch(c, model, params, data, examples, idx, options, max_len, draft=None):
  batch_ex = [examples[i] for i in idx]
  # Pad the batch to a fixed size so one compiled program serves every batch.
  pad_to = c["batch_size"]
  padded = batch_ex + [batch_ex[-1]] * (pad_to - len(batch_ex))
  arrays = iterators.pad_batch(padded, data.input_len, data.target_len)
  inputs, targets = jnp.asarray(arrays["inputs"]), jnp.asarray(arrays["targets"])
  rng = jax.random.PRNGKey(c["seed"])
  example_ids = jnp.asarray(idx + [idx[-1]] * (pad_to - len(idx)), jnp.int32)
  method, options = drafts.decode_args(c["method"], options, draft, c["num_draft"])
  result = decoding_api.decode(
    model, params, inputs, method=method, max_len=max_len, rng=rng,
    example_ids=example_ids, **options,
  )
  cands = np.asarray(result.tokens_BxKxL)
  if cands.shape[-1] < data.target_len:
    cands = np.pad(cands, ((0, 0), (0, 0), (0, data.target_len - cands.shape[-1])))
  cands = cands[:, :, : data.target_len]
  cand_texts = [[data.detokenize(y) for y in row] for row in cands]
  target_texts = [data.detokenize(t) for t in np.asarray(targets)]
  # Rescore with teacher forcing: the same number whatever the decoding method reported.
  scored = scoring.score_candidates(model, params, inputs, jnp.asarray(cands))
  sim = similarity_scores(
    c["similarity"], model, params, inputs, targets, jnp.asarray(cands), cand_texts,
    target_texts, rouge_workers=c["rouge_workers"],
  )
  topk = None
  if c["store_ref_topk"]:
    from slicjax.losses import regularizers

    logits = scoring.score_targets(model, params, {"inputs": inputs, "targets": targets})["logits"]
    topk = regularizers.topk_logprobs(logits, c["store_ref_topk"])
  rows = []
  for j, i in enumerate(idx):
    r = {
      "index": i, "inputs": _ids(arrays["inputs"][j]), "targets": _ids(arrays["targets"][j]),
      "candidates": [_ids(y) for y in cands[j]],
      "logp": [float(x) for x in np.asarray(scored["logp"][j])],
      "sim": None if sim is None else [float(x) for x in sim[j]], "method": c["method"],
      "input_text": data.detokenize(arrays["inputs"][j]), "target_text": target_texts[j],
      "candidate_texts": cand_texts[j],
    }
    if topk is not None:
      r["ref_topk_logp"] = np.asarray(topk[0][j]).round(5).tolist()
      r["ref_topk_ids"] = np.asarray(topk[1][j]).tolist()
    rows.append(r)
  return rows


def _ids(a) -> list[int]:
  a = [int(x) for x in np.asarray(a)]
  while a and a[-1] == 0:
    a.pop()
  return a


def read_candidates(out_dir: str) -> list[dict[str, Any]]:
  """All examples of a candidate directory, in index order (checks there are no gaps)."""
  files = sorted(glob.glob(os.path.join(out_dir, "chunk-*.jsonl")))
  if not files:
    raise ValueError(f"no candidate chunks in {out_dir}; run generate_candidates first.")
  rows = []
  for path in files:
    with open(path) as f:
      for ln, line in enumerate(f, 1):
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{ln}: malformed candidate line ({e}); delete the file and "
                           "rerun generate_candidates to rewrite that chunk.") from e
  ks = {}
  for r in rows:
    if "candidates" in r:
      ks.setdefault(len(r["candidates"]), r["index"])
  if len(ks) > 1:
    raise ValueError(
      f"{out_dir} mixes candidate sets of different sizes K={sorted(ks)} (e.g. example "
      f"{min(ks.values())} has K={min(ks, key=ks.get)}, example {max(ks.values())} has "
      f"K={max(ks, key=ks.get)}): two generate_candidates runs wrote into it. Regenerate it "
      "into a fresh directory."
    )
  rows.sort(key=lambda r: r["index"])
  idx = [r["index"] for r in rows]
  if idx != list(range(len(idx))):
    missing = sorted(set(range(max(idx) + 1)) - set(idx))[:10]
    raise ValueError(f"candidate set in {out_dir} has gaps (missing indices {missing}...); rerun "
                     "generate_candidates to fill them.")
  return rows


def to_arrays(rows, input_len: int, target_len: int) -> dict[str, np.ndarray]:
  """Stacks candidate rows into padded arrays for the calibration stage."""
  n, k = len(rows), len(rows[0]["candidates"])
  out = iterators.pad_batch(
    [{"inputs": np.asarray(r["inputs"], np.int32), "targets": np.asarray(r["targets"], np.int32)}
     for r in rows], input_len, target_len,
  )
  cands = np.zeros((n, k, target_len), np.int32)
  for i, r in enumerate(rows):
    for j, y in enumerate(r["candidates"]):
      cands[i, j, : len(y)] = y[:target_len]
  out["candidates"] = cands
  if rows[0]["sim"] is None:
    raise ValueError("these candidates were generated with similarity='none'; regenerate them "
                     "with candidates.similarity=latent, rouge or token_embedding.")
  out["sim"] = np.asarray([r["sim"] for r in rows], np.float32)
  out["cand_logp"] = np.asarray([r["logp"] for r in rows], np.float32)
  out["cand_mask"] = (cands != 0).any(-1).astype(np.float32)
  if "ref_topk_logp" in rows[0]:
    kk = len(rows[0]["ref_topk_logp"][0])
    lp = np.full((n, target_len, kk), -1e9, np.float32)
    ids = np.zeros((n, target_len, kk), np.int32)
    for i, r in enumerate(rows):
      m = min(len(r["ref_topk_logp"]), target_len)
      lp[i, :m] = np.asarray(r["ref_topk_logp"][:m])
      ids[i, :m] = np.asarray(r["ref_topk_ids"][:m])
    out["ref_topk_logp"], out["ref_topk_ids"] = lp, ids
  return out
