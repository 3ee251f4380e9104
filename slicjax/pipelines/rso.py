"""Preference pairs from the SFT policy: sample -> reward -> (rejection sampling) -> rank -> pairs.

``mode="rso"`` (RSO, *rso-sample-rank*): ``N`` samples per prompt from π_sft (temperature 0.7,
top-k 40 by default), rewards from a reward model, statistical rejection sampling keeps ``M``
of them (temperature β), and tournament or first-round ranking labels pairs among those ``M``.
``mode="sft"`` (SLiC-HF, *sft-sample-rank*): no rejection sampling; the first ``M`` of the
samples are ranked (samples are i.i.d. per prompt, so they are ``M`` plain SFT samples; set
``num_samples = num_accept`` to draw only those).

Rewards (``rso.reward``): ``model`` — the reward model trained by
:func:`slicjax.pipelines.reward.train_reward` (``rso.reward_workdir``): a pointwise model's
``r(x, y)``, or a pairwise ranker's ``logit ρ(x, y, y_b)`` with ``y_b`` the prompt's first sample
(``rso.ranker_baseline=first_sample``) or its dataset target (``target``) as baseline (a ranker also labels the pairs itself, comparing the two completions); ``gold`` —
the ROUGE of the sample to the dataset target (:func:`gold_rewards`), the synthetic "human".

Output: resumable JSON-lines chunks written like ``pipelines/candidates.py`` (chunk ``c`` holds
prompts ``[c·chunk_size, (c+1)·chunk_size)``, process ``p`` of ``P`` writes ``c % P == p``, a
chunk appears atomically). One line per prompt::

  {"index": int, "source": "rso-sample-rank" | "sft-sample-rank" | "direct",
   "prompt": [ids], "target": [ids], "prompt_text": str, "target_text": str,
   "num_samples": N, "num_valid": int, "num_accepted": int, "num_unique": int,
   "expected_acceptance": float | null,      # RSO: mean_i exp((r_i - r_max) / β)
   "accepted_rewards": [float], "num_ties": int | null,   # null for first_round ranking
   "best": [ids] | null,                     # the highest-reward accepted sample
   "pairs": [{"chosen": [ids], "rejected": [ids], "chosen_text": str, "rejected_text": str,
              "chosen_reward": float, "rejected_reward": float,
              "ref_chosen_logp": float, "ref_rejected_logp": float}]}

``ref_*_logp`` are the SFT policy's sequence log-likelihoods, computed once here so preference
training needs no second model resident. Identical accepted samples are kept once (counted in
``num_unique``); ties of the judge give no pair (``num_ties``).

References: Liu et al., "Statistical Rejection Sampling Improves Preference Optimization",
ICLR 2024 (arXiv 2309.06657); Zhao et al., "SLiC-HF", 2023 (arXiv 2305.10425).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from slicjax import scoring, similarity
from slicjax.data import iterators
from slicjax.decoding import api as decoding_api
from slicjax.pipelines import candidates as cand_lib
from slicjax.pipelines import common, drafts, preference_pairs, tasks, validation
from slicjax.pipelines import reward as reward_lib
from slicjax.preference import ranking, rejection_sampling

RSO_KEYS = dict(
  sft_workdir="",
  reward_workdir="",
  reward="model",
  mode="rso",
  split="train",
  num_examples=512,
  num_samples=64,
  num_accept=8,
  beta=0.5,
  max_rounds=0,
  ranking="tournament",
  temperature=0.7,
  top_k=40,
  top_p=1.0,
  max_len=0,
  batch_size=8,
  chunk_size=64,
  seed=0,
  symmetric=True,
  ranker_baseline="first_sample",
  progress=True,
  **drafts.DRAFT_KEYS,
)
MODES = ("rso", "sft")
SOURCES = {"rso": "rso-sample-rank", "sft": "sft-sample-rank"}
RANKINGS = ("tournament", "first_round")
RANKER_BASELINES = ("first_sample", "target")


def rso_config(config) -> dict[str, Any]:
  c = common.to_dict(config.get("rso"))
  common.check_keys(c, RSO_KEYS, "rso")
  c = {**RSO_KEYS, **c}
  if c["mode"] not in MODES:
    raise ValueError(f"rso.mode={c['mode']!r}; choose 'rso' (rso-sample-rank) or 'sft'.")
  if c["ranking"] not in RANKINGS:
    raise ValueError(f"rso.ranking={c['ranking']!r}; choose from {RANKINGS}.")
  if c["ranker_baseline"] not in RANKER_BASELINES:
    raise ValueError(
      f"rso.ranker_baseline={c['ranker_baseline']!r}; choose 'first_sample' (the prompt's first "
      "SFT sample, RSO's choice) or 'target' (the dataset target) as the ranker's y_b."
    )
  if c["reward"] not in ("model", "gold"):
    raise ValueError(f"rso.reward={c['reward']!r}; choose 'model' (reward_workdir) or 'gold'.")
  m, n = int(c["num_accept"]), int(c["num_samples"])
  if m < 2 or n < m:
    raise ValueError(
      f"rso needs 2 <= num_accept <= num_samples, got num_accept={m}, num_samples={n}; pairs "
      "are formed among the accepted samples."
    )
  if c["chunk_size"] % c["batch_size"]:
    raise ValueError(
      f"rso.chunk_size {c['chunk_size']} must be a multiple of rso.batch_size "
      f"{c['batch_size']} so every chunk is made of whole batches."
    )
  validation.count(c["batch_size"], "rso.batch_size")
  validation.count(c["num_examples"], "rso.num_examples", minimum=0)
  validation.finite(c["beta"], "rso.beta",
                    what="beta is the temperature of the target policy exp(r / beta)")
  validation.finite(c["temperature"], "rso.temperature")
  validation.finite(c["top_p"], "rso.top_p", high=1.0)
  drafts.check(c, "rso")
  return c


# --------------------------------------------------------------------------------------------
# Rewards and scores


def gold_rewards(data, candidates_BxKxL, targets_BxL) -> np.ndarray:
  """The synthetic-gold reward: mean ROUGE-1/2/L F-measure of each detokenized candidate to its
  detokenized target, in ``[0, 1]`` (``[B, K]``). Empty candidates score 0."""
  cands = np.asarray(candidates_BxKxL)
  b, k, _ = cands.shape
  texts = [[data.detokenize(y) for y in row] for row in cands]
  refs = [data.detokenize(t) for t in np.asarray(targets_BxL)]
  scores = similarity.rouge_scores(texts, refs)
  mean = np.mean([np.asarray(scores[t]) for t in ("rouge1", "rouge2", "rougeL")], axis=0)
  return mean.reshape(b, k).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _candidate_logp(model, params, inputs_BxS, candidates_BxKxL):
  return scoring.score_candidates(model, params, inputs_BxS, candidates_BxKxL)["logp"]


def sequence_logps(model, params, inputs_BxS, candidates_BxKxL) -> np.ndarray:
  """``log π(y_k | x)`` summed over tokens, ``[B, K]`` (one compiled program per shape)."""
  return np.asarray(
    _candidate_logp(model, params, jnp.asarray(inputs_BxS), jnp.asarray(candidates_BxKxL))
  )


def clean_completions(tokens_BxKxL, target_len: int, vocab_size: int | None = None) -> np.ndarray:
  """Decoded tokens cut or padded to ``target_len``, padding after the first EOS.

  With ``vocab_size`` (the task's vocabulary), a completion holding an id the task cannot
  represent (a model vocabulary larger than the tokenizer's, or a ranker's reserved ids) is
  emptied: it becomes an invalid candidate (masked downstream), with a logged count.
  """
  t = np.asarray(tokens_BxKxL)[..., :target_len]
  if t.shape[-1] < target_len:
    t = np.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, target_len - t.shape[-1])])
  after = np.cumsum(t == 1, axis=-1) - (t == 1) > 0
  t = np.where(after, 0, t).astype(np.int32)
  if vocab_size is not None:
    bad = (t >= vocab_size).any(-1)
    if bad.any():
      logging.warning(
        "%d of %d completions hold token ids >= the task vocabulary (%d) and are dropped; set "
        "model.vocab_size to the tokenizer's size to avoid them.",
        int(bad.sum()),
        bad.size,
        vocab_size,
      )
      t = np.where(bad[..., None], 0, t)
  return t


def unique_mask(candidates_BxMxL, mask_BxM) -> np.ndarray:
  """``mask_BxM`` with repeated token sequences kept only at their first occurrence."""
  cands, mask = np.asarray(candidates_BxMxL), np.asarray(mask_BxM).astype(bool).copy()
  for b in range(cands.shape[0]):
    seen = set()
    for m in range(cands.shape[1]):
      key = cands[b, m].tobytes()
      if mask[b, m] and key in seen:
        mask[b, m] = False
      seen.add(key)
  return mask


# --------------------------------------------------------------------------------------------
# Chunked, resumable output (the pattern of pipelines/candidates.py)


def write_chunks(
  out_dir: str,
  num_items: int,
  *,
  chunk_size: int,
  batch_size: int,
  make_rows: Callable[[list[int]], list[dict[str, Any]]],
  desc: str,
  progress: bool = True,
) -> str:
  """Writes ``make_rows(batch_indices)`` for ``range(num_items)`` into ``chunk-*.jsonl`` files,
  skipping chunks that already exist (resume) and writing each one atomically."""
  os.makedirs(out_dir, exist_ok=True)
  num_chunks = (num_items + chunk_size - 1) // chunk_size
  mine = [i for i in range(num_chunks) if i % jax.process_count() == jax.process_index()]
  todo = [i for i in mine if not os.path.exists(cand_lib._chunk_path(out_dir, i))]
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm

    bar = tqdm(
      total=len(mine) * chunk_size,
      initial=(len(mine) - len(todo)) * chunk_size,
      desc=desc,
      unit="prompt",
      dynamic_ncols=True,
    )
  for ci in todo:
    lo, hi = ci * chunk_size, min((ci + 1) * chunk_size, num_items)
    rows = []
    for b0 in range(lo, hi, batch_size):
      idx = list(range(b0, min(b0 + batch_size, hi)))
      rows.extend(make_rows(idx))
      if bar is not None:
        bar.update(len(idx))
    tmp = cand_lib._chunk_path(out_dir, ci) + f".tmp{jax.process_index()}"
    with open(tmp, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, cand_lib._chunk_path(out_dir, ci))
  if bar is not None:
    bar.close()
  return out_dir


def acceptance_summary(rows) -> dict[str, float]:
  """Mean per-prompt statistics of a pair directory's rows."""
  if not rows:
    return {}
  exp = [r["expected_acceptance"] for r in rows if r.get("expected_acceptance") is not None]
  return dict(
    prompts=len(rows),
    pairs=int(sum(len(r["pairs"]) for r in rows)),
    pairs_per_prompt=float(np.mean([len(r["pairs"]) for r in rows])),
    expected_acceptance=float(np.mean(exp)) if exp else float("nan"),
    accepted_fraction=float(np.mean([r["num_accepted"] / max(r["num_samples"], 1) for r in rows])),
    unique_fraction=float(np.mean([r["num_unique"] / max(r["num_accepted"], 1) for r in rows])),
    ties=int(sum(r.get("num_ties") or 0 for r in rows)),
  )


# --------------------------------------------------------------------------------------------
# The job


def sample_completions(c, model, params, data, inputs_BxS, example_ids, num_samples: int,
                       draft=None):
  """``[B, N, L]`` cleaned samples (``L = data.target_len``) from the policy (speculatively,
  with the same distribution, when a ``draft`` is given)."""
  options = dict(num_samples=num_samples, temperature=c["temperature"], top_k=c["top_k"],
                 top_p=c["top_p"])
  method, options = drafts.decode_args("sample", options, draft, c.get("num_draft"))
  res = decoding_api.decode(
    model,
    params,
    jnp.asarray(inputs_BxS),
    method=method,
    max_len=c["max_len"] or data.target_len,
    rng=jax.random.PRNGKey(c["seed"]),
    example_ids=jnp.asarray(example_ids, jnp.int32),
    **options,
  )
  return clean_completions(res.tokens_BxKxL, data.target_len, data.vocab_size)


def _ids(a) -> list[int]:
  return cand_lib._ids(a)


def pair_record(data, cands_KxL, rewards_K, ref_logp_K, chosen: int, rejected: int) -> dict:
  """One labeled pair as stored in a pair directory: ids, texts, rewards and the reference
  policy's log-likelihoods of candidates ``chosen`` and ``rejected`` of one prompt."""
  return dict(
    chosen=_ids(cands_KxL[chosen]),
    rejected=_ids(cands_KxL[rejected]),
    chosen_text=data.detokenize(cands_KxL[chosen]),
    rejected_text=data.detokenize(cands_KxL[rejected]),
    chosen_reward=float(rewards_K[chosen]),
    rejected_reward=float(rewards_K[rejected]),
    ref_chosen_logp=float(ref_logp_K[chosen]),
    ref_rejected_logp=float(ref_logp_K[rejected]),
  )


def _pad_indices(idx, batch_size):
  return idx + [idx[-1]] * (batch_size - len(idx))


def check_rewards(rewards_BxN, valid_BxN, idx, source: str) -> None:
  """Raises on a NaN/inf reward of a valid sample: it would never be accepted (RSO) or would
  order pairs arbitrarily, silently."""
  bad = ~np.isfinite(rewards_BxN) & np.asarray(valid_BxN, bool)
  if bad.any():
    row, col = (int(x[0]) for x in np.nonzero(bad))
    example = idx[row] if row < len(idx) else idx[-1]
    raise ValueError(
      f"{int(bad.sum())} non-finite reward(s) (first: {rewards_BxN[row, col]} for sample {col} "
      f"of prompt {example}) from rso.reward={source!r}; a NaN reward is never accepted and "
      "breaks the ranking. Check the reward model's checkpoint (retrain it with a lower "
      "learning rate) or its inputs."
    )


def make_pair_rows(c, model, params, data, examples, idx, reward, draft=None
                   ) -> list[dict[str, Any]]:
  """Pair rows for the prompts ``examples[i] for i in idx`` (one fixed-size batch)."""
  ids = _pad_indices(idx, c["batch_size"])
  arrays = iterators.pad_batch([examples[i] for i in ids], data.input_len, data.target_len)
  inputs, targets = arrays["inputs"], arrays["targets"]
  n, m = int(c["num_samples"]), int(c["num_accept"])
  cands = sample_completions(c, model, params, data, inputs, ids, n, draft)
  valid = (cands != 0).any(-1)
  if c["reward"] == "gold":
    rewards = gold_rewards(data, cands, targets)
  else:
    baseline = targets if c["ranker_baseline"] == "target" else None
    rewards = reward.candidate_rewards(inputs, cands, baseline)
  check_rewards(np.asarray(rewards), valid, idx, c["reward"])
  k_rs, k_rank = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(c["seed"] + 1), idx[0]))
  expected = None
  if c["mode"] == "rso":
    accepted, _ = rejection_sampling.rso_sample(
      k_rs,
      jnp.asarray(rewards),
      jnp.asarray(valid),
      num_accept=m,
      beta=float(c["beta"]),
      max_rounds=int(c["max_rounds"]) or None,
    )
    expected = np.asarray(
      rejection_sampling.expected_acceptance_rate(
        jnp.asarray(rewards), jnp.asarray(valid), beta=float(c["beta"])
      )
    )
    accepted = np.asarray(accepted)
  else:
    accepted = np.where(valid[:, :m], np.arange(m)[None, :], -1)
  acc_mask = accepted >= 0
  take = np.maximum(accepted, 0)
  acc_cands = np.take_along_axis(cands, take[:, :, None], axis=1)
  acc_rewards = np.take_along_axis(rewards, take, axis=1)
  uniq = unique_mask(acc_cands, acc_mask)
  if c["reward"] == "model" and getattr(reward, "kind", None) == "ranker":
    chosen, rejected = reward.label_pairs(inputs, acc_cands, uniq, k_rank, c["ranking"])
  else:
    judge = jnp.asarray(acc_rewards)
    if c["ranking"] == "tournament":
      chosen, rejected = ranking.tournament_pairs(judge, mask_BxM=jnp.asarray(uniq), rng=k_rank)
    else:
      chosen, rejected = ranking.first_round_pairs(judge, mask_BxM=jnp.asarray(uniq), rng=k_rank)
  chosen, rejected = np.asarray(chosen), np.asarray(rejected)
  ref = sequence_logps(model, params, inputs, acc_cands)
  rows = []
  for j, i in enumerate(idx):
    pairs = []
    for w, lose in zip(chosen[j], rejected[j]):
      if w < 0:
        continue
      pairs.append(pair_record(data, acc_cands[j], acc_rewards[j], ref[j], w, lose))
    rows.append(
      dict(
        index=i,
        source=SOURCES[c["mode"]],
        prompt=_ids(inputs[j]),
        target=_ids(targets[j]),
        prompt_text=data.detokenize(inputs[j]),
        target_text=data.detokenize(targets[j]),
        num_samples=n,
        num_valid=int(valid[j].sum()),
        num_accepted=int(acc_mask[j].sum()),
        num_unique=int(uniq[j].sum()),
        expected_acceptance=None if expected is None else float(expected[j]),
        accepted_rewards=[float(x) for x in acc_rewards[j][acc_mask[j]]],
        # SLiC-HF's alternative y_ref: the highest-reward accepted sample.
        best=_ids(acc_cands[j][int(np.argmax(np.where(uniq[j], acc_rewards[j], -np.inf)))])
        if uniq[j].any() else None,
        # A tournament among u distinct samples plays u - 1 deciding matches; the rest tied.
        num_ties=(
          max(int(uniq[j].sum()) - 1, 0) - len(pairs) if c["ranking"] == "tournament" else None
        ),
        pairs=pairs,
      )
    )
  return rows


def rso_sample(config, out_dir: str, *, params=None, model=None, data=None, reward=None) -> str:
  """Writes preference pairs for ``config.rso`` into ``out_dir`` (resumable); returns it.

  Args:
    config: job config with ``model``, ``data`` and ``rso`` sections.
    out_dir: the pair directory (created; existing chunks are kept and skipped).
    params, model, data: the SFT policy and task, instead of loading ``rso.sft_workdir``.
    reward: a loaded reward (:class:`slicjax.pipelines.reward.LoadedReward`) instead of
      ``rso.reward_workdir`` (ignored with ``rso.reward="gold"``).
  """
  c = rso_config(config)
  out_dir = validation.workdir(out_dir, "--workdir (pair directory)")
  if params is None:
    validation.run_dir(c["sft_workdir"], "rso.sft_workdir")
    if model is None:
      validation.model_matches_run(config, c["sft_workdir"], "rso.sft_workdir")
  if c["reward"] == "model" and reward is None:
    validation.run_dir(c["reward_workdir"], "rso.reward_workdir")
  model = model or common.model_from(config)
  data = data or tasks.load(config, batch_size=c["batch_size"], seed=c["seed"])
  if params is None:
    params = common.params_from(config, c["sft_workdir"], "rso.sft_workdir")
  if c["reward"] == "model" and reward is None:
    if not c["reward_workdir"]:
      raise ValueError(
        "rso.reward=model needs rso.reward_workdir (a train_reward run) or use rso.reward=gold."
      )
    reward = reward_lib.load_reward(c["reward_workdir"], symmetric=c["symmetric"])
  if c["split"] not in ("train", "validation"):
    raise ValueError(f"rso.split={c['split']!r}; use 'train' or 'validation'.")
  if c["max_len"] > data.target_len:
    raise ValueError(
      f"rso.max_len={c['max_len']} exceeds data.target_len={data.target_len}: samples would be "
      "cut to fit the pairs; raise data.target_len or lower rso.max_len (0 = target_len)."
    )
  examples = data.train_examples if c["split"] == "train" else data.eval_examples
  n = min(c["num_examples"], len(examples)) if c["num_examples"] else len(examples)
  if n == 0:
    raise ValueError(f"split {c['split']!r} is empty: no prompts to sample for.")
  cand_lib.check_manifest(
    out_dir, cand_lib.manifest_for(config, "rso", num_items=n, per_item=c["num_samples"],
                                   chunk_size=c["chunk_size"]),
  )
  draft = drafts.load(c["draft"], model, params, "rso")
  write_chunks(
    out_dir,
    n,
    chunk_size=c["chunk_size"],
    batch_size=c["batch_size"],
    make_rows=lambda idx: make_pair_rows(c, model, params, data, examples, idx, reward, draft),
    desc=SOURCES[c["mode"]],
    progress=c["progress"],
  )
  if jax.process_count() == 1:  # with several processes, others may still be writing chunks
    stats = acceptance_summary(preference_pairs.read_rows(out_dir))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
      json.dump(
        dict(
          stats,
          mode=c["mode"],
          beta=c["beta"],
          num_samples=c["num_samples"],
          num_accept=c["num_accept"],
        ),
        f,
        indent=2,
      )
    logging.info("pairs in %s: %s", out_dir, stats)
  return out_dir
