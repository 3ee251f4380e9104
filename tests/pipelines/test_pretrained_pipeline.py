"""Every binary starts from a GGUF checkpoint (``--config.pretrained.init_from``).

A tiny Llama GGUF with a byte-level BPE tokenizer and a ChatML template (``tests/tiny_gguf.py``,
the special-token layout of SmolLM2) goes through the binaries as subprocesses: LoRA MLE ->
candidates -> LoRA calibration -> export, and DPO with frozen parameter groups; reward training,
RSO sampling, decoding and evaluation run in-process on the same model. Trainable parameters
change, frozen ones stay bit-identical, and the exported directory generates in transformers
exactly what slicjax generates.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny_gguf import write_tiny_gguf

from slicjax import checkpoint, optim
from slicjax.decoding.api import decode
from slicjax.interop import pretrained
from slicjax.models.seq_model import EOS_ID
from slicjax.pipelines import (
  candidates,
  common,
  evaluate,
  mle,
  preference,
  preference_pairs,
  reward,
  rso,
  tasks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUNCS = [
  ("def add(a, b):\n    return a + b", "Add two numbers."),
  ("def neg(x):\n    return -x", "Negate a number."),
  ("def first(xs):\n    return xs[0]", "Return the first item."),
  ("def last(xs):\n    return xs[-1]", "Return the last item."),
  ("def twice(f, x):\n    return f(f(x))", "Apply a function twice."),
  ("def size(xs):\n    return len(xs)", "Return the length."),
  ("def join(xs):\n    return ','.join(xs)", "Join strings with commas."),
  ("def up(s):\n    return s.upper()", "Upper-case a string."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("pretrained")
  gguf_path = write_tiny_gguf(d / "tiny.gguf")
  long_doc = "Return the first item of a list that is never empty. " * 6
  test_rows = FUNCS[-2:] + [(FUNCS[0][0], long_doc.strip())]  # one target over target_len
  for name, rows in (("train", FUNCS), ("eval", FUNCS[:4]), ("test", test_rows)):
    with open(d / f"{name}.jsonl", "w") as f:
      for src, doc in rows:
        f.write(json.dumps({"input": src, "target": doc}) + "\n")
  with open(d / "pairs.jsonl", "w") as f:
    for (src, doc), (_, other) in zip(FUNCS, FUNCS[1:] + FUNCS[:1]):
      f.write(json.dumps({"prompt": src, "chosen": doc, "rejected": other}) + "\n")
  return d, gguf_path


def _data_flags(d):
  return [
    "--config.data.name=jsonl", f"--config.data.train_path={d / 'train.jsonl'}",
    f"--config.data.eval_path={d / 'eval.jsonl'}", "--config.data.input_len=48",
    "--config.data.target_len=14",
  ]


def _run(binary, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", binary), *flags], cwd=ROOT, env=env,
    capture_output=True, text=True, timeout=600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_slic_binaries_from_gguf_with_lora_then_export(setup):
  d, g = setup
  common_flags = [f"--config.pretrained.init_from={g}", *_data_flags(d), "--config.lora.rank=4"]
  _run("train.py", "--config=experiments/configs/mle.py", f"--workdir={d / 'mle'}",
       *common_flags, "--config.train.steps=3", "--config.train.batch_size=4",
       "--config.train.eval_every=0", "--config.train.progress=False")
  _run("generate_candidates.py", "--config=experiments/configs/slic.py",
       f"--workdir={d / 'cands'}", *common_flags,
       f"--config.candidates.finetuned_workdir={d / 'mle'}", "--config.candidates.num_examples=8",
       "--config.candidates.num_candidates=2", "--config.candidates.batch_size=4",
       "--config.candidates.similarity=rouge", "--config.candidates.progress=False")
  _run("calibrate.py", "--config=experiments/configs/slic.py", f"--workdir={d / 'cal'}",
       *common_flags, f"--config.calibrate.finetuned_workdir={d / 'mle'}",
       f"--config.calibrate.candidates_dir={d / 'cands'}", "--config.calibrate.steps=2",
       "--config.calibrate.batch_size=4", "--config.calibrate.progress=False")

  # MLE trained adapters only: the base is the GGUF's weights, bit for bit.
  _, start, tok = pretrained.load_pretrained(g, max_len=64)
  raw_mle, _ = checkpoint.load_params(str(d / "mle"))
  base, lora = _flat(raw_mle["base"]), _flat(raw_mle["lora"])
  for k, v in _flat(start).items():
    np.testing.assert_array_equal(base[k], v, err_msg=k)
  assert lora and all(np.any(v != 0) for k, v in lora.items() if k.endswith("/b"))
  # Calibration started new adapters on the merged MLE weights and changed only those.
  merged_mle, _ = pretrained.workdir_params(str(d / "mle"))
  raw_cal, step = checkpoint.load_params(str(d / "cal"))
  assert step == 2
  for k, v in _flat(merged_mle).items():
    np.testing.assert_array_equal(_flat(raw_cal["base"])[k], v, err_msg=k)
  assert not all(np.array_equal(_flat(merged_mle)[k], v) for k, v in _flat(start).items())

  # A calibrated workdir loads as a pretrained model (tokenizer and prompt format included).
  model, params, tok2 = pretrained.load_pretrained(str(d / "cal"))
  assert tok2.format_prompt("x") == tok.format_prompt("x")
  prompt = tok2.encode_prompt(FUNCS[0][0])
  ours = np.asarray(decode(model, params, jnp.array([prompt]), method="greedy",
                           max_len=12).tokens_BxKxL)[0, 0]

  # Export: transformers loads weights + tokenizer and generates the same tokens.
  _run("export.py", f"--workdir={d / 'cal'}", f"--out_dir={d / 'hf'}")
  for fn in os.listdir(d / "hf"):
    assert os.stat(d / "hf" / fn).st_mode & 0o044 == 0o044, fn  # readable by group/others
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(d / "hf"))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(d / "hf"),
                                                               dtype=torch.float32)
  text = hf_tok.apply_chat_template([{"role": "user", "content": FUNCS[0][0]}], tokenize=False,
                                    add_generation_prompt=True)
  hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  assert hf_ids == tok2.vocab_map.to_model(prompt).tolist()
  gen = hf_model.generate(torch.tensor([hf_ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.eos_token_id)
  theirs = gen[0, len(hf_ids):].tolist()
  n = len(theirs)
  if theirs[-1] == hf_tok.eos_token_id:  # slicjax writes EOS (1), then padding
    assert ours[n - 1] == EOS_ID
    n -= 1
  assert tok2.vocab_map.to_model(ours[:n]).tolist() == theirs[:n]


def test_dpo_binary_from_gguf_changes_only_unfrozen_groups(setup):
  d, g = setup
  _run("train_preference.py", "--config=experiments/configs/preference.py",
       f"--workdir={d / 'dpo'}", f"--config.pretrained.init_from={g}", *_data_flags(d),
       f"--config.preference.pairs={d / 'pairs.jsonl'}", "--config.preference.steps=2",
       "--config.preference.batch_size=4", "--config.preference.progress=False",
       "--config.optimizer.freeze=token_embed,decoder/layer_0/")
  _, start, _ = pretrained.load_pretrained(g, max_len=64)
  after, step = checkpoint.load_params(str(d / "dpo"))
  assert step == 2
  before, after = _flat(start), _flat(after)
  frozen = [k for k in before if k.startswith("token_embed") or "decoder/layer_0/" in k]
  assert frozen
  for k in before:
    if k in frozen:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    else:
      assert not np.array_equal(after[k], before[k]), k
  summary = json.load(open(d / "dpo" / "preference_summary.json"))
  assert summary["num_pairs"] == len(FUNCS)


def _config(d, g):
  c = ml_collections.ConfigDict()
  c.model = {"family": "transformer"}
  c.pretrained = {**common.PRETRAINED_KEYS, "init_from": g}
  c.lora = dict(common.LORA_KEYS)
  c.data = {**tasks.DATA_KEYS, "name": "jsonl", "train_path": str(d / "train.jsonl"),
            "eval_path": str(d / "eval.jsonl"), "test_path": str(d / "test.jsonl"),
            "input_len": 48, "target_len": 14}
  c.optimizer = {**optim.DEFAULTS, "learning_rate": 1e-3}
  c.train = {**mle.TRAIN_KEYS, "steps": 2, "batch_size": 4, "eval_every": 0, "progress": False}
  c.evaluate = {**evaluate.EVAL_KEYS, "beam_sizes": (1, 2), "alphas": (0.0,), "num_examples": 4,
                "batch_size": 4, "calibration_candidates": 2, "progress": False}
  c.candidates = {**candidates.CANDIDATE_KEYS, "progress": False}
  c.reward = {**reward.REWARD_KEYS, "pairs": str(d / "pairs.jsonl"), "steps": 2,
              "batch_size": 4, "eval_fraction": 0.25, "progress": False}
  c.rso = {**rso.RSO_KEYS, "reward": "model", "reward_workdir": str(d / "rm"),
           "num_examples": 4, "num_samples": 4, "num_accept": 2, "batch_size": 4,
           "chunk_size": 4, "progress": False}
  c.preference = {**preference.PREFERENCE_KEYS}
  c.mesh_shape = (2, 2, 2)  # batch 4 over data x fsdp; the pretrained weights over tensor
  return ml_collections.ConfigDict(c.to_dict())


def test_reward_rso_decode_and_evaluate_from_gguf(setup):
  d, g = setup
  cfg = _config(d, g)
  loaded, report = reward.train_reward(cfg, str(d / "rm"))
  assert 0.0 <= report["heldout_accuracy"] <= 1.0
  # the reward workdir reloads its pretrained backbone
  again = reward.load_reward(str(d / "rm"))
  assert again.net.backbone.vocab_size == loaded.net.backbone.vocab_size
  out = rso.rso_sample(cfg, str(d / "rso"))
  rows = preference_pairs.read_rows(out)
  assert len(rows) == 4
  data = tasks.load(cfg, batch_size=4)
  model, params, tok = common.pretrained(cfg)
  assert data.tokenizer is tok and data.vocab_size == model.vocab_size
  # zero-shot decoding and the evaluation grid from the pretrained params
  res = evaluate.run({"pretrained": params}, model, data, cfg, str(d / "eval"))
  assert {r["beam"] for r in res["grid"]} == {1, 2}
  assert all(r["rougeL_lo"] <= r["rougeL"] <= r["rougeL_hi"] for r in res["grid"])
  preds = [json.loads(x) for x in open(d / "eval" / "predictions.jsonl")]
  assert len(preds) == 4 * 2 and {p["beam"] for p in preds} == {1, 2}
  assert "95% CI" in open(d / "eval" / "eval.md").read()
  # Recipes are chosen on validation and reported on test: the test split is its own file,
  # and num_examples=0 evaluates all of it.
  assert len(data.split_examples("test")) == 3 and len(data.split_examples("validation")) == 4
  cfg.evaluate.update(dict(split="test", num_examples=0, beam_sizes=(1,)))
  res = evaluate.run({"pretrained": params}, model, data, cfg, str(d / "eval_test"))
  assert res["split"] == "test" and res["num_examples"] == 3
  preds = [json.loads(x) for x in open(d / "eval_test" / "predictions.jsonl")]
  assert len(preds) == 3
  # The long target was cut at tokenization, but ROUGE is scored against the whole reference.
  t = res["truncation"]
  assert t["seen"] == 3 and t["truncated_targets"] >= 1
  long_ref = [p["reference"] for p in preds if p["reference"].startswith("Return the first item of a")]
  assert long_ref and long_ref[0].count("never empty") == 6
  note = f"cut {t['truncated_inputs']} inputs and {t['truncated_targets']} targets"
  assert note in open(d / "eval_test" / "eval.md").read()


def test_synthetic_gold_experiment_from_gguf_with_lora(setup, tmp_path):
  """The gold experiment's ``smollm2`` preset (here on the tiny GGUF): LoRA SFT from the
  pretrained weights, a reward model on the SFT backbone, LoRA policies; every stage after
  training sees plain (merged) params of the pretrained architecture."""
  from slicjax.pipelines import gold_experiment

  d, g = setup
  overrides = {
    "pretrained.init_from": g, "pretrained.instruction": "", "data.name": "jsonl",
    "data.train_path": str(d / "train.jsonl"),
    "data.eval_path": str(d / "eval.jsonl"), "data.test_path": str(d / "test.jsonl"),
    "data.input_len": 48, "data.target_len": 14, "train.steps": 6, "human.policy_steps": 3,
    "human.num_prompts": 8, "human.num_samples": 3, "human.min_gold_gap": 0.0,
    "reward.steps": 4, "reward.eval_every": 2, "reward.batch_size": 4, "rso.num_examples": 4,
    "rso.num_samples": 4, "rso.num_accept": 2, "rso.batch_size": 4, "rso.chunk_size": 4,
    "preference.steps": 2, "preference.batch_size": 4, "experiment.eval_examples": 4,
    "experiment.eval_batch_size": 4, "train.batch_size": 4, "train.progress": False,
    "reward.progress": False, "preference.progress": False, "rso.progress": False,
    "mesh_shape": (2, 2, 2),
  }
  cfg = gold_experiment.experiment_config("smollm2", overrides)
  assert cfg.lora.rank == 8 and cfg.pretrained.init_from == g
  out = gold_experiment.synthetic_gold_experiment(overrides, str(tmp_path), preset="smollm2")
  assert [r["policy"] for r in out["rows"]] == [
    "SFT", "direct/sigmoid_norm", "sft-sample-rank/sigmoid_norm", "rso-sample-rank/sigmoid_norm"]
  assert 0.0 <= out["reward"]["heldout_accuracy"] <= 1.0
  # The SFT and early-snapshot params are plain pretrained-shaped trees; LoRA moved only the
  # targeted attention kernels.
  _, base, _ = common.pretrained(cfg)
  early, _ = checkpoint.load_params(str(tmp_path / "sft" / "early"))
  base, early = _flat(base), _flat(early)
  assert set(early) == set(base)
  moved = {k for k in base if not np.array_equal(base[k], early[k])}
  assert moved and all(any(t in k for t in ("query", "key", "value", "out")) for k in moved)
