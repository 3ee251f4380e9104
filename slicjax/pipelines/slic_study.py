"""The SLiC study: does calibration help, on which recipe, and by how much beyond noise?

One named study (:data:`STUDIES`) runs, per (dataset, model):

1. MLE fine-tuning once, keeping the best-validation checkpoint (``train.keep_best``);
2. candidate decoding once per decoding setting (method, number of candidates m); the
   decoded set is re-scored, not re-decoded, for each similarity a cell asks for;
3. one calibration per cell of the recipe sweep (similarity, decoding, loss, β, regularizer and
   its weight, steps), each evaluated on the VALIDATION split (ROUGE-L with 95% bootstrap
   intervals at the study's beam sizes and α);
4. the recipe with the best validation ROUGE-L is chosen, and only the fine-tuned model and
   that calibrated model are evaluated on the TEST split: ROUGE-L at the chosen (beam, α) with a
   paired bootstrap interval, per-input Spearman(logP, ROUGE) on the same candidates, and the
   calibrated model's beam-16 minus beam-4 ROUGE-L.

A sweep is one-factor-at-a-time around a base recipe (``grid=False``: the base, then each
listed value of each factor with the others at the base) or the full grid.

Layout under ``workdir/<dataset>__<model>/``: ``mle/``, ``decode/<method>-m<k>/`` (candidates
without similarity), ``candidates/<method>-m<k>-<similarity>/``, ``cells/<recipe>/`` (the
calibration run and ``result.json``), ``test/result.json``; every finished stage has a
marker, so a rerun of the same command skips it and continues where it stopped (an interrupted
training run resumes from its checkpoint). Executed (not skipped) stages are appended to
``workdir/study_log.jsonl``.

Outputs: ``<results_dir>/slic_study.md`` (one section per study, other studies' sections
kept) and ``<results_dir>/slic_effect.json`` (``{"entries": [...]}``, one entry per (dataset,
model); entries of other pairs kept).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
import shlex
import sys
import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from slicjax.evaluation import metrics

RECIPE_KEYS = ("similarity", "method", "num_candidates", "loss", "beta", "regularizer",
               "reg_weight", "steps")
BASE_RECIPE = dict(similarity="latent", method="beam", num_candidates=8, loss="rank", beta=1.0,
                   regularizer="kl", reg_weight=1.0, steps=150)
NUM_RESAMPLES = 1000
RESULTS_MD = "slic_study.md"
RESULTS_JSON = "slic_effect.json"


@dataclasses.dataclass(frozen=True)
class Study:
  """A named study.

  Attributes:
    name: the ``--study`` name.
    description: one line for the report.
    preset: the demo preset (``slicjax.pipelines.demo.PRESETS``) giving model, data, train,
      candidate and optimizer sizes.
    datasets: ``data.name`` values, one (dataset, model) pair each.
    model: the model's name in the results (one model per study).
    base: the base recipe (keys of :data:`RECIPE_KEYS`).
    sweep: factor -> values to try.
    grid: the full grid over ``sweep`` instead of one factor at a time.
    overrides: flattened config overrides on top of the preset (``{"train.steps": 900}``).
    dataset_overrides: per dataset, more overrides (e.g. data-derived lengths).
    val_beams, alphas: what every cell is evaluated with on validation (and both models on
      test); 4 and 16 must be among the beams.
    val_examples, test_examples: evaluated examples per split (0 = all).
    calibration_candidates: beam candidates per test input for the Spearman comparison.
    val_spearman: every cell also gets the paired per-input ΔSpearman(logP, ROUGE) against the
      fine-tuned model on the fine-tuned model's validation beam candidates (one more beam
      decode per cell), so an ablation shows which recipe reorders candidates at all.
    validation_only: an ablation: stop after the validation cells (no test stage, no
      ``slic_effect.json`` entry); the report says which cell validation would choose.
  """

  name: str
  description: str
  preset: str
  datasets: tuple[str, ...]
  model: str
  base: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(BASE_RECIPE))
  sweep: dict[str, tuple] = dataclasses.field(default_factory=dict)
  grid: bool = False
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  dataset_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  val_beams: tuple[int, ...] = (4, 16)
  alphas: tuple[float, ...] = (0.0,)
  val_examples: int = 0
  test_examples: int = 0
  calibration_candidates: int = 8
  val_spearman: bool = False
  validation_only: bool = False


_SMALL_TRAIN = {"train.eval_every": 100, "train.eval_batches": 4, "train.keep_best": True,
                "train.checkpoint_every": 300}
_SMOLLM2_TRAIN = {"train.eval_every": 10, "train.eval_batches": 4, "train.keep_best": True}
# Data-derived lengths for the Debian descriptions (the 98th percentile of train).
_DEBIAN = {"debian_descriptions": {"data.input_len": 0, "data.target_len": 0}}

STUDIES: dict[str, Study] = {
  # Seconds: the test suite runs it end to end (two cells sharing one candidate set).
  "smoke": Study(
    name="smoke", description="tiny model, two cells (test suite)", preset="smoke",
    datasets=("stdlib_docstrings",), model="transformer-tiny",
    base=dict(BASE_RECIPE, num_candidates=4, steps=4, similarity="rouge"),
    sweep={"loss": ("margin",)},
    overrides={"train.steps": 60, "train.eval_every": 20, "train.eval_batches": 1,
               "train.keep_best": True, "candidates.num_examples": 16,
               "evaluate.batch_size": 8},
    val_examples=8, test_examples=8, calibration_candidates=4, val_spearman=True,
  ),
  # The demo's default from-scratch transformer (2 layers, d_model 128) on stdlib_docstrings.
  "small_stdlib": Study(
    name="small_stdlib",
    description="demo default transformer (2 layers, d_model 128, 900 MLE steps) on "
                "stdlib_docstrings",
    preset="default", datasets=("stdlib_docstrings",), model="transformer-small-2x128",
    base=dict(BASE_RECIPE),
    sweep={"similarity": ("rouge",), "loss": ("margin",), "regularizer": ("ce",),
           "reg_weight": (0.1,), "method": ("diverse_beam",)},
    overrides={**_SMALL_TRAIN, "candidates.num_examples": 512, "evaluate.batch_size": 32},
    val_examples=256, test_examples=0,
  ),
  "small_debian": Study(
    name="small_debian",
    description="demo default transformer on debian_descriptions (lengths from the data)",
    preset="default", datasets=("debian_descriptions",), model="transformer-small-2x128",
    base=dict(BASE_RECIPE),
    sweep={"similarity": ("rouge",), "loss": ("margin",), "regularizer": ("ce",)},
    overrides={**_SMALL_TRAIN, "train.steps": 600, "candidates.num_examples": 0,
               "evaluate.batch_size": 32},
    dataset_overrides=_DEBIAN,
  ),
  # SmolLM2-135M-Instruct with LoRA (the demo's smollm2 preset: 40 MLE steps, 96 candidate
  # sets, 24 calibration steps). Sized for one CPU core in under 2 hours: one recipe (the small
  # model's validation choice, ROUGE similarity, applied without a sweep of its own), 32
  # validation and 128 test examples. The full sweep is ``smollm2_stdlib_sweep`` (many hours on
  # 2 CPU cores; an accelerator's job).
  "smollm2_stdlib": Study(
    name="smollm2_stdlib",
    description="SmolLM2-135M-Instruct + LoRA 8 on stdlib_docstrings, one recipe (CPU-sized)",
    preset="smollm2", datasets=("stdlib_docstrings",), model="smollm2-135m-lora8",
    base=dict(BASE_RECIPE, similarity="rouge", num_candidates=4, steps=24),
    overrides={**_SMOLLM2_TRAIN, "evaluate.batch_size": 16},
    val_examples=32, test_examples=128, calibration_candidates=4,
  ),
  "smollm2_stdlib_sweep": Study(
    name="smollm2_stdlib_sweep",
    description="SmolLM2-135M-Instruct + LoRA 8 on stdlib_docstrings, recipe sweep",
    preset="smollm2", datasets=("stdlib_docstrings",), model="smollm2-135m-lora8",
    base=dict(BASE_RECIPE, num_candidates=4, steps=24),
    sweep={"similarity": ("rouge",), "loss": ("margin",), "regularizer": ("ce",)},
    overrides={**_SMOLLM2_TRAIN, "evaluate.batch_size": 16}, val_examples=128,
    calibration_candidates=4,
  ),
  # The CPU-sized ablation of ``smollm2_stdlib`` (same preset, overrides and 32 validation
  # examples, so its fine-tuned model and base cell are that study's): is 24 steps under KL
  # weight 1 too weak a calibration to move the ranking? Validation only, with ΔSpearman per
  # cell; 53 min of one CPU core (measured).
  "smollm2_stdlib_ablation": Study(
    name="smollm2_stdlib_ablation",
    description="SmolLM2-135M-Instruct + LoRA 8 on stdlib_docstrings, calibration-strength "
                "ablation of `smollm2_stdlib` (validation only)",
    preset="smollm2", datasets=("stdlib_docstrings",), model="smollm2-135m-lora8",
    base=dict(BASE_RECIPE, similarity="rouge", num_candidates=4, steps=24),
    sweep={"reg_weight": (0.1,), "steps": (72,)},
    overrides={**_SMOLLM2_TRAIN, "evaluate.batch_size": 16},
    val_examples=32, calibration_candidates=4, val_spearman=True, validation_only=True,
  ),
  # CPU-sized as ``smollm2_stdlib`` (one recipe); the dpkg database of a machine is small, so
  # every test example is evaluated.
  "smollm2_debian": Study(
    name="smollm2_debian",
    description="SmolLM2-135M-Instruct + LoRA 8 on debian_descriptions, one recipe (CPU-sized)",
    preset="smollm2", datasets=("debian_descriptions",), model="smollm2-135m-lora8",
    base=dict(BASE_RECIPE, similarity="rouge", num_candidates=4, steps=24),
    overrides={**_SMOLLM2_TRAIN, "evaluate.batch_size": 16,
               "pretrained.instruction": "Summarize this software package description in one "
                                         "short line."},
    val_examples=32, calibration_candidates=4,
  ),
}


# ----------------------------------------------------------------------------- the sweep


def check_study(study: Study) -> None:
  """Raises ValueError on a study spec that cannot run (naming the field and the fix)."""
  from slicjax.pipelines import calibrate, candidates

  if set(study.base) != set(RECIPE_KEYS):
    raise ValueError(f"study {study.name!r}: base recipe keys {sorted(study.base)} must be "
                     f"exactly {sorted(RECIPE_KEYS)}.")
  unknown = sorted(set(study.sweep) - set(RECIPE_KEYS))
  if unknown:
    raise ValueError(f"study {study.name!r}: sweep factors {unknown} are not recipe keys; "
                     f"choose from {list(RECIPE_KEYS)}.")
  if not {4, 16} <= set(study.val_beams):
    raise ValueError(f"study {study.name!r}: val_beams={study.val_beams} must include 4 and 16 "
                     "(the beam-16 minus beam-4 goal).")
  allowed = dict(similarity=("latent", "rouge", "token_embedding"),
                 method=tuple(m for m in candidates.METHODS if m != "greedy"),
                 loss=calibrate.LOSSES, regularizer=calibrate.REGULARIZERS)
  for _, recipe in cells(study):
    for key, choices in allowed.items():
      if recipe[key] not in choices:
        raise ValueError(f"study {study.name!r}: {key}={recipe[key]!r}; choose from {choices}.")


def cells(study: Study) -> list[tuple[str, dict[str, Any]]]:
  """``[(cell name, recipe)]``: ``base`` and one cell per swept value (one factor at a time),
  or every combination when ``study.grid``; duplicates of an earlier recipe are dropped."""
  out: list[tuple[str, dict[str, Any]]] = []
  if study.grid:
    keys = list(study.sweep)
    options = [tuple(dict.fromkeys((study.base[k],) + tuple(study.sweep[k]))) for k in keys]
    for combo in itertools.product(*options):
      recipe = {**study.base, **dict(zip(keys, combo))}
      changed = [f"{k}={v}" for k, v in zip(keys, combo) if v != study.base[k]]
      out.append((",".join(changed) or "base", recipe))
  else:
    out.append(("base", dict(study.base)))
    for key, values in study.sweep.items():
      for v in values:
        out.append((f"{key}={v}", {**study.base, key: v}))
  seen, unique = set(), []
  for name, recipe in out:
    slug = recipe_slug(recipe)
    if slug not in seen:
      seen.add(slug)
      unique.append((name, recipe))
  return unique


def recipe_slug(r: dict[str, Any]) -> str:
  """A directory name that names every recipe value."""
  return (f"{r['similarity']}-{r['method']}{r['num_candidates']}-{r['loss']}-b{r['beta']:g}-"
          f"{r['regularizer']}{r['reg_weight']:g}-s{r['steps']}")


def decode_key(r: dict[str, Any]) -> str:
  return f"{r['method']}-m{r['num_candidates']}"


# ----------------------------------------------------------------------------- configs


def pair_config(study: Study, dataset: str) -> ml_collections.ConfigDict:
  """The config of one (dataset, model) pair before its data-derived lengths are filled in."""
  from slicjax.pipelines import demo

  overrides = {"data.name": dataset, **study.overrides,
               **study.dataset_overrides.get(dataset, {})}
  config = demo.build_config(study.preset, overrides)
  config.evaluate.alphas = tuple(study.alphas)
  config.evaluate.progress = False
  return config


def with_lengths(config, data) -> ml_collections.ConfigDict:
  """``config`` with the lengths the data resolved (``0`` = chosen from the data) written in,
  and a from-scratch model's ``max_len`` raised to fit them."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.input_len, config.data.target_len = int(data.input_len), int(data.target_len)
  if not config.pretrained.init_from and "max_len" in config.model:
    need = data.input_len + data.target_len + 1
    if config.model.max_len < need:
      config.model.max_len = -(-need // 32) * 32
  return config


def recipe_config(config, r: dict[str, Any], candidates_dir: str) -> ml_collections.ConfigDict:
  """The calibration config of one cell (the calibration optimizer as ``optimizer``)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.optimizer = config.calibrate_optimizer
  c.calibrate.update(dict(loss=r["loss"], beta=float(r["beta"]), regularizer=r["regularizer"],
                          reg_weight=float(r["reg_weight"]), steps=int(r["steps"]),
                          candidates_dir=candidates_dir, progress=False))
  c.calibrate.checkpoint_every = max(int(r["steps"]), 1)
  return c


def decode_config(config, r: dict[str, Any]) -> ml_collections.ConfigDict:
  """The candidate config of a decoding setting (no similarity: added per cell by
  :func:`rescore`)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.candidates.update(dict(method=r["method"], num_candidates=int(r["num_candidates"]),
                           similarity="none", progress=False))
  if r["method"] == "diverse_beam":
    c.candidates.num_groups = min(4, int(r["num_candidates"]))
  return c


def eval_settings(config, split: str, beams, alphas, num_examples: int) -> dict[str, Any]:
  from slicjax.pipelines import evaluate

  c = ml_collections.ConfigDict(config.to_dict())
  c.evaluate.update(dict(split=split, beam_sizes=tuple(int(b) for b in beams),
                         alphas=tuple(float(a) for a in alphas), num_examples=int(num_examples),
                         progress=False))
  return evaluate.eval_config(c)


# ----------------------------------------------------------------------------- stages


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def _write(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    return o.item()
  return str(o)


class Progress:
  """Prints one line per stage with its position and times, and logs executed stages."""

  def __init__(self, workdir: str, total: int):
    self.log_path = os.path.join(workdir, "study_log.jsonl")
    self.total, self.done, self.t0 = total, 0, time.time()

  def skip(self, what: str):
    self.done += 1
    print(f"[{self.done}/{self.total}] {what}: finished earlier, skipped", flush=True)

  def start(self, what: str) -> float:
    print(f"[{self.done + 1}/{self.total}] {what} ... (study time {self._elapsed()})", flush=True)
    return time.time()

  def end(self, what: str, t: float, kind: str, note: str = ""):
    self.done += 1
    secs = time.time() - t
    print(f"[{self.done}/{self.total}] {what}: done in {secs:.0f}s{note}", flush=True)
    with open(self.log_path, "a") as f:
      f.write(json.dumps(dict(stage=kind, what=what, seconds=round(secs, 1),
                              time=time.strftime("%Y-%m-%dT%H:%M:%S"))) + "\n")

  def _elapsed(self) -> str:
    s = int(time.time() - self.t0)
    return f"{s // 60}m{s % 60:02d}s"


def _config_guard(pair_dir: str, config) -> None:
  """Refuses to continue a pair directory made with another config."""
  blob = json.dumps(config.to_dict(), sort_keys=True, default=str)
  digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
  path = os.path.join(pair_dir, "study_config.json")
  if os.path.exists(path):
    old = _read(path)
    if old["hash"] != digest:
      raise ValueError(
        f"{pair_dir} holds a study run made with another config (hash {old['hash']} vs "
        f"{digest}); use a fresh --workdir, or delete {pair_dir} to start that pair over."
      )
    return
  _write(path, dict(hash=digest, config=config.to_dict()))


def rescore(rows, kind: str, model, params, data, batch_size: int) -> list[dict[str, Any]]:
  """Candidate rows with ``sim`` computed as ``kind`` (latent, rouge or token_embedding),
  without decoding again."""
  from slicjax.pipelines import candidates as cand_lib

  out = []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i : i + batch_size]
    arrays = cand_lib.to_arrays([dict(r, sim=[0.0] * len(r["candidates"])) for r in chunk],
                                data.input_len, data.target_len)
    sim = cand_lib.similarity_scores(
      kind, model, params, jnp.asarray(arrays["inputs"]), jnp.asarray(arrays["targets"]),
      jnp.asarray(arrays["candidates"]), [r["candidate_texts"] for r in chunk],
      [r["target_text"] for r in chunk],
    )
    out.extend(dict(r, sim=[float(x) for x in np.asarray(s)]) for r, s in zip(chunk, sim))
  return out


def _candidates(config, r, pair_dir, model, ft, data, progress, visited: set) -> str:
  """The candidate directory of a recipe's (decoding, similarity), made when missing
  (``visited``: the decodings already counted in the progress)."""
  from slicjax.pipelines import candidates as cand_lib

  dec_dir = os.path.join(pair_dir, "decode", decode_key(r))
  what = f"decode candidates {decode_key(r)}"
  first = decode_key(r) not in visited
  visited.add(decode_key(r))
  if os.path.exists(os.path.join(dec_dir, "done.json")):
    if first:
      progress.skip(what)
  else:
    t = progress.start(what)
    cand_lib.generate(decode_config(config, r), dec_dir, params=ft, model=model, data=data)
    _write(os.path.join(dec_dir, "done.json"), dict(seconds=round(time.time() - t, 1)))
    progress.end(what, t, "decode")
  out = os.path.join(pair_dir, "candidates", f"{decode_key(r)}-{r['similarity']}")
  what = f"score candidates {decode_key(r)} by {r['similarity']} similarity"
  if os.path.exists(os.path.join(out, "done.json")):
    progress.skip(what)
    return out
  t = progress.start(what)
  rows = rescore(cand_lib.read_candidates(dec_dir), r["similarity"], model, ft, data,
                 int(config.candidates.batch_size))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "chunk-00000.jsonl.tmp"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(os.path.join(out, "chunk-00000.jsonl.tmp"), os.path.join(out, "chunk-00000.jsonl"))
  _write(os.path.join(out, cand_lib.MANIFEST),
         dict(kind="rescored", source=dec_dir, similarity=r["similarity"],
              num_examples=len(rows), per_example=int(r["num_candidates"])))
  _write(os.path.join(out, "done.json"), dict(seconds=round(time.time() - t, 1)))
  progress.end(what, t, "score")
  return out


def _grid_rows(models, model, data, c, beams: dict | None = None,
               predictions: list | None = None) -> list[dict[str, Any]]:
  from slicjax.pipelines import evaluate

  rows = evaluate.quality_grid(models, model, data, c, beams=beams, predictions=predictions)
  for row in rows:
    row["per_example"] = [float(x) for x in row.pop("_per_example")]
  return rows


def _best(rows, name: str | None = None) -> dict[str, Any]:
  """The row with the highest ROUGE-L (first on ties), of model ``name`` when given."""
  rows = [r for r in rows if name is None or r["model"] == name]
  return max(rows, key=lambda r: r["rougeL"])


def _row(rows, name: str, beam: int, alpha: float) -> dict[str, Any]:
  for r in rows:
    if r["model"] == name and r["beam"] == beam and r["alpha"] == alpha:
      return r
  raise KeyError(f"no evaluation row for {name} at beam {beam}, alpha {alpha}.")


def _ci(mean, lo, hi) -> dict[str, Any]:
  return {"mean": float(mean), "ci95": [float(lo), float(hi)]}


def spearman_difference(ft, cal, model, data, c, num_candidates: int) -> dict[str, Any]:
  """Per-input Spearman(logP, ROUGE) of both models on the fine-tuned model's
  ``num_candidates`` beam candidates of ``c``'s split: ``delta`` (calibrated − fine-tuned,
  paired over the inputs defined under both, ``{mean, ci95}``; None where no input is),
  ``inputs`` (that count) and each model's mean ``means``."""
  from slicjax.pipelines import evaluate

  per = evaluate.calibration_report({"fine-tuned": ft, "calibrated": cal}, model, data,
                                    dict(c, calibration_candidates=num_candidates), ft,
                                    per_input=True)
  ok = ~np.isnan(per["fine-tuned"]) & ~np.isnan(per["calibrated"])
  if ok.any():
    delta = _ci(*metrics.paired_bootstrap_ci(per["calibrated"][ok], per["fine-tuned"][ok],
                                             num_resamples=NUM_RESAMPLES))
  else:  # no input with 2+ distinct log-probs and ROUGE values under both models: undefined
    delta = {"mean": None, "ci95": [None, None]}
  means = {name: float(np.nanmean(v)) if (~np.isnan(v)).any() else None
           for name, v in per.items()}
  return dict(delta=delta, inputs=int(ok.sum()), means=means)


def test_comparison(ft, cal, model, data, config, study: Study, chosen: dict[str, Any],
                    predictions: list | None = None):
  """Fine-tuned vs the chosen calibrated model on the test split: the json entry's numbers.
  ``predictions`` (a list) receives one dict per (model, beam, α, example): id, prediction,
  reference, ROUGE-L."""
  from slicjax.pipelines import evaluate

  beam, alpha = int(chosen["beam"]), float(chosen["alpha"])
  c = eval_settings(config, "test", sorted(set(study.val_beams) | {beam}),
                    sorted(set(study.alphas) | {alpha}), study.test_examples)
  beams: dict[str, np.ndarray] = {}
  rows = _grid_rows({"fine-tuned": ft, "calibrated": cal}, model, data, c, beams, predictions)
  at_c, at_f = _row(rows, "calibrated", beam, alpha), _row(rows, "fine-tuned", beam, alpha)
  d_rouge = metrics.paired_bootstrap_ci(at_c["per_example"], at_f["per_example"],
                                        num_resamples=NUM_RESAMPLES)
  a0 = 0.0 if 0.0 in c["alphas"] else c["alphas"][0]
  b16, b4 = _row(rows, "calibrated", 16, a0), _row(rows, "calibrated", 4, a0)
  d_beam = metrics.paired_bootstrap_ci(b16["per_example"], b4["per_example"],
                                       num_resamples=NUM_RESAMPLES)
  examples = data.split_examples("test")
  examples = examples[: study.test_examples] if study.test_examples else examples
  sp = spearman_difference(ft, cal, model, data, c, study.calibration_candidates)
  best = lambda name: {k: _best(rows, name)[k] for k in ("beam", "alpha", "rougeL")}
  with_pe = [dict(r, _per_example=np.asarray(r["per_example"])) for r in rows]
  # Selective generation of both models' test outputs (coverage-quality areas, AUROC).
  sel = (evaluate.selective_report({"fine-tuned": ft, "calibrated": cal}, model, data, c, beams)
         if c["selective"] else None)
  return dict(
    selective=sel,
    num_test_examples=len(examples), rows=[_public(r) for r in rows],
    paired_differences=evaluate.paired_differences(with_pe),
    fine_tuned_best=best("fine-tuned"), calibrated_best=best("calibrated"),
    delta_rougeL=_ci(*d_rouge), delta_spearman=sp["delta"],
    calibrated_beam16_minus_beam4=_ci(*d_beam), spearman_inputs=sp["inputs"],
    spearman_mean=sp["means"], compared_at=dict(beam=beam, alpha=alpha), beam_alpha_for_beam_diff=a0,
  )


def _public(row) -> dict[str, Any]:
  return {k: v for k, v in row.items() if k != "per_example"}


def goals(entry: dict[str, Any]) -> dict[str, bool]:
  """The issue's three goals for one json entry (false when an interval is undefined)."""
  lo_r, lo_s = entry["delta_rougeL"]["ci95"][0], entry["delta_spearman"]["ci95"][0]
  hi_b = entry["calibrated_beam16_minus_beam4"]["ci95"][1]
  defined = lambda x: x is not None and bool(np.isfinite(x))
  return {
    "delta_rougeL_ci95_lo_above_0": defined(lo_r) and lo_r > 0,
    "delta_spearman_ci95_lo_above_0": defined(lo_s) and lo_s > 0,
    "beam16_minus_beam4_ci95_hi_at_least_0": defined(hi_b) and hi_b >= 0,
  }


def run_pair(study: Study, dataset: str, workdir: str, progress: Progress) -> dict[str, Any]:
  """Every stage of one (dataset, model) pair; returns its summary (also ``summary.json``)."""
  from slicjax import peft
  from slicjax.interop import pretrained as pretrained_lib
  from slicjax.pipelines import calibrate, common, mle, tasks

  pair_dir = os.path.join(workdir, f"{dataset}__{study.model}")
  base_config = pair_config(study, dataset)
  data = tasks.load(base_config, batch_size=int(base_config.train.batch_size),
                    seed=int(base_config.train.seed))
  config = with_lengths(base_config, data)
  _config_guard(pair_dir, config)
  # Decodings and scorings only finished cells needed are not visited: not counted either.
  pending = [r for _, r in cells(study)
             if not os.path.exists(os.path.join(pair_dir, "cells", recipe_slug(r), "result.json"))]
  every = cells(study)
  progress.total -= (len({decode_key(r) for _, r in every}) - len({decode_key(r) for r in pending})
                     + len({(decode_key(r), r["similarity"]) for _, r in every})
                     - len({(decode_key(r), r["similarity"]) for r in pending}))
  lengths = dict(data.lengths or {}, input_len=data.input_len, target_len=data.target_len)
  how = ", ".join(lengths.get("chosen_from_data") or []) or "none"
  print(f"{dataset}: {len(data.train_examples)} train / {len(data.eval_examples)} validation / "
        f"{len(data.test_examples or [])} test examples; input_len {data.input_len}, target_len "
        f"{data.target_len} (chosen from the data: {how})", flush=True)
  mle_dir = os.path.join(pair_dir, "mle")
  what = f"{dataset}: MLE fine-tuning"
  if os.path.exists(os.path.join(mle_dir, "done.json")):
    progress.skip(what)
  else:
    t = progress.start(what)
    mle.run(config, mle_dir)
    _write(os.path.join(mle_dir, "done.json"), dict(seconds=round(time.time() - t, 1)))
    progress.end(what, t, "mle")
  model = common.model_from(config)
  ft = pretrained_lib.workdir_params(mle_dir)[0]  # the best-validation checkpoint
  nval = study.val_examples
  c_val = eval_settings(config, "validation", study.val_beams, study.alphas, nval)
  ft_path = os.path.join(pair_dir, "fine_tuned_validation.json")
  what = f"{dataset}: fine-tuned model on validation"
  if os.path.exists(ft_path):
    progress.skip(what)
  else:
    t = progress.start(what)
    rows = _grid_rows({"fine-tuned": ft}, model, data, c_val)
    _write(ft_path, dict(rows=rows, seconds=round(time.time() - t, 1)))
    progress.end(what, t, "validation", f" (best ROUGE-L {_best(rows)['rougeL']:.2f})")
  ft_val = _read(ft_path)["rows"]
  results, cand_dirs, visited = [], {}, set()
  for name, r in cells(study):
    cell_dir = os.path.join(pair_dir, "cells", recipe_slug(r))
    res_path = os.path.join(cell_dir, "result.json")
    what = f"{dataset}: cell {name} ({recipe_slug(r)})"
    if os.path.exists(res_path):
      progress.skip(what)
      results.append(_read(res_path))
      continue
    key = (decode_key(r), r["similarity"])
    if key not in cand_dirs:  # cells that decode and score alike share one candidate set
      cand_dirs[key] = _candidates(config, r, pair_dir, model, ft, data, progress, visited)
    cand_dir = cand_dirs[key]
    t = progress.start(what + ": calibrate + validation")
    state, cal_model = calibrate.run(recipe_config(config, r, cand_dir),
                                     os.path.join(cell_dir, "calibrate"), params=ft, data=data)
    cal = peft.merge(cal_model, state.params)[1]
    rows = _grid_rows({"calibrated": cal}, model, data, c_val)
    best = _best(rows)
    ft_row = _row(ft_val, "fine-tuned", best["beam"], best["alpha"])
    d, lo, hi = metrics.paired_bootstrap_ci(best["per_example"], ft_row["per_example"],
                                            num_resamples=NUM_RESAMPLES)
    result = dict(cell=name, recipe=r, slug=recipe_slug(r), rows=rows,
                  best=dict(beam=best["beam"], alpha=best["alpha"], rougeL=best["rougeL"],
                            lo=best["rougeL_lo"], hi=best["rougeL_hi"]),
                  vs_fine_tuned=dict(diff=d, lo=lo, hi=hi, within_noise=bool(lo <= 0 <= hi)))
    if study.val_spearman:
      result["spearman_vs_fine_tuned"] = spearman_difference(
        ft, cal, model, data, c_val, study.calibration_candidates)
    result["seconds"] = round(time.time() - t, 1)
    _write(res_path, result)
    results.append(result)
    progress.end(what, t, "cell", f" (validation ROUGE-L {best['rougeL']:.2f} at beam "
                                  f"{best['beam']})")
    del state, cal
  chosen = max(results, key=lambda x: x["best"]["rougeL"])  # first on ties: sweep order
  test_path = os.path.join(pair_dir, "test", "result.json")
  preds_path = os.path.join(pair_dir, "test", "predictions.jsonl")  # per example
  what = f"{dataset}: test split, fine-tuned vs chosen ({chosen['cell']})"
  if study.validation_only:
    pass  # an ablation: the test split is not touched
  elif os.path.exists(test_path) and _read(test_path)["chosen"] == chosen["slug"]:
    progress.skip(what)
  else:
    t = progress.start(what)
    cal = pretrained_lib.workdir_params(
      os.path.join(pair_dir, "cells", chosen["slug"], "calibrate"))[0]
    preds: list[dict[str, Any]] = []
    out = test_comparison(ft, cal, model, data, config, study, chosen["best"], preds)
    out.update(chosen=chosen["slug"], seconds=round(time.time() - t, 1))
    os.makedirs(os.path.dirname(preds_path), exist_ok=True)
    with open(preds_path, "w") as f:
      f.writelines(json.dumps(p) + "\n" for p in preds)
    _write(test_path, out)
    progress.end(what, t, "test")
  test = None if study.validation_only else _read(test_path)
  markers = ([os.path.join(mle_dir, "done.json"), ft_path] + ([] if test is None else [test_path])
             + glob.glob(os.path.join(pair_dir, "decode", "*", "done.json"))
             + glob.glob(os.path.join(pair_dir, "candidates", "*", "done.json")))
  stage_seconds = sum(_read(p)["seconds"] for p in markers) + sum(x["seconds"] for x in results)
  summary = dict(dataset=dataset, model=study.model, lengths=lengths,
                 stage_seconds=round(stage_seconds, 1),
                 splits=dict(train=len(data.train_examples), validation=len(data.eval_examples),
                             test=len(data.test_examples or [])),
                 fine_tuned_validation=[_public(x) for x in ft_val],
                 cells=[{k: (v if k != "rows" else [_public(x) for x in v])
                         for k, v in x.items()} for x in results],
                 chosen=dict(cell=chosen["cell"], recipe=chosen["recipe"], **chosen["best"]),
                 test=test)
  if test is not None and os.path.exists(preds_path):  # absent for a test stage run before it
    summary["test_predictions"] = preds_path
  _write(os.path.join(pair_dir, "summary.json"), summary)
  return summary


def effect_entry(summary: dict[str, Any], command: str) -> dict[str, Any]:
  """The ``slic_effect.json`` entry of one pair."""
  t = summary["test"]
  entry = dict(
    dataset=summary["dataset"], model=summary["model"],
    num_test_examples=int(t["num_test_examples"]),
    fine_tuned_best=t["fine_tuned_best"], calibrated_best=t["calibrated_best"],
    delta_rougeL=t["delta_rougeL"], delta_spearman=t["delta_spearman"],
    calibrated_beam16_minus_beam4=t["calibrated_beam16_minus_beam4"], command=command,
  )
  entry["goals"] = goals(entry)
  return entry


def merge_effect_json(path: str, new_entries: list[dict[str, Any]]) -> dict[str, Any]:
  """Writes ``{"entries": [...]}`` to ``path``: the new entries replace those of the same
  (dataset, model); other entries already there (a list or ``{"entries": [...]}``) are kept."""
  old: list[dict[str, Any]] = []
  if os.path.exists(path):
    loaded = _read(path)
    old = loaded["entries"] if isinstance(loaded, dict) else list(loaded)
  keys = {(e["dataset"], e["model"]) for e in new_entries}
  merged = {"entries": [e for e in old if (e.get("dataset"), e.get("model")) not in keys]
            + list(new_entries)}
  _write(path, merged)
  return merged


def _f(x: float, sign: bool = False) -> str:
  return "n/a" if x is None or not np.isfinite(x) else (f"{x:+.2f}" if sign else f"{x:.2f}")


def _f3(x) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _within(d: dict[str, Any]) -> bool:
  lo, hi = d["ci95"]
  return lo is not None and hi is not None and lo <= 0 <= hi


def _ci_text(d: dict[str, Any], digits: int = 2) -> str:
  m, (lo, hi) = d["mean"], d["ci95"]
  if m is None or not np.isfinite(m):
    return "n/a (undefined on every input)"
  return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def study_markdown(study: Study, summaries, entries, command: str, seconds: float) -> str:
  """The study's section of ``slic_study.md``."""
  from slicjax.pipelines import evaluate

  lines = [f"<!-- study:{study.name} -->", f"## Study `{study.name}`: {study.description}", "",
           f"Command: `{command}`  ",
           f"Compute time of all stages: {sum(x['stage_seconds'] for x in summaries) / 60:.1f} "
           f"min (summed over invocations; the last invocation took {seconds / 60:.1f} min).",
           "",
           f"Sweep ({'full grid' if study.grid else 'one factor at a time around the base'}): "
           f"base `{recipe_slug(study.base)}` "
           f"({', '.join(f'{k}={v}' for k, v in study.base.items())}); varied: "
           + ("; ".join(f"{k} ∈ {list(v)}" for k, v in study.sweep.items()) or "nothing") + ".",
           ("Validation only (an ablation): the test split is not evaluated and no "
            f"`{RESULTS_JSON}` entry is written." if study.validation_only else
            "Recipes are chosen on the validation split only; the test split is evaluated once, "
            "for the fine-tuned model and the chosen recipe."), ""]
  for s, e in itertools.zip_longest(summaries, entries[: len(summaries)]):
    ln = s["lengths"]
    lines += [f"### {s['dataset']} / {s['model']}", "",
              f"Splits: {s['splits']['train']} train / {s['splits']['validation']} validation / "
              f"{s['splits']['test']} test. Lengths: input {ln['input_len']}, target "
              f"{ln['target_len']} tokens"
              + (f" (chosen from the data: {', '.join(ln['chosen_from_data'])} = "
                 f"{ln.get('percentile', 98)}th percentile of train)"
                 if ln.get("chosen_from_data") else " (set in the config)") + ".", "",
              "#### Validation (every cell)", "",
              "ROUGE-L per beam (α = " + ", ".join(f"{a:g}" for a in study.alphas)
              + ") with 95% bootstrap intervals; Δ = paired difference to the fine-tuned model "
              "at the cell's best beam"
              + (f"; ΔSpearman = paired difference of the per-input Spearman(logP, ROUGE) to the "
                 f"fine-tuned model's, on its {study.calibration_candidates} validation beam "
                 "candidates (means fine-tuned → calibrated; inputs defined under both)"
                 if study.val_spearman else "") + ".", ""]
    beams = [(r["beam"], r["alpha"]) for r in s["fine_tuned_validation"]]
    head = " | ".join(f"beam {b}" + (f" α {a:g}" if len(study.alphas) > 1 else "")
                      for b, a in beams)
    sp_head = " ΔSpearman [95% CI] |" if study.val_spearman else ""
    lines += [f"| cell | recipe | {head} | Δ vs fine-tuned [95% CI] |{sp_head} |",
              "|---|---|" + "---|" * len(beams) + "---|" * (2 + study.val_spearman)]
    cell_rows = lambda rows: " | ".join(
      f"{_f(r['rougeL'])} [{_f(r['rougeL_lo'])}, {_f(r['rougeL_hi'])}]"
      for r in sorted(rows, key=lambda r: beams.index((r["beam"], r["alpha"]))))
    lines.append(f"| fine-tuned | MLE (best validation NLL) | "
                 f"{cell_rows(s['fine_tuned_validation'])} | |{' |' * study.val_spearman} |")
    for c in s["cells"]:
      v = c["vs_fine_tuned"]
      mark = "**chosen**" if c["cell"] == s["chosen"]["cell"] else ""
      noise = "within noise" if v["within_noise"] else ""
      sp = ""
      if study.val_spearman:
        d = c.get("spearman_vs_fine_tuned")
        sp = (" not computed |" if d is None else
              f" {_ci_text(d['delta'], 3)}{' within noise' if _within(d['delta']) else ''} "
              f"({_f3(d['means']['fine-tuned'])} → {_f3(d['means']['calibrated'])}; "
              f"{d['inputs']} inputs) |")
      lines.append(f"| {c['cell']} | `{c['slug']}` | {cell_rows(c['rows'])} | "
                   f"{v['diff']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}] {noise} |{sp} {mark} |")
    ch, t = s["chosen"], s["test"]
    lines += ["", f"{'Validation would choose' if t is None else 'Chosen recipe'}: "
              f"**{ch['cell']}** (`{recipe_slug(ch['recipe'])}`), best "
              f"validation ROUGE-L {ch['rougeL']:.2f} at beam {ch['beam']}, α {ch['alpha']:g}.",
              ""]
    if t is None:
      continue
    lines += [f"#### Test ({t['num_test_examples']} examples)", ""]
    if s.get("test_predictions"):
      lines += [f"Per-example outputs (model, beam, α, prediction, reference, ROUGE-L): "
                f"`slic_study/{study.name}/{os.path.basename(s['test_predictions'])}` (beside "
                "this file).", ""]
    lines += ["| model | α | beam | ROUGE-1 | ROUGE-2 | ROUGE-L [95% CI] | mean length | "
              "repetition |", "|---|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
      lines.append(f"| {r['model']} | {r['alpha']:g} | {r['beam']} | {r['rouge1']:.2f} | "
                   f"{r['rouge2']:.2f} | {r['rougeL']:.2f} [{r['rougeL_lo']:.2f}, "
                   f"{r['rougeL_hi']:.2f}] | {r['length']:.1f} | {r['repetition'] * 100:.1f}% |")
    lines += ["", "Paired differences, calibrated − fine-tuned (same test examples, 1,000 "
              "bootstrap resamples):", "", "| α | beam | ΔROUGE-L [95% CI] | |", "|---|---|---|---|"]
    for d in t["paired_differences"]:
      lines.append(f"| {d['alpha']:g} | {d['beam']} | {d['rougeL_diff']:+.2f} [{d['lo']:+.2f}, "
                   f"{d['hi']:+.2f}] | {'within noise' if d['within_noise'] else ''} |")
    if t.get("selective"):  # test results written before the selective report lack it
      lines.append(evaluate.selective_markdown(t["selective"])
                   .replace("## Selective generation", "#### Selective generation (test)")
                   .replace("\n![coverage vs quality](coverage_quality.png)", ""))
    g = e["goals"]
    yes = lambda ok: "**holds**" if ok else "does not hold"
    sp = t["spearman_mean"]
    lines += ["", "Goals (test split):", "",
              f"- ΔROUGE-L at the chosen beam {t['compared_at']['beam']}, α "
              f"{t['compared_at']['alpha']:g}: {_ci_text(e['delta_rougeL'])} — lower end > 0 "
              f"{yes(g['delta_rougeL_ci95_lo_above_0'])}"
              + (" (within noise)" if _within(e["delta_rougeL"]) else "") + ".",
              f"- ΔSpearman(logP, ROUGE) per input on the fine-tuned model's "
              f"{study.calibration_candidates} beam candidates ({t['spearman_inputs']} inputs "
              f"with a defined value under both; means {_f3(sp['fine-tuned'])} → "
              f"{_f3(sp['calibrated'])}): {_ci_text(e['delta_spearman'], 3)} — lower end > 0 "
              f"{yes(g['delta_spearman_ci95_lo_above_0'])}.",
              f"- Calibrated beam 16 − beam 4 (α {t['beam_alpha_for_beam_diff']:g}): "
              f"{_ci_text(e['calibrated_beam16_minus_beam4'])} — upper end ≥ 0 (no degradation "
              f"with the larger beam) {yes(g['beam16_minus_beam4_ci95_hi_at_least_0'])}.", ""]
  lines.append(f"<!-- /study:{study.name} -->")
  return "\n".join(lines) + "\n"


def merge_markdown(path: str, section: str, name: str) -> str:
  """Writes ``path`` with the study's ``section`` replacing its earlier one; other studies'
  sections are kept."""
  title = ("# SLiC study results\n\nWritten by `experiments/slic_study.py` "
           "(`slicjax/pipelines/slic_study.py`); one section per study.\n\n")
  text = open(path).read() if os.path.exists(path) else title
  start, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
  if start in text and end in text:
    i, j = text.index(start), text.index(end) + len(end)
    text = text[:i] + section.rstrip("\n") + text[j:]
  else:
    text = text.rstrip("\n") + "\n\n" + section
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text if text.endswith("\n") else text + "\n")
  return text


def copy_predictions(path: str, results_dir: str, study_name: str, pair: str) -> str:
  """Gzips ``path`` to ``<results_dir>/slic_study/<study>/<pair>_test_predictions.jsonl.gz``;
  returns that path."""
  import gzip
  import shutil

  out = os.path.join(results_dir, "slic_study", study_name, f"{pair}_test_predictions.jsonl.gz")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(path, "rb") as src, gzip.open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
  return out


def default_command() -> str:
  return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def run(study_name: str | Study, workdir: str, results_dir: str = "docs/results", *,
        command: str | None = None, datasets: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Runs (or resumes) a study and writes its results; returns ``{summaries, entries}``.

  Args:
    study_name: a key of :data:`STUDIES`, or a :class:`Study` (e.g. a named one shrunk with
      ``dataclasses.replace`` to check it end to end).
    workdir: where every stage's output goes (rerun with the same to resume).
    results_dir: where ``slic_study.md`` and ``slic_effect.json`` are written (merged).
    command: the command line recorded in the results (default: this process's).
    datasets: a subset of the study's datasets (default: all).
  """
  from slicjax.pipelines import common

  if isinstance(study_name, Study):
    study, study_name = study_name, study_name.name
  elif study_name not in STUDIES:
    raise ValueError(f"unknown study {study_name!r}; choose from {sorted(STUDIES)}.")
  else:
    study = STUDIES[study_name]
  check_study(study)
  chosen = tuple(datasets or study.datasets)
  unknown = sorted(set(chosen) - set(study.datasets))
  if unknown:
    raise ValueError(f"study {study_name!r} has no dataset(s) {unknown}; it runs "
                     f"{list(study.datasets)}.")
  command = command or default_command()
  t0 = time.time()
  workdir = common.prepare_workdir(workdir)
  decodes = {(decode_key(r)) for _, r in cells(study)}
  scores = {(decode_key(r), r["similarity"]) for _, r in cells(study)}
  # mle, ft val, decodes, scorings, cells and (unless an ablation) test
  per_pair = 2 + (not study.validation_only) + len(decodes) + len(scores) + len(cells(study))
  progress = Progress(workdir, per_pair * len(chosen))
  print(f"study {study_name}: {len(cells(study))} cells x {len(chosen)} dataset(s) "
        f"({per_pair * len(chosen)} stages) in {workdir}", flush=True)
  summaries = [run_pair(study, ds, workdir, progress) for ds in chosen]
  for s in summaries:  # per-example test outputs beside the results, to recompute every figure
    if s.get("test_predictions"):
      s["test_predictions"] = copy_predictions(s["test_predictions"], results_dir, study.name,
                                               f"{s['dataset']}__{s['model']}")
  entries = [] if study.validation_only else [effect_entry(s, command) for s in summaries]
  if entries:
    merge_effect_json(os.path.join(results_dir, RESULTS_JSON), entries)
  section = study_markdown(study, summaries, entries, command, time.time() - t0)
  merge_markdown(os.path.join(results_dir, RESULTS_MD), section, study.name)
  print(f"study {study_name} finished in {(time.time() - t0) / 60:.1f} min; results in "
        f"{results_dir}/{RESULTS_MD}" + ("" if study.validation_only else f" and {RESULTS_JSON}"),
        flush=True)
  for e in entries:
    print(f"  {e['dataset']} / {e['model']}: goals {e['goals']}", flush=True)
  return dict(summaries=summaries, entries=entries)
