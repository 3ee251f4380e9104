"""The SLiC study runner: the sweep, the results files' exact shape, resuming and merging."""

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest

from slicjax.pipelines import slic_study

ENTRY_KEYS = {"dataset", "model", "num_test_examples", "fine_tuned_best", "calibrated_best",
              "delta_rougeL", "delta_spearman", "calibrated_beam16_minus_beam4", "command",
              "goals"}


def test_one_factor_at_a_time_and_grid_cells():
  s = slic_study.Study(name="x", description="", preset="smoke", datasets=("d",), model="m",
                       sweep={"loss": ("margin", "rank"), "num_candidates": (4,)})
  names = [n for n, _ in slic_study.cells(s)]
  assert names == ["base", "loss=margin", "num_candidates=4"]  # loss=rank is the base: dropped
  recipes = dict(slic_study.cells(s))
  assert recipes["loss=margin"] == {**slic_study.BASE_RECIPE, "loss": "margin"}
  g = slic_study.Study(**{**s.__dict__, "grid": True})
  assert len(slic_study.cells(g)) == 4  # {rank, margin} x {8, 4}
  bad = slic_study.Study(**{**s.__dict__, "sweep": {"loss": ("hinge",)}})
  with pytest.raises(ValueError, match=r"loss='hinge'; choose from"):
    slic_study.check_study(bad)
  with pytest.raises(ValueError, match="must include 4 and 16"):
    slic_study.check_study(slic_study.Study(**{**s.__dict__, "val_beams": (1, 4)}))
  for study in slic_study.STUDIES.values():
    slic_study.check_study(study)


def _entry(ds, model, lo):
  ci = {"mean": 1.0, "ci95": [lo, 2.0]}
  best = {"beam": 4, "alpha": 0.0, "rougeL": 20.0}
  e = dict(dataset=ds, model=model, num_test_examples=10, fine_tuned_best=best,
           calibrated_best=best, delta_rougeL=ci, delta_spearman=ci,
           calibrated_beam16_minus_beam4={"mean": -1.0, "ci95": [-2.0, -0.5]}, command="c")
  e["goals"] = slic_study.goals(e)
  return e


def test_goals_and_json_merge_keep_other_entries(tmp_path):
  e = _entry("a", "m", 0.5)
  assert e["goals"] == {"delta_rougeL_ci95_lo_above_0": True,
                        "delta_spearman_ci95_lo_above_0": True,
                        "beam16_minus_beam4_ci95_hi_at_least_0": False}
  assert not slic_study.goals(_entry("a", "m", -0.1))["delta_rougeL_ci95_lo_above_0"]
  path = str(tmp_path / "effect.json")
  with open(path, "w") as f:  # an older file as a bare list
    json.dump([_entry("other", "m", 0.1), _entry("a", "m", -3.0)], f)
  merged = slic_study.merge_effect_json(path, [_entry("a", "m", 0.5)])
  assert [(x["dataset"], x["delta_rougeL"]["ci95"][0]) for x in merged["entries"]] == [
    ("other", 0.1), ("a", 0.5)]
  assert json.load(open(path)) == merged


def test_markdown_merge_replaces_only_its_section(tmp_path):
  path = str(tmp_path / "r.md")
  slic_study.merge_markdown(path, "<!-- study:a -->\nA1\n<!-- /study:a -->\n", "a")
  slic_study.merge_markdown(path, "<!-- study:b -->\nB1\n<!-- /study:b -->\n", "b")
  text = slic_study.merge_markdown(path, "<!-- study:a -->\nA2\n<!-- /study:a -->\n", "a")
  assert "A2" in text and "A1" not in text and "B1" in text and text.index("A2") < text.index("B1")


def _executed(workdir):
  with open(os.path.join(workdir, "study_log.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_smoke_study_end_to_end_resumes_and_merges(tmp_path):
  work, results = str(tmp_path / "study"), str(tmp_path / "results")
  os.makedirs(results)
  foreign = _entry("debian_descriptions", "some-other-model", 0.2)
  with open(os.path.join(results, "slic_effect.json"), "w") as f:
    json.dump({"entries": [foreign]}, f)
  out = slic_study.run("smoke", work, results, command="python experiments/slic_study.py smoke")
  effect = json.load(open(os.path.join(results, "slic_effect.json")))
  assert set(effect) == {"entries"} and effect["entries"][0] == foreign
  assert len(effect["entries"]) == 2
  e = effect["entries"][1]
  assert set(e) == ENTRY_KEYS
  assert (e["dataset"], e["model"]) == ("stdlib_docstrings", "transformer-tiny")
  assert e["num_test_examples"] == 8 and e["command"].endswith("slic_study.py smoke")
  for k in ("fine_tuned_best", "calibrated_best"):
    assert set(e[k]) == {"beam", "alpha", "rougeL"} and e[k]["beam"] in (4, 16)
  for k in ("delta_rougeL", "delta_spearman", "calibrated_beam16_minus_beam4"):
    assert set(e[k]) == {"mean", "ci95"} and len(e[k]["ci95"]) == 2
  for k in ("delta_rougeL", "calibrated_beam16_minus_beam4"):
    lo, hi = e[k]["ci95"]
    assert lo <= e[k]["mean"] <= hi
  assert e["goals"] == slic_study.goals(e)
  summary = out["summaries"][0]
  assert [c["cell"] for c in summary["cells"]] == ["base", "loss=margin"]
  assert summary["chosen"]["cell"] in ("base", "loss=margin")
  md = open(os.path.join(results, "slic_study.md")).read()
  assert "## Study `smoke`" in md and "Chosen recipe" in md and "| loss=margin |" in md
  assert "ΔROUGE-L" in md and "Goals (test split)" in md
  sel = summary["test"]["selective"]  # the selective-generation report of both test models
  assert set(sel["models"]) == {"fine-tuned", "calibrated"} and sel["num_examples"] == 8
  assert "logp" in sel["models"]["calibrated"] and "#### Selective generation (test" in md
  # The per-example test outputs (copied beside the results) recompute every test row's
  # ROUGE-L and the entry's paired difference.
  path = summary["test_predictions"]
  assert path.startswith(os.path.join(results, "slic_study", "smoke"))
  assert f"slic_study/smoke/{os.path.basename(path)}" in md
  preds = [json.loads(x) for x in gzip.open(path, "rt")]
  for r in summary["test"]["rows"]:
    mine = [p["rougeL"] for p in preds
            if (p["model"], p["beam"], p["alpha"]) == (r["model"], r["beam"], r["alpha"])]
    assert len(mine) == 8 and np.mean(mine) == pytest.approx(r["rougeL"])
  at = summary["test"]["compared_at"]
  by = {m: [p["rougeL"] for p in preds if (p["model"], p["beam"], p["alpha"]) ==
            (m, at["beam"], at["alpha"])] for m in ("fine-tuned", "calibrated")}
  assert np.mean(np.subtract(by["calibrated"], by["fine-tuned"])) == pytest.approx(
    e["delta_rougeL"]["mean"])
  kinds = [x["stage"] for x in _executed(work)]
  assert kinds.count("cell") == 2 and kinds.count("decode") == 1 and kinds.count("mle") == 1
  assert kinds.count("score") == 1  # both cells share one candidate set
  cell_files = sorted(
    os.path.join(dp, "result.json") for dp, _, fs in os.walk(work) if "result.json" in fs)
  mtimes = {p: os.path.getmtime(p) for p in cell_files}
  # A rerun skips every finished stage and rewrites the results the same way.
  slic_study.run("smoke", work, results, command="python experiments/slic_study.py smoke")
  assert len(_executed(work)) == len(kinds)
  assert {p: os.path.getmtime(p) for p in cell_files} == mtimes
  again = json.load(open(os.path.join(results, "slic_effect.json")))
  assert again == effect
  assert open(os.path.join(results, "slic_study.md")).read().count("## Study `smoke`") == 1
  # Every cell carries its validation ΔSpearman (the smoke study asks for it) in the report.
  for c in summary["cells"]:
    d = c["spearman_vs_fine_tuned"]
    assert set(d) == {"delta", "inputs", "means"} and 0 <= d["inputs"] <= 8
    if d["inputs"]:
      lo, hi = d["delta"]["ci95"]
      assert lo <= d["delta"]["mean"] <= hi
  assert "ΔSpearman [95% CI]" in md
  # The same study as a validation-only ablation on the same workdir: nothing is re-run, the
  # test split is not touched, no effect entry is written, and the report says so.
  ablation = dataclasses.replace(slic_study.STUDIES["smoke"], name="smoke_ablation",
                                 validation_only=True)
  results2 = str(tmp_path / "results_ablation")
  out2 = slic_study.run(ablation, work, results2, command="ablation")
  assert len(_executed(work)) == len(kinds) and out2["entries"] == []
  assert out2["summaries"][0]["test"] is None
  assert not os.path.exists(os.path.join(results2, "slic_effect.json"))
  md2 = open(os.path.join(results2, "slic_study.md")).read()
  assert "Validation only (an ablation)" in md2 and "Validation would choose" in md2
  assert "Goals (test split)" not in md2 and "#### Test" not in md2
  header = next(x for x in md2.splitlines() if x.startswith("| cell |"))
  rows = [x for x in md2.splitlines() if x.startswith(("| fine-tuned |", "| base |"))]
  assert all(r.count("|") == header.count("|") for r in rows), (header, rows)


@pytest.mark.slow
def test_rescoring_a_shared_decode_equals_generating_with_that_similarity(tmp_path):
  """Cells share one decoded set across similarities: re-scoring it must give the numbers a
  generation with that similarity would have written."""
  import jax
  import ml_collections

  from slicjax import optim, training
  from slicjax.pipelines import candidates, common, mle, tasks

  c = ml_collections.ConfigDict()
  c.model = dict(family="transformer", preset="tiny", vocab_size=24, max_len=32)
  c.data = {**tasks.DATA_KEYS, "name": "reverse", "input_len": 6, "target_len": 7,
            "synthetic_vocab": 24, "num_train": 32, "num_eval": 8}
  c.optimizer = dict(optim.DEFAULTS)
  c.train = {**mle.TRAIN_KEYS, "progress": False}
  c.candidates = {**candidates.CANDIDATE_KEYS, "num_examples": 12, "num_candidates": 3,
                  "method": "sample", "temperature": 1.0, "top_k": 0, "batch_size": 4,
                  "chunk_size": 8, "progress": False}
  c = ml_collections.ConfigDict(c.to_dict())
  model = common.model_from(c)
  data = tasks.load(c, batch_size=4)
  state, _ = training.create_train_state(
    model, optim.make_optimizer(dict(optim.DEFAULTS), 1)[0], common.make_mesh(c),
    jax.random.PRNGKey(0), init_kwargs=dict(input_len=6, target_len=7))
  params = state.params
  c.candidates.similarity = "none"  # one decode, re-scored with each similarity below
  raw = candidates.read_candidates(
    candidates.generate(c, str(tmp_path / "none"), params=params, model=model, data=data))
  for kind in ("latent", "rouge", "token_embedding"):
    c.candidates.similarity = kind
    direct = candidates.generate(c, str(tmp_path / kind), params=params, model=model, data=data)
    want = candidates.read_candidates(direct)
    got = slic_study.rescore(raw, kind, model, params, data, 5)
    assert [r["candidates"] for r in got] == [r["candidates"] for r in want]
    np.testing.assert_allclose([r["sim"] for r in got], [r["sim"] for r in want], rtol=1e-5,
                               atol=1e-6)
    assert len({tuple(r["sim"]) for r in got}) > 1  # not a constant
