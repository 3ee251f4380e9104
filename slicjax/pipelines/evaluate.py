"""Evaluation: quality vs beam size (with and without length penalty), repetition, and the
likelihood-quality calibration report, for one or more models on a split. Writes a markdown
table, a JSON file and PNG plots."""

from __future__ import annotations

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
from slicjax.evaluation import confidence, metrics, plots, selective
from slicjax.pipelines import common

EVAL_KEYS = dict(
  beam_sizes=(1, 2, 4, 8, 16), alphas=(0.0, 0.6), num_examples=0, batch_size=16,
  calibration_candidates=8, repetition_ngram=3, max_len=0, progress=True,
  length_penalty_style="gnmt", finish_top_2k=False, split="validation",
  selective=True, selective_beam=4, selective_scores=("logp", "logp_norm", "self_eval",
                                                      "multi_choice"),
  selective_prompt_len=0,
)


def eval_config(config) -> dict[str, Any]:
  c = common.to_dict(config.get("evaluate"))
  common.check_keys(c, EVAL_KEYS, "evaluate")
  c = {**EVAL_KEYS, **c}
  if c["split"] not in ("validation", "test"):
    raise ValueError(
      f"evaluate.split={c['split']!r}; use 'validation' (choose recipes) or 'test' (report)."
    )
  return c


def validate(config, workdirs: dict[str, str]) -> dict[str, Any]:
  """Up-front checks of an evaluation job: the config's values and every model's workdir
  (exists, holds a checkpoint, fits ``config.model``), before any data or weights load."""
  from slicjax.pipelines import validation

  c = eval_config(config)
  if not c["beam_sizes"] or not c["alphas"]:
    raise ValueError("evaluate.beam_sizes and evaluate.alphas need at least one value each.")
  for b in c["beam_sizes"]:
    validation.count(b, "evaluate.beam_sizes[...]")
  for k in ("batch_size", "calibration_candidates"):
    validation.count(c[k], f"evaluate.{k}")
  validation.count(c["num_examples"], "evaluate.num_examples", minimum=0)
  if c["selective"]:
    validation.count(c["selective_beam"], "evaluate.selective_beam")
    validation.count(c["selective_prompt_len"], "evaluate.selective_prompt_len", minimum=0)
    confidence.check_scores(_score_names(c))
  for name, wd in workdirs.items():
    validation.run_dir(wd, f"--model_workdirs {name}")
    validation.model_matches_run(config, wd, f"--model_workdirs {name}")
  return c


def _examples(data, c):
  """The first ``num_examples`` (0 = all) of the evaluated split."""
  ex = data.split_examples(c["split"])
  return ex[: c["num_examples"]] if c["num_examples"] else ex


def _batches(examples, bs, input_len, target_len):
  for i in range(0, len(examples), bs):
    chunk = examples[i : i + bs]
    padded = chunk + [chunk[-1]] * (bs - len(chunk))
    yield len(chunk), iterators.pad_batch(padded, input_len, target_len)


def decode_split(model, params, data, examples, *, beam_size, alpha, batch_size, max_len,
                 length_penalty_style="gnmt", finish_top_2k=False, beams_out=None):
  """Top beam per example: ``(texts, token_lists)``. ``beams_out`` (a list) receives every
  example's ``[K, max_len]`` beams (tokens with EOS, PAD after it), best first."""
  beam_opts = dict(beam_size=beam_size, alpha=alpha, length_penalty_style=length_penalty_style,
                   finish_top_2k=bool(finish_top_2k))
  texts, toks = [], []
  for n, batch in _batches(examples, batch_size, data.input_len, data.target_len):
    res = decoding_api.decode(
      model, params, jnp.asarray(batch["inputs"]), method="beam" if beam_size > 1 else "greedy",
      max_len=max_len, **(beam_opts if beam_size > 1 else {}),
    )
    all_beams = np.asarray(res.tokens_BxKxL)
    if beams_out is not None:
      beams_out.extend(all_beams[:n])
    best = all_beams[:, 0]
    for row in best[:n]:
      ids = [int(t) for t in row]
      if 1 in ids:
        ids = ids[: ids.index(1)]
      toks.append([t for t in ids if t > 1])
      texts.append(data.detokenize(row))
  return texts, toks


def quality_grid(models: dict[str, Any], model, data, c: dict[str, Any], bar=None,
                 predictions: list | None = None, beams: dict | None = None):
  """Rows ``{model, alpha, beam, rouge1, rouge2, rougeL, rougeL_lo, rougeL_hi, length,
  repetition}`` (``rougeL_lo/hi``: 95% bootstrap interval over examples; ``_per_example``
  holds the per-example ROUGE-L for paired comparisons). ``predictions`` (a list) receives one
  dict per decoded example. ``beams`` (a dict) receives, per model, the ``[N, K, L]`` beams of
  the selective-generation setting (beam ``selective_beam``, the first α) when it is in the
  grid."""
  examples = _examples(data, c)
  refs = [data.reference(e) for e in examples]
  max_len = c["max_len"] or data.target_len
  rows = []
  for name, params in models.items():
    for alpha in c["alphas"]:
      for beam in c["beam_sizes"]:
        if beam == 1 and alpha != c["alphas"][0]:
          continue  # greedy has no length penalty
        keep = (beams is not None and beam == c["selective_beam"]
                and alpha == c["alphas"][0])
        kept: list = []
        texts, toks = decode_split(model, params, data, examples, beam_size=beam, alpha=alpha,
                                   batch_size=c["batch_size"], max_len=max_len,
                                   length_penalty_style=c["length_penalty_style"],
                                   finish_top_2k=c["finish_top_2k"],
                                   beams_out=kept if keep else None)
        if keep:
          beams[name] = np.stack(kept)
        rouge = similarity.rouge_scores(texts, refs)
        per_ex = np.asarray(rouge["rougeL"], np.float64) * 100
        _, lo, hi = metrics.bootstrap_ci(per_ex)
        rows.append(dict(
          model=name, alpha=float(alpha), beam=int(beam),
          **{k: float(np.mean(rouge[k]) * 100) for k in ("rouge1", "rouge2", "rougeL")},
          rougeL_lo=lo, rougeL_hi=hi,
          length=float(np.mean([len(t) for t in toks])),
          repetition=float(metrics.repetition_rate(toks, c["repetition_ngram"])),
          _per_example=per_ex,
        ))
        if predictions is not None:
          predictions.extend(
            dict(id=i, model=name, beam=int(beam), alpha=float(alpha), prediction=t,
                 reference=r, rougeL=float(s))
            for i, (t, r, s) in enumerate(zip(texts, refs, per_ex))
          )
        if bar is not None:
          bar.update(1)
  return rows


def calibration_report(models: dict[str, Any], model, data, c, decoder_params, *,
                       per_input: bool = False):
  """Per-input Spearman correlation between each model's candidate log-likelihoods and the
  candidates' ROUGE to the reference, on the same beam candidates (from ``decoder_params``):
  the mean per model, or with ``per_input`` the ``[N]`` values (nan where undefined)."""
  examples = _examples(data, c)
  k = c["calibration_candidates"]
  max_len = c["max_len"] or data.target_len
  out = {name: [] for name in models}
  sims = []
  score = jax.jit(lambda p, x, y: scoring.score_candidates(model, p, x, y)["logp"])
  done = 0
  for n, batch in _batches(examples, c["batch_size"], data.input_len, data.target_len):
    batch_refs = [data.reference(e) for e in examples[done : done + n]]
    done += n
    inputs = jnp.asarray(batch["inputs"])
    res = decoding_api.decode(model, decoder_params, inputs, method="beam", max_len=max_len,
                              beam_size=k, alpha=0.0)
    cands = np.asarray(res.tokens_BxKxL)[:, :, : data.target_len]
    cands = np.pad(cands, ((0, 0), (0, 0), (0, data.target_len - cands.shape[-1])))
    texts = [data.detokenize(y) for row in cands[:n] for y in row]
    refs = [ref for ref in batch_refs for _ in range(k)]
    r = similarity.rouge_scores(texts, refs)
    sims.append(np.mean([np.asarray(r[t]) for t in ("rouge1", "rouge2", "rougeL")], 0)
                .reshape(n, k))
    for name, params in models.items():
      lp = score(params, inputs, jnp.asarray(cands))
      out[name].append(np.asarray(lp)[:n])
  sim = np.concatenate(sims)
  mask = np.ones_like(sim)
  if per_input:
    return {name: metrics.rank_correlation(np.concatenate(lps), sim, mask,
                                           return_per_input=True)[1]
            for name, lps in out.items()}
  return {
    name: float(metrics.rank_correlation(np.concatenate(lps), sim, mask))
    for name, lps in out.items()
  }


def _score_names(c) -> tuple[str, ...]:
  raw = c["selective_scores"]
  return tuple(x.strip() for x in raw.split(",") if x.strip()) if isinstance(raw, str) \
    else tuple(raw)


def _source_text(data, example) -> str:
  """The input text an example's prompt holds (a pretrained prompt's template stripped)."""
  decode_prompt = getattr(data.tokenizer, "decode_prompt", None)
  return decode_prompt(example["inputs"]) if decode_prompt else data.detokenize(example["inputs"])


def selective_report(models: dict[str, Any], model, data, c, beams: dict | None = None,
                     records: list | None = None) -> dict[str, Any]:
  """Selective generation of every model's top beam at (``selective_beam``, first α): each
  confidence score's coverage-ROUGE-L curve, its area and AUROC for "ROUGE-L above the median"
  with 95% bootstrap intervals, and per score the paired area difference of every model vs the
  first. ``records`` (a list) receives one dict per (model, example) with the scores.

  A self-evaluation score whose prompt cannot fit ``selective_prompt_len`` tokens (0 =
  ``data.input_len``) even without the input text is left out for that model, with the
  reason under ``skipped[model][score]``."""
  examples = _examples(data, c)
  beams = dict(beams or {})
  names = confidence.check_scores(_score_names(c))
  skipped: dict[str, dict[str, str]] = {name: {} for name in models}
  if data.tokenizer is None:
    for name in models:
      skipped[name] = {s: "the task has no tokenizer (token-id task): no text prompt to build"
                       for s in names if s in confidence.TEXT_SCORES}
    names = tuple(s for s in names if s not in confidence.TEXT_SCORES)
  refs = [data.reference(e) for e in examples]
  sources = [_source_text(data, e) for e in examples] if data.tokenizer is not None else None
  inputs = iterators.pad_batch(examples, data.input_len, data.target_len)["inputs"]
  max_len = c["max_len"] or data.target_len
  alpha = c["alphas"][0]
  scorer = confidence.ConfidenceScorer(model, data.tokenizer,
                                       c["selective_prompt_len"] or data.input_len)
  scores_of, quality_of = {}, {}
  items = models.items()
  if c["progress"]:
    from tqdm.auto import tqdm

    items = tqdm(items, total=len(models), desc="selective scores", unit="model",
                 dynamic_ncols=True)
  for name, params in items:
    if name not in beams:
      kept: list = []
      decode_split(model, params, data, examples, beam_size=c["selective_beam"], alpha=alpha,
                   batch_size=c["batch_size"], max_len=max_len,
                   length_penalty_style=c["length_penalty_style"],
                   finish_top_2k=c["finish_top_2k"], beams_out=kept)
      beams[name] = np.stack(kept)
    top = beams[name][:, 0]
    texts = [data.detokenize(y) for y in top]
    quality = np.asarray(similarity.rouge_scores(texts, refs, types=("rougeL",))["rougeL"],
                         np.float64) * 100
    scores = {}
    groups = [tuple(s for s in names if s not in confidence.TEXT_SCORES)]
    groups += [(s,) for s in names if s in confidence.TEXT_SCORES]
    for group in filter(None, groups):
      try:
        scores.update(confidence.score_outputs(
          scorer, params, group, inputs_NxS=inputs,
          beams_NxKxL=beams[name][:, :, : data.target_len], sources=sources,
          detokenize=data.detokenize, batch_size=c["batch_size"],
        ))
      except confidence.PromptTooLong as e:
        logging.warning("selective report: %s not computed for %s: %s", group[0], name, e)
        skipped[name][group[0]] = str(e).rstrip(".")
    scores = {s: scores[s] for s in names if s in scores}
    scores_of[name], quality_of[name] = scores, quality
    if records is not None:
      records.extend(
        dict(id=i, model=name, beam=int(c["selective_beam"]), alpha=float(alpha),
             prediction=texts[i], reference=refs[i], rougeL=float(quality[i]),
             **{s: float(v[i]) for s, v in scores.items()})
        for i in range(len(examples))
      )
  return summarize_selective(scores_of, quality_of, names, beam=int(c["selective_beam"]),
                             alpha=float(alpha), skipped=skipped)


def summarize_selective(scores_of: dict[str, dict[str, np.ndarray]],
                        quality_of: dict[str, np.ndarray], names: tuple[str, ...], *, beam: int,
                        alpha: float, skipped: dict | None = None) -> dict[str, Any]:
  """The selective-generation report from per-example confidence scores and ROUGE-L of each
  model (first model = baseline of the paired differences; first score = baseline of the
  score differences). :func:`selective_from_records` rebuilds it from ``selective.jsonl``."""
  models = list(scores_of)
  per_model = {name: {s: selective.selective_summary(v, quality_of[name])
                      for s, v in scores_of[name].items()} for name in models}
  first = models[0]
  paired = [
    dict(model=name, baseline=first, score=s,
         **selective.paired_area_difference(scores_of[name][s], quality_of[name],
                                            scores_of[first][s], quality_of[first]))
    for name in models if name != first for s in names
    if s in scores_of[name] and s in scores_of[first]
  ]
  # Which score ranks best: every score minus the first (logp by default) within each model.
  vs_first_score = [
    dict(model=name, score=s, baseline_score=names[0],
         **selective.paired_area_difference(scores_of[name][s], quality_of[name],
                                            scores_of[name][names[0]], quality_of[name]))
    for name in models for s in names[1:]
    if s in scores_of[name] and names[0] in scores_of[name]
  ]
  return dict(beam=beam, alpha=alpha, scores=list(names),
              skipped=skipped or {name: {} for name in models}, models=per_model,
              paired_area_differences=paired, score_differences=vs_first_score,
              num_examples=len(next(iter(quality_of.values()))))


def selective_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
  """:func:`summarize_selective` of the per-example records of ``selective.jsonl`` (one line per
  (model, example): ``id``, ``model``, ``beam``, ``alpha``, ``rougeL`` and one key per score).

  Raises:
    ValueError: no records, or models with different example ids.
  """
  if not records:
    raise ValueError("no selective-generation records; give a selective.jsonl from evaluate.")
  models = list(dict.fromkeys(r["model"] for r in records))
  names = tuple(s for s in confidence.SCORES if s in records[0])
  scores_of, quality_of, ids = {}, {}, {}
  for name in models:
    rows = sorted((r for r in records if r["model"] == name), key=lambda r: r["id"])
    ids[name] = [r["id"] for r in rows]
    quality_of[name] = np.asarray([r["rougeL"] for r in rows], np.float64)
    scores_of[name] = {s: np.asarray([r[s] for r in rows], np.float64)
                       for s in names if all(s in r for r in rows)}
  if any(ids[m] != ids[models[0]] for m in models):
    raise ValueError("selective.jsonl: the models cover different example ids; pair them first.")
  return summarize_selective(scores_of, quality_of, names, beam=int(records[0]["beam"]),
                             alpha=float(records[0]["alpha"]))


def selective_plot(rep: dict[str, Any], path: str) -> str:
  """``coverage_quality.png`` of a selective-generation report."""
  return plots.coverage_quality(
    {m: {s: dict(v["curve"], area=v["area"]) for s, v in per.items()}
     for m, per in rep["models"].items()}, path,
  )


def selective_markdown(rep: dict[str, Any]) -> str:
  """The selective-generation section of ``eval.md``."""
  if not rep:
    return ""
  lines = [
    "", f"## Selective generation (top beam of beam {rep['beam']}, α={rep['alpha']:g}, "
    f"{rep['num_examples']} examples)", "",
    "Outputs ranked by each confidence score; area = mean ROUGE-L of the kept outputs averaged "
    "over coverage 1/n..1 (higher is better; abstaining at random gives the mean ROUGE-L, the "
    "oracle ranks by ROUGE-L itself); AUROC separates outputs above the median ROUGE-L. 95% "
    "bootstrap intervals over examples, 1,000 resamples.", "",
    "| model | confidence score | area [95% CI] | AUROC (ROUGE-L > median) [95% CI] | "
    "mean ROUGE-L | oracle area |",
    "|---|---|---|---|---|---|",
  ]
  for model, per in rep["models"].items():
    for s, v in per.items():
      au = (selective.format_auroc(v["auroc"]) if np.isnan(v["auroc"]) else
            f"{v['auroc']:.3f} [{v['auroc_ci95'][0]:.3f}, {v['auroc_ci95'][1]:.3f}]")
      lines.append(f"| {model} | {s} | {v['area']:.2f} [{v['area_ci95'][0]:.2f}, "
                   f"{v['area_ci95'][1]:.2f}] | {au} | {v['mean_quality']:.2f} | "
                   f"{v['oracle_area']:.2f} |")
  for model, per in rep["models"].items():
    if per:
      best = max(per, key=lambda s: per[s]["area"])
      lines.append(f"\nBest area for {model}: `{best}` ({per[best]['area']:.2f}).")
  if rep["paired_area_differences"]:
    lines += ["", f"Paired area differences vs {rep['paired_area_differences'][0]['baseline']} "
              "(same examples, each model ranking its own outputs):", "",
              "| model | confidence score | Δarea [95% CI] | |", "|---|---|---|---|"]
    lines += [f"| {d['model']} | {d['score']} | {d['diff']:+.2f} [{d['ci95'][0]:+.2f}, "
              f"{d['ci95'][1]:+.2f}] | {'within noise' if d['within_noise'] else ''} |"
              for d in rep["paired_area_differences"]]
  if rep.get("score_differences"):
    base = rep["score_differences"][0]["baseline_score"]
    lines += ["", f"Paired area differences between scores, each minus `{base}` (same model, same "
              "outputs):", "", f"| model | confidence score | Δarea vs {base} [95% CI] | |",
              "|---|---|---|---|"]
    lines += [f"| {d['model']} | {d['score']} | {d['diff']:+.2f} [{d['ci95'][0]:+.2f}, "
              f"{d['ci95'][1]:+.2f}] | {'within noise' if d['within_noise'] else ''} |"
              for d in rep["score_differences"]]
  for model, per in rep.get("skipped", {}).items():
    for s, why in per.items():
      lines.append(f"\n`{s}` not computed for {model}: {why}.")
  lines.append("\n![coverage vs quality](coverage_quality.png)")
  return "\n".join(lines) + "\n"


def run(models: dict[str, Any], model, data, config, out_dir: str, *, decoder_for_report=None):
  """Evaluates ``models`` (name -> params) and writes ``eval.json``, ``eval.md`` and plots."""
  c = eval_config(config)
  os.makedirs(out_dir, exist_ok=True)
  bar = None
  n_runs = len(models) * (len(c["alphas"]) * len(c["beam_sizes"]) - (len(c["alphas"]) - 1))
  if c["progress"]:
    from tqdm.auto import tqdm

    bar = tqdm(total=n_runs, desc="evaluate", unit="decode", dynamic_ncols=True)
  predictions: list[dict[str, Any]] = []
  beams: dict[str, np.ndarray] = {}
  rows = quality_grid(models, model, data, c, bar, predictions, beams if c["selective"] else None)
  if bar is not None:
    bar.close()
  diffs = paired_differences(rows)
  for r in rows:
    r.pop("_per_example")
  first = next(iter(models.values()))
  corr = calibration_report(models, model, data, c, decoder_for_report or first)
  sel_records: list[dict[str, Any]] = []
  sel = selective_report(models, model, data, c, beams, sel_records) if c["selective"] else None
  result = {"grid": rows, "paired_differences": diffs, "rank_correlation": corr,
            "selective": sel,
            "split": c["split"], "num_examples": len(_examples(data, c)),
            "truncation": (getattr(data, "truncation", None) or {}).get(c["split"])}
  with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
    for p in predictions:
      f.write(json.dumps(p) + "\n")
  with open(os.path.join(out_dir, "eval.md"), "w") as f:
    f.write(markdown_table(rows, corr, diffs))
    f.write(truncation_note(result["truncation"], c["split"]))
    if sel:
      f.write(selective_markdown(sel))
  plots.quality_vs_beam(rows, os.path.join(out_dir, "quality_vs_beam.png"))
  if sel:
    with open(os.path.join(out_dir, "selective.jsonl"), "w") as f:
      for r in sel_records:
        f.write(json.dumps(r) + "\n")
    selective_plot(sel, os.path.join(out_dir, "coverage_quality.png"))
  return result


def paired_differences(rows) -> list[dict[str, Any]]:
  """ROUGE-L of every model minus the first model's, per (beam, α), with a paired 95% bootstrap
  interval over the same examples; ``within_noise`` when the interval contains 0."""
  if not rows:
    return []
  base_name = rows[0]["model"]
  base = {(r["beam"], r["alpha"]): r for r in rows if r["model"] == base_name}
  out = []
  for r in rows:
    b = base.get((r["beam"], r["alpha"]))
    if r["model"] == base_name or b is None or "_per_example" not in r:
      continue
    d, lo, hi = metrics.paired_bootstrap_ci(r["_per_example"], b["_per_example"])
    out.append(dict(model=r["model"], baseline=base_name, beam=r["beam"], alpha=r["alpha"],
                    rougeL_diff=d, lo=lo, hi=hi, within_noise=bool(lo <= 0.0 <= hi)))
  return out


def truncation_note(t, split: str) -> str:
  """One line on how many evaluated examples were cut at tokenization (references are scored
  whole; the model saw the cut inputs)."""
  if not t:
    return ""
  return (f"\nTokenization of the {split} split ({t['seen']} examples) cut "
          f"{t['truncated_inputs']} inputs and {t['truncated_targets']} targets to the padded "
          "lengths; ROUGE is computed against the whole reference texts.\n")


def markdown_table(rows, corr, diffs=()) -> str:
  lines = [
    "| model | length penalty α | beam | ROUGE-1 | ROUGE-2 | ROUGE-L [95% CI] | mean length | "
    "repetition |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ci = f" [{r['rougeL_lo']:.2f}, {r['rougeL_hi']:.2f}]" if "rougeL_lo" in r else ""
    lines.append(
      f"| {r['model']} | {r['alpha']:g} | {r['beam']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | "
      f"{r['rougeL']:.2f}{ci} | {r['length']:.1f} | {r['repetition'] * 100:.1f}% |"
    )
  if diffs:
    lines += ["", f"Paired ROUGE-L differences vs {diffs[0]['baseline']} (same examples; 95% "
              "bootstrap interval, 1,000 resamples):", "",
              "| model | α | beam | ΔROUGE-L [95% CI] | |", "|---|---|---|---|---|"]
    lines += [
      f"| {d['model']} | {d['alpha']:g} | {d['beam']} | {d['rougeL_diff']:+.2f} "
      f"[{d['lo']:+.2f}, {d['hi']:+.2f}] | {'within noise' if d['within_noise'] else ''} |"
      for d in diffs
    ]
  lines += ["", "| model | mean per-input Spearman(logP, ROUGE) |", "|---|---|"]
  lines += [f"| {k} | {metrics.format_spearman(v)} |" for k, v in corr.items()]
  return "\n".join(lines) + "\n"
