"""Table-driven bad-input test: each user mistake raises an error naming the problem and the fix.

The same table is rendered in docs/errors.md (a test checks every entry is documented).
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from slicjax import checkpoint, distributed, optim, scoring, sharding, training
from slicjax.data import iterators
from slicjax.data.builders import jsonl_seq2seq
from slicjax.losses import mle
from slicjax.models.factory import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(preset="tiny", vocab_size=32, max_len=16)


def _tiny():
  model = build_model(TINY)
  return model, model.init(jax.random.PRNGKey(0), input_len=4, target_len=4)


def _write(tmp, name, text):
  p = os.path.join(tmp, name)
  with open(p, "w") as f:
    f.write(text)
  return p


def _mle_run(tmp, **data):
  from slicjax.pipelines import demo, mle

  cfg = demo.build_config("smoke")
  cfg.data.update(data)
  return mle.run(cfg, os.path.join(tmp, "run"))


def _calibrate(tmp, **kw):
  from slicjax.pipelines import calibrate

  cfg = ml_collections.ConfigDict(dict(model=TINY, calibrate=kw))
  return calibrate.calibrate_config(cfg)


def _smoke(**sections):
  """The smoke demo config with ``sections`` merged in (``{"train": {"steps": 0}}``)."""
  from slicjax.pipelines import demo

  cfg = demo.build_config("smoke")
  for name, values in sections.items():
    cfg[name].update(values)
  return cfg


def _pref_config(**pref):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "pref_cfg", os.path.join(ROOT, "experiments", "configs", "preference.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.preference.update(pref)
  return cfg


def _tiny_run(tmp, model=TINY):
  """A workdir holding a one-step checkpoint of ``model`` and its config.json."""
  from slicjax.train_state import TrainState

  run = os.path.join(tmp, "run")
  params = build_model(model).init(jax.random.PRNGKey(0), input_len=4, target_len=4)
  tx, _ = optim.make_optimizer(dict(learning_rate=1e-3), 10)
  ck = checkpoint.Checkpointer(os.path.join(run, "checkpoints"))
  ck.save(1, TrainState.create(params, tx, jax.random.PRNGKey(1)), force=True)
  ck.close()
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump({"model": model}, f)
  return run


def _generate(tmp, **cand):
  from slicjax.pipelines import candidates

  cfg = _smoke(candidates=cand)
  return candidates.generate(cfg, os.path.join(tmp, "cands"))


def _chunks(tmp, *ks):
  from slicjax.pipelines import candidates

  for i, k in enumerate(ks):
    _write(tmp, f"chunk-{i:05d}.jsonl", json.dumps(
      dict(index=i, inputs=[3], targets=[4], candidates=[[5]] * k, logp=[0.0] * k)) + "\n")
  return candidates.read_candidates(tmp)


def _manifest_change(tmp):
  from slicjax.pipelines import candidates

  make = lambda k: candidates.manifest_for(_smoke(candidates=dict(num_candidates=k)),
                                           "candidates", num_items=16, per_item=k, chunk_size=8)
  candidates.check_manifest(tmp, make(3))
  candidates.check_manifest(tmp, make(3))  # the same config resumes
  candidates.check_manifest(tmp, make(5))


def _pairs(same: bool):
  from slicjax.pipelines import preference_pairs

  p = dict(index=7, prompt=[3, 4], chosen=[5, 1], rejected=[5, 1] if same else [6, 1],
           target=[5, 1])
  return preference_pairs.pairs_to_arrays([dict(p, index=1, rejected=[6, 1]), p], 4, 4)


# (id, callable(tmp_path), exception type, regex the message must match)
CASES = [
  ("unknown-model-key", lambda t: build_model(dict(d_modle=8)), ValueError,
   r"unknown transformer config key.*d_modle.*valid keys"),
  ("unknown-model-family", lambda t: build_model(dict(family="rnn")), ValueError,
   r"unknown model family 'rnn'; choose from"),
  ("model-config-wrong-type", lambda t: build_model("tiny"), TypeError,
   r"model config must be a dict"),
  ("heads-not-multiple", lambda t: build_model(dict(num_heads=4, num_kv_heads=3)), ValueError,
   r"multiple of num_kv_heads"),
  ("unknown-dtype", lambda t: build_model(dict(dtype="fp8")), ValueError,
   r"unknown dtype 'fp8'"),
  ("unknown-model-preset", lambda t: build_model(dict(preset="huge")), ValueError,
   r"unknown model preset 'huge'"),
  ("unknown-optimizer-key", lambda t: optim.make_optimizer(dict(learning_rat=1.0), 10),
   ValueError, r"unknown optimizer config key.*learning_rat"),
  ("unknown-optimizer", lambda t: optim.make_optimizer(dict(name="lion"), 10), ValueError,
   r"unknown optimizer 'lion'"),
  ("unknown-schedule", lambda t: optim.make_optimizer(dict(schedule="step"), 10), ValueError,
   r"unknown schedule 'step'"),
  ("mesh-wrong-size", lambda t: sharding.make_mesh((3, 1, 1)), ValueError,
   r"mesh shape \[3, 1, 1\] needs 3 devices but 8 are available"),
  ("mesh-two-wildcards", lambda t: sharding.make_mesh((-1, -1, 1)), ValueError,
   r"at most one entry may be -1"),
  ("sequence-too-long", lambda t: scoring.score_targets(
    *_tiny(), dict(inputs=jnp.ones((1, 12), jnp.int32), targets=jnp.ones((1, 8), jnp.int32))),
   ValueError, r"needs 21 positions but the model's max_len is 16"),
  ("decode-too-long", lambda t: _tiny()[0].decode_state(_tiny()[1], jnp.ones((1, 8), jnp.int32),
                                                        max_len=20),
   ValueError, r"max_len is 16"),
  ("logits-target-mismatch", lambda t: scoring.token_logprobs(jnp.zeros((2, 3, 5)),
                                                              jnp.zeros((2, 4), jnp.int32)),
   ValueError, r"does not match targets shape"),
  ("bad-label-smoothing", lambda t: mle.token_cross_entropy(
    jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), label_smoothing=1.5), ValueError,
   r"label_smoothing must be in \[0, 1\)"),
  ("empty-workdir", lambda t: training.train(state=None, state_shardings=None, train_step=None,
                                             train_iter=None, mesh=None, workdir="",
                                             loop=training.LoopConfig()),
   ValueError, r"workdir is empty; pass --workdir"),
  ("empty-dataset", lambda t: iterators.ArrayBatchIterator([], 4, 8, 8), ValueError,
   r"dataset is empty"),
  ("batch-larger-than-data", lambda t: iterators.ArrayBatchIterator(
    [{"inputs": np.ones(2, np.int32), "targets": np.ones(2, np.int32)}], 4, 8, 8),
   ValueError, r"batch_size 4 exceeds the 1 examples"),
  ("example-longer-than-padding", lambda t: iterators.pad_batch(
    [{"inputs": np.ones(9, np.int32), "targets": np.ones(2, np.int32)}], 8, 8), ValueError,
   r"over the padded lengths"),
  ("jsonl-missing-file", lambda t: jsonl_seq2seq.read_seq2seq_jsonl(os.path.join(t, "no.jsonl")),
   ValueError, r"no such file"),
  ("jsonl-empty-file", lambda t: jsonl_seq2seq.read_seq2seq_jsonl(_write(t, "e.jsonl", "")),
   ValueError, r"the file is empty"),
  ("jsonl-malformed-line", lambda t: jsonl_seq2seq.read_seq2seq_jsonl(
    _write(t, "m.jsonl", '{"input": "a", "target": "b"}\n{"input": "a", "target": \n')),
   ValueError, r"m\.jsonl:2"),
  ("jsonl-missing-field", lambda t: jsonl_seq2seq.read_seq2seq_jsonl(
    _write(t, "f.jsonl", '{"input": "a"}\n')), ValueError, r"f\.jsonl:1.*target"),
  ("unknown-data-key", lambda t: _mle_run(t, inpt_len=3), ValueError,
   r"unknown key\(s\) \['inpt_len'\] in config section 'data'"),
  ("vocab-mismatch", lambda t: _mle_run(t, vocab_size=600), ValueError,
   r"model vocab_size 512 is smaller than the tokenizer's"),
  ("missing-checkpoint", lambda t: checkpoint.load_params(os.path.join(t, "nothing")),
   checkpoint.CheckpointError, r"does not exist; point to the workdir"),
  ("unknown-calibration-loss", lambda t: _calibrate(t, loss="hinge"), ValueError,
   r"calibrate.loss='hinge'; choose from"),
  ("unknown-regularizer", lambda t: _calibrate(t, regularizer="l2"), ValueError,
   r"calibrate.regularizer='l2'; choose from"),
  ("unknown-calibrate-key", lambda t: _calibrate(t, lr=1.0), ValueError,
   r"unknown key\(s\) \['lr'\] in config section 'calibrate'"),
  ("candidates-dir-empty", lambda t: __import__(
    "slicjax.pipelines.candidates", fromlist=["x"]).read_candidates(t), ValueError,
   r"no candidate chunks in .*; run generate_candidates first"),
  ("candidates-malformed", lambda t: (_write(t, "chunk-00000.jsonl", "{not json\n"), __import__(
    "slicjax.pipelines.candidates", fromlist=["x"]).read_candidates(t)), ValueError,
   r"chunk-00000\.jsonl:1: malformed candidate line"),
  ("partial-distributed-flags", lambda t: distributed.initialize("127.0.0.1:1", None, 0),
   ValueError, r"need all of --coordinator_address, --num_processes and --process_id"),
  ("process-id-out-of-range", lambda t: distributed.initialize("127.0.0.1:1", 2, 5), ValueError,
   r"--process_id=5 must be in \[0, 2\)"),
  ("unknown-demo-preset", lambda t: __import__(
    "slicjax.pipelines.demo", fromlist=["x"]).build_config("giant"), ValueError,
   r"unknown demo preset 'giant'"),
  ("unknown-demo-loss", lambda t: __import__("slicjax.pipelines.demo", fromlist=["x"])
   .calibration_losses(__import__("slicjax.pipelines.demo", fromlist=["x"]).build_config(
     "smoke", {"calibrate_losses": "rank,listwise"})), ValueError,
   r"unknown loss \['listwise'\]; choose from \('rank', 'margin', 'list_rank', 'expected_reward'\)"),
  # Checked up front, before data or weights load (issue: reported after 70-110 s before).
  ("jsonl-not-utf8", lambda t: jsonl_seq2seq.read_seq2seq_jsonl(_write_bytes(
    t, "l.jsonl", b'{"input": "a", "target": "b"}\n{"input": "caf\xe9", "target": "b"}\n')),
   ValueError, r"l\.jsonl:2: not UTF-8 \(byte 0xe9 at column 15\); re-encode the file as UTF-8"),
  ("zero-steps", lambda t: __import__(
    "slicjax.pipelines.mle", fromlist=["x"]).run(_smoke(train=dict(steps=0)), t), ValueError,
   r"train\.steps=0 must be an integer >= 1"),
  ("zero-batch-size", lambda t: __import__("slicjax.pipelines.mle", fromlist=["x"]).run(
    _smoke(train=dict(batch_size=0)), t), ValueError, r"train\.batch_size=0 must be an integer"),
  ("nan-learning-rate", lambda t: __import__("slicjax.pipelines.mle", fromlist=["x"]).run(
    _smoke(optimizer=dict(learning_rate=float("nan"))), t), ValueError,
   r"optimizer\.learning_rate=nan must be a finite number in \(0, inf\)"),
  ("negative-weight-decay", lambda t: __import__("slicjax.pipelines.mle", fromlist=["x"]).run(
    _smoke(optimizer=dict(weight_decay=-0.1)), t), ValueError,
   r"optimizer\.weight_decay=-0\.1 must be a finite number in \[0, inf\)"),
  ("workdir-is-file", lambda t: __import__("slicjax.pipelines.mle", fromlist=["x"]).run(
    _smoke(train=dict(steps=1)), _write(t, "afile", "x")), ValueError,
   r"--workdir=.*afile is a file, not a directory"),
  ("workdir-not-writable", lambda t: __import__("slicjax.pipelines.mle", fromlist=["x"]).run(
    _smoke(train=dict(steps=1)), "/proc/slicjax-run"), ValueError,
   r"--workdir=/proc/slicjax-run cannot be written"),
  ("zero-candidates", lambda t: _generate(t, num_candidates=0), ValueError,
   r"candidates\.num_candidates=0 must be an integer >= 1"),
  ("unknown-decoding-method", lambda t: _generate(t, method="nucleus"), ValueError,
   r"candidates\.method='nucleus'; choose from"),
  ("sampling-temperature-zero", lambda t: _generate(t, method="sample", temperature=0.0),
   ValueError, r"candidates\.temperature=0\.0 must be a finite number in \(0, inf\)"),
  ("missing-finetuned-workdir", lambda t: _generate(
    t, finetuned_workdir=os.path.join(t, "nothing")), ValueError,
   r"candidates\.finetuned_workdir=.*nothing does not exist; point it at the workdir"),
  ("workdir-without-checkpoint", lambda t: _generate(t, finetuned_workdir=t), ValueError,
   r"candidates\.finetuned_workdir=.* holds no checkpoint"),
  ("checkpoint-model-mismatch", lambda t: _generate(t, finetuned_workdir=_tiny_run(t)),
   ValueError, r"was trained with another model config; set --config\.model\.max_len=16 "
   r"--config\.model\.vocab_size=32 .*1 parameter\(s\) differ"),
  ("candidates-dir-missing", lambda t: __import__(
    "slicjax.pipelines.calibrate", fromlist=["x"]).run(_smoke(calibrate=dict(
      candidates_dir=os.path.join(t, "none"))), t), ValueError,
   r"calibrate\.candidates_dir=.*none does not exist; run generate_candidates"),
  ("calibrate-beta-zero", lambda t: _calibrate(t, beta=0.0), ValueError,
   r"calibrate\.beta=0\.0 must be a finite number in \(0, inf\)"),
  ("candidates-mixed-k", lambda t: _chunks(t, 2, 3), ValueError,
   r"mixes candidate sets of different sizes K=\[2, 3\]"),
  ("candidates-config-changed", _manifest_change, ValueError,
   r"holds chunks written with another config \(candidates\.num_candidates: 3 -> 5"),
  ("preference-beta-zero", lambda t: __import__(
    "slicjax.pipelines.preference", fromlist=["x"]).train_preference(_pref_config(beta=0.0), t),
   ValueError, r"preference\.beta=0\.0 must be a finite number in \(0, inf\)"),
  ("preference-pairs-missing", lambda t: __import__(
    "slicjax.pipelines.preference", fromlist=["x"]).train_preference(_pref_config(
      pairs=os.path.join(t, "p.jsonl"), sft_workdir=""), t), ValueError,
   r"preference\.pairs=.*p\.jsonl' does not exist"),
  ("chosen-equals-rejected", lambda t: _pairs(same=True), ValueError,
   r"1 of 2 preference pair\(s\) have chosen == rejected \(first: pair 1, prompt index 7\)"),
  ("rso-beta-nan", lambda t: __import__("slicjax.pipelines.rso", fromlist=["x"]).rso_config(
    ml_collections.ConfigDict(dict(rso=dict(beta=float("nan"))))), ValueError,
   r"rso\.beta=nan must be a finite number"),
  ("candidates-partial", lambda t: (_chunks(t, 2, 2), _write(t, "manifest.json", json.dumps(
    dict(num_examples=4))), __import__("slicjax.pipelines.candidates", fromlist=["x"])
    .check_complete(t, _chunks(t, 2, 2))), ValueError,
   r"holds 2 of the 4 examples .* set calibrate\.allow_partial_candidates=True"),
  ("diffusion-kl-regularizer", lambda t: (_chunks(t, 2), __import__(
    "slicjax.pipelines.calibrate", fromlist=["x"]).run(_smoke(
      model=dict(family="diffusion"), calibrate=dict(candidates_dir=t, regularizer="kl")),
      os.path.join(t, "cal"))), ValueError,
   r"calibrate\.regularizer='kl' needs per-token logits.*use regularizer=ce"),
  ("eval-beam-size-zero", lambda t: __import__("slicjax.pipelines.evaluate", fromlist=["x"])
   .validate(_smoke(evaluate=dict(beam_sizes=(1, 0))), {}), ValueError,
   r"evaluate\.beam_sizes\[\.\.\.\]=0 must be an integer >= 1"),
  ("eval-unknown-confidence-score", lambda t: __import__("slicjax.pipelines.evaluate",
   fromlist=["x"]).validate(_smoke(evaluate=dict(selective_scores=("logp", "entropy"))), {}),
   ValueError, r"selective_scores=\('logp', 'entropy'\): unknown score \['entropy'\]; choose "
   r"from \('logp', 'logp_norm', 'self_eval', 'multi_choice'\)"),
  ("selective-curve-length-mismatch", lambda t: __import__(
    "slicjax.evaluation.selective", fromlist=["x"]).curve_area([0.1, 0.2, 0.3], [1.0, 0.0]),
   ValueError, r"3 confidence scores for 2 quality values; give one of each per output"),
  ("eval-model-workdir-missing", lambda t: __import__("slicjax.pipelines.evaluate",
   fromlist=["x"]).validate(_smoke(), {"calibrated": os.path.join(t, "cal")}), ValueError,
   r"--model_workdirs calibrated=<?.*cal does not exist"),
  ("lora-on-scanned-layers", lambda t: __import__("slicjax.peft", fromlist=["x"]).add_lora(
    build_model(dict(TINY, scan_layers=True)), build_model(dict(TINY, scan_layers=True)).init(
      jax.random.PRNGKey(0), input_len=4, target_len=4), rank=2, targets="up|down",
    rng=jax.random.PRNGKey(1)),
   ValueError, r"scanned layer stack .* unstack them with .*unstack_layer_params"),
  ("nan-reward", lambda t: __import__("slicjax.pipelines.rso", fromlist=["x"]).check_rewards(
    np.array([[0.1, np.nan, 0.3]]), np.array([[True, True, True]]), [5], "model"),
   ValueError, r"1 non-finite reward\(s\) \(first: nan for sample 1 of prompt 5\)"),
  ("reward-early-stopping-without-heldout", lambda t: __import__(
    "slicjax.pipelines.reward", fromlist=["x"]).reward_config(ml_collections.ConfigDict(dict(
      reward=dict(eval_every=20, eval_fraction=0.0)))), ValueError,
   r"reward\.eval_every > 0 selects the step on held-out pairs, but reward\.eval_fraction is 0"),
  ("experiment-set-without-key", lambda t: __import__("slicjax.cli", fromlist=["x"])
   .parse_overrides(["steps=3"]), ValueError, r"--set='steps=3': expected section\.key=value"),
]


def _write_bytes(tmp, name, data: bytes):
  p = os.path.join(tmp, name)
  with open(p, "wb") as f:
    f.write(data)
  return p


def test_valid_pairs_and_chunks_pass(tmp_path):
  """The checks above do not fire on good input."""
  assert _pairs(same=False)["chosen"].shape == (2, 4)
  assert len(_chunks(str(tmp_path), 2, 2)) == 2


# What went wrong, in the user's words: the second column of docs/errors.md.
DESCRIPTIONS = {
  'unknown-model-key': 'a typo in the model config',
  'unknown-model-family': '`model.family` is not transformer/ssm/diffusion',
  'model-config-wrong-type': 'the model config is a string, list, ...',
  'heads-not-multiple': '`num_heads` not a multiple of `num_kv_heads`',
  'unknown-dtype': '`dtype`/`param_dtype` is not float32/bfloat16/float16',
  'unknown-model-preset': '`model.preset` names no preset',
  'unknown-optimizer-key': 'a typo in the optimizer config',
  'unknown-optimizer': '`optimizer.name` not adamw/adafactor/sgd',
  'unknown-schedule': '`optimizer.schedule` not cosine/linear/rsqrt/constant',
  'mesh-wrong-size': '`mesh_shape` does not multiply to the device count',
  'mesh-two-wildcards': 'more than one -1 in `mesh_shape`',
  'sequence-too-long': "a batch is longer than the model's `max_len`",
  'decode-too-long': 'prompt + decode length exceeds `max_len`',
  'logits-target-mismatch': 'scoring logits and targets disagree in shape',
  'bad-label-smoothing': '`train.label_smoothing` outside [0, 1)',
  'empty-workdir': 'no `--workdir`',
  'empty-dataset': 'a split with no examples',
  'batch-larger-than-data': 'batch size larger than the dataset',
  'example-longer-than-padding': 'an example longer than the padded lengths',
  'jsonl-missing-file': 'a jsonl path that does not exist',
  'jsonl-empty-file': 'an empty jsonl file',
  'jsonl-malformed-line': 'a line that is not JSON',
  'jsonl-missing-field': 'a record without the input/target field',
  'unknown-data-key': 'a typo in the data config',
  'vocab-mismatch': "the tokenizer has more ids than the model's embedding",
  'missing-checkpoint': 'loading from a directory with no checkpoints',
  'unknown-calibration-loss': '`calibrate.loss` not rank/margin/list_rank/expected_reward',
  'unknown-regularizer': '`calibrate.regularizer` not ce/kl/kl_topk/none',
  'unknown-calibrate-key': 'a typo in the calibrate config',
  'candidates-dir-empty': 'calibrating from a directory with no candidates',
  'candidates-malformed': 'a damaged candidate chunk',
  'partial-distributed-flags': 'some but not all multi-process flags',
  'process-id-out-of-range': '`--process_id` outside `[0, num_processes)`',
  'unknown-demo-preset': '`--preset` of the demo not listed',
  'unknown-demo-loss': '`--losses` of the demo names a loss that does not exist',
  'jsonl-not-utf8': 'a jsonl file that is not UTF-8 (e.g. Latin-1)',
  'zero-steps': '`train.steps=0` (would save untrained weights)',
  'zero-batch-size': 'a batch size below 1',
  'nan-learning-rate': '`optimizer.learning_rate` NaN or <= 0',
  'negative-weight-decay': 'a negative `optimizer.weight_decay`',
  'workdir-is-file': '`--workdir` names an existing file',
  'workdir-not-writable': '`--workdir` cannot be created or written',
  'zero-candidates': '`candidates.num_candidates` (the beam size) below 1',
  'unknown-decoding-method': '`candidates.method` names no decoding method',
  'sampling-temperature-zero': 'sampling with temperature <= 0',
  'missing-finetuned-workdir': "the fine-tuned run's workdir does not exist",
  'workdir-without-checkpoint': "the fine-tuned run's workdir holds no checkpoint",
  'checkpoint-model-mismatch': 'a checkpoint trained with another `model` config',
  'candidates-dir-missing': 'calibrating from a candidate directory that does not exist',
  'calibrate-beta-zero': '`calibrate.beta` <= 0',
  'candidates-mixed-k': 'a candidate directory with chunks of two different K',
  'candidates-config-changed': 'generating into a directory written with another config',
  'preference-beta-zero': '`preference.beta=0` (every preference loss constant)',
  'preference-pairs-missing': '`preference.pairs` does not exist',
  'chosen-equals-rejected': 'preference pairs whose chosen and rejected are identical',
  'rso-beta-nan': '`rso.beta` NaN or <= 0',
  'candidates-partial': 'calibrating on a candidate set whose generation stopped part-way',
  'diffusion-kl-regularizer': 'a KL regularizer on a diffusion model (no per-token logits)',
  'eval-beam-size-zero': 'a beam size below 1 in `evaluate.beam_sizes`',
  'eval-unknown-confidence-score': 'an unknown confidence score in `evaluate.selective_scores`',
  'selective-curve-length-mismatch': 'selective metrics given unequal score and quality lists',
  'eval-model-workdir-missing': 'evaluating a model workdir that does not exist',
  'lora-on-scanned-layers': 'LoRA on a `scan_layers=True` model (stacked per-layer kernels)',
  'nan-reward': 'a reward model that returns NaN/inf',
  'reward-early-stopping-without-heldout': '`reward.eval_every` > 0 with no held-out prompts',
  'experiment-set-without-key': '`--set` given without a `section.key=` name',
}

DOC = os.path.join(ROOT, "docs", "errors.md")
_MESSAGES: dict[str, str] = {}  # id -> documented form of the message, filled by the cases


def doc_message(exc: BaseException, tmp: str) -> str:
  """The message as docs/errors.md shows it: temp paths as <tmp>, one line, at most 360
  characters, table-safe."""
  text = f"{type(exc).__name__}: {exc}".replace(os.path.realpath(tmp), "<tmp>").replace(tmp, "<tmp>")
  text = " ".join(text.split()).replace("|", "\\|")
  return text if len(text) <= 360 else text[:359] + "…"


def _doc_rows() -> dict[str, tuple[str, str]]:
  rows = {}
  for line in open(DOC).read().splitlines():
    m = re.match(r"^\| `([a-z0-9-]+)` \| (.*) \| `(.*)` \|$", line)
    if m:
      rows[m.group(1)] = (m.group(2), m.group(3))
  return rows


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case, tmp_path):
  name, fn, exc, pattern = case
  with pytest.raises(exc) as info:
    fn(str(tmp_path))
  assert re.search(pattern, str(info.value), re.S), f"{name}: {info.value}"
  shown = doc_message(info.value, str(tmp_path))
  _MESSAGES[name] = shown
  if not os.environ.get("SLICJAX_WRITE_ERRORS_DOC"):
    documented = _doc_rows().get(name, (None, None))[1]
    assert documented == shown, (
      f"docs/errors.md row for {name!r} does not show the message the code prints; "
      "regenerate it: SLICJAX_WRITE_ERRORS_DOC=1 pytest -n 0 tests/test_bad_input.py"
    )


def test_table_has_40_kinds_each_described_and_documented_once():
  """Runs after the cases (file order). With SLICJAX_WRITE_ERRORS_DOC=1 it rewrites the
  table of docs/errors.md from the messages the cases produced."""
  ids = [c[0] for c in CASES]
  assert len(ids) >= 40 and len(set(ids)) == len(ids)
  assert set(DESCRIPTIONS) == set(ids), set(DESCRIPTIONS) ^ set(ids)
  if os.environ.get("SLICJAX_WRITE_ERRORS_DOC"):
    assert set(_MESSAGES) == set(ids), "run every case (-n 0, no -k) to write the doc"
    text = open(DOC).read()
    head, rest = text.split("| id |", 1)
    tail = rest.split("\n\n", 1)[1]
    table = ["| id | what went wrong | error (as printed) |", "|---|---|---|"] + [
      f"| `{i}` | {DESCRIPTIONS[i]} | `{_MESSAGES[i]}` |" for i in ids
    ]
    with open(DOC, "w") as f:
      f.write(head + "\n".join(table) + "\n\n" + tail)
  assert list(_doc_rows()) == ids, "docs/errors.md lists other ids or another order"
