"""Speculative drafts in the pipelines: same candidates as decoding without a draft."""

import jax
import ml_collections
import numpy as np
import pytest

from slicjax.models.factory import build_model
from slicjax.pipelines import candidates, drafts, rso, tasks


def _config(**cand):
  c = ml_collections.ConfigDict()
  c.model = dict(preset="tiny", vocab_size=40, max_len=64)
  c.data = {**tasks.DATA_KEYS, "name": "reverse", "synthetic_vocab": 32, "input_len": 12,
            "target_len": 12, "num_train": 16, "num_eval": 8}
  c.candidates = {**candidates.CANDIDATE_KEYS, "method": "greedy", "num_candidates": 1,
                  "num_examples": 8, "batch_size": 4, "chunk_size": 8, "similarity": "none",
                  "progress": False, **cand}
  return ml_collections.ConfigDict(c.to_dict())


def test_greedy_candidates_with_a_layer_skip_draft_equal_plain_greedy(tmp_path):
  model = build_model(_config().model.to_dict())
  params = model.init(jax.random.PRNGKey(3), input_len=12, target_len=12)
  data = tasks.load(_config(), batch_size=4)
  rows = {}
  for draft in ("none", "layer_skip:1"):
    out = candidates.generate(_config(draft=draft, num_draft=3), str(tmp_path / draft),
                              params=params, model=model, data=data)
    rows[draft] = candidates.read_candidates(out)
  assert len(rows["none"]) == 8
  for a, b in zip(rows["none"], rows["layer_skip:1"]):
    assert a["candidates"] == b["candidates"]
    np.testing.assert_allclose(a["logp"], b["logp"], atol=1e-4)


def test_rso_samples_through_a_draft():
  model = build_model(_config().model.to_dict())
  params = model.init(jax.random.PRNGKey(3), input_len=12, target_len=12)
  data = tasks.load(_config(), batch_size=4)
  c = {**rso.RSO_KEYS, "draft": "layer_skip:1", "num_draft": 2, "temperature": 1.0}
  draft = drafts.load(c["draft"], model, params, "rso")
  inputs = np.stack([np.pad(e["inputs"], (0, 12 - len(e["inputs"]))) for e in
                     data.train_examples[:4]]).astype(np.int32)
  cands = rso.sample_completions(c, model, params, data, inputs, np.arange(4), 3, draft)
  assert cands.shape == (4, 3, 12) and (cands < 40).all() and (cands != 0).any()


@pytest.mark.parametrize("cand,pattern", [
  (dict(method="beam", draft="layer_skip:1"), r"speeds up greedy decoding and sampling"),
  (dict(draft="layer_skip:x"), r"write layer_skip:N with N an integer"),
  (dict(draft="/nonexistent/draft"), r"candidates\.draft='/nonexistent/draft' does not exist"),
  (dict(draft="layer_skip:1", num_draft=0), r"candidates\.num_draft=0 must be an integer >= 1"),
])
def test_draft_config_errors(cand, pattern):
  with pytest.raises(ValueError, match=pattern):
    candidates.candidate_config(_config(**cand))


def test_distilled_draft_from_greedy_outputs_then_speculative_candidates(tmp_path):
  """The draft recipe: the target's greedy outputs -> an MLE run of a 1-layer model on them
  (data.distill_from) -> that workdir as candidates.draft: the same candidates as without."""
  from slicjax import optim
  from slicjax.pipelines import mle

  target = build_model(_config().model.to_dict())
  params = target.init(jax.random.PRNGKey(3), input_len=12, target_len=12)
  data = tasks.load(_config(), batch_size=4)
  cfg = _config(split="train", num_examples=16)
  outs = candidates.generate(cfg, str(tmp_path / "greedy"), params=params, model=target,
                             data=data)
  distilled = tasks.distilled(data, outs)
  assert len(distilled.train_examples) == 16
  first = candidates.read_candidates(outs)[0]
  np.testing.assert_array_equal(distilled.train_examples[0]["targets"], first["candidates"][0])
  d = ml_collections.ConfigDict(_config().to_dict())
  d.model = dict(preset="tiny", num_layers=1, vocab_size=40, max_len=64)
  d.data.distill_from = outs
  d.optimizer = {**optim.DEFAULTS, "learning_rate": 3e-3}
  d.train = {**mle.TRAIN_KEYS, "steps": 30, "batch_size": 8, "progress": False,
             "checkpoint_every": 30}
  d.mesh_shape = (-1, 1, 1)
  mle.run(ml_collections.ConfigDict(d.to_dict()), str(tmp_path / "draft"))
  plain = candidates.read_candidates(outs)
  spec = candidates.generate(_config(split="train", num_examples=16, draft=str(tmp_path / "draft"),
                                     num_draft=2),
                             str(tmp_path / "spec"), params=params, model=target, data=data)
  for a, b in zip(plain, candidates.read_candidates(spec)):
    assert a["candidates"] == b["candidates"]
  # The distilled draft agrees with the target more often than an untrained one of its size.
  from slicjax.decoding import api
  from slicjax.interop import pretrained

  inputs = np.stack([np.pad(r["inputs"], (0, 12 - len(r["inputs"]))) for r in plain])
  drafted = pretrained.load_pretrained(str(tmp_path / "draft"), max_len=64)[:2]
  untrained = build_model(d.model.to_dict())
  rates = []
  for draft in (drafted, (untrained, untrained.init(jax.random.PRNGKey(9), input_len=12,
                                                     target_len=12))):
    res = api.decode(target, params, inputs.astype(np.int32), method="speculative",
                     draft=draft, num_draft=2, max_len=12)
    rates.append(float(res.stats.acceptance_rate))
  assert rates[0] > rates[1] + 0.2, rates
