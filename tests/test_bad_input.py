"""Table-driven bad-input test: each user mistake raises an error naming the problem and the fix.

The same table is rendered in docs/errors.md (a test checks every entry is documented).
"""

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
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case, tmp_path):
  name, fn, exc, pattern = case
  with pytest.raises(exc) as info:
    fn(str(tmp_path))
  assert re.search(pattern, str(info.value), re.S), f"{name}: {info.value}"


def test_table_has_at_least_20_kinds_and_docs_list_them():
  assert len(CASES) >= 20
  doc = open(os.path.join(ROOT, "docs", "errors.md")).read()
  missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
  assert not missing, f"docs/errors.md does not document {missing}"
