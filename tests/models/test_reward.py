"""Reward models: Bradley-Terry loss, the pointwise head's read-out position, the pairwise ranker's
input layout and order flips, and both models learning a toy preference (train_reward)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.test_util import check_grads

from slicjax.models import reward
from slicjax.models.factory import build_model
from slicjax.pipelines import preference_pairs, tasks
from slicjax.pipelines import reward as reward_lib

VOCAB = 12  # task ids 4..11; the ranker's reserved ids are 12..16
MODEL = dict(
  preset="tiny",
  vocab_size=VOCAB + 5,
  max_len=32,
  d_model=32,
  d_ff=64,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
)
S, L = 4, 6
GOOD = 5  # the toy reward counts this token


def test_bradley_terry_loss_hand_values_and_gradient():
  rw, rl = jnp.array([1.0, -0.5]), jnp.array([0.2, 0.5])
  # -log sigmoid(0.8) = log(1 + e^-0.8); -log sigmoid(-1) = log(1 + e).
  expected = [np.log1p(np.exp(-0.8)), np.log1p(np.e)]
  np.testing.assert_allclose(reward.bradley_terry_loss(rw, rl), expected, rtol=1e-6)
  check_grads(lambda a, b: reward.bradley_terry_loss(a, b).sum(), (rw, rl), order=2, modes=["rev"])
  with pytest.raises(ValueError, match="same shape"):
    reward.bradley_terry_loss(rw, rl[:1])


def test_pointwise_reward_reads_the_state_predicting_eos():
  net = reward.RewardModel(build_model(MODEL))
  params = net.init(jax.random.PRNGKey(0), input_len=S, target_len=L)
  inputs = jnp.array([[5, 6, 7, 0], [8, 0, 0, 0]])
  targets = jnp.array([[9, 10, 1, 0, 0, 0], [4, 5, 6, 7, 1, 0]])
  # Independently: the LM on inputs + [BOS] + targets, read at the position holding the last
  # content token (its output predicts EOS).
  seqs = jnp.array([[5, 6, 7, 2, 9, 10, 1], [8, 2, 4, 5, 6, 7, 1]])

  @jax.jit
  def run(params):
    r = net.rewards(params, {"inputs": inputs, "targets": targets})
    longer = net.rewards(params, {"inputs": inputs, "targets": jnp.pad(targets, ((0, 0), (0, 3)))})
    other = net.rewards(params, {"inputs": inputs, "targets": targets.at[0, 1].set(4)})
    _, h = net.backbone.module.apply({"params": params["backbone"]}, seqs, return_hidden=True)
    return r, longer, other, h[:, 5]

  r, longer, other, h_BxD = run(params)
  head = params["head"]["dense"]
  np.testing.assert_allclose(
    r, h_BxD @ head["kernel"][:, 0] + head["bias"][0], rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(longer, r, rtol=1e-5, atol=1e-6)  # extra padding changes nothing
  assert abs(float(other[0] - r[0])) > 1e-6 and abs(float(other[1] - r[1])) < 1e-6
  # A reward model built on given (e.g. SFT) backbone params keeps them and adds a fresh head.
  p2 = net.params_from_backbone(
    params["backbone"], jax.random.PRNGKey(9), input_len=S, target_len=L
  )
  assert p2["backbone"] is params["backbone"]
  assert jax.tree.map(jnp.shape, p2["head"]) == jax.tree.map(jnp.shape, params["head"])


def test_concat_segments_matches_python():
  rng = np.random.default_rng(0)
  segs, rows = [], []
  for width in (3, 5, 2):
    lens = rng.integers(0, width + 1, size=4)
    seg = np.zeros((4, width), np.int32)
    for i, n in enumerate(lens):
      seg[i, :n] = rng.integers(4, 12, size=n)
    segs.append(seg)
  got = np.asarray(reward.concat_segments([jnp.asarray(s) for s in segs]))
  for i in range(4):
    rows = [t for s in segs for t in s[i] if t != 0]
    np.testing.assert_array_equal(got[i, : len(rows)], rows)
    assert not got[i, len(rows) :].any()
  assert got.shape == (4, 10)


class _CharTokenizer:
  """Maps characters to ids 4.. (enough to build a PairFormat)."""

  def encode(self, text):
    return [4 + (ord(ch) % 50) for ch in text]


def test_pair_format_reserved_and_from_tokenizer_and_layout():
  fmt = reward.PairFormat.reserved(VOCAB)
  assert (fmt.context_ids, fmt.summary_a_ids, fmt.summary_b_ids) == ((12,), (13,), (14,))
  assert (fmt.label_a, fmt.label_b, fmt.min_vocab_size) == (15, 16, 17)
  assert fmt.input_len(S, L) == 3 + S + 2 * L
  tok_fmt = reward.PairFormat.from_tokenizer(_CharTokenizer())
  assert tok_fmt.context_ids == tuple(_CharTokenizer().encode("[CONTEXT] "))
  assert tok_fmt.label_a == 4 + ord("A") % 50 and tok_fmt.label_b == 4 + ord("B") % 50
  assert reward.PairFormat.from_dict(fmt.to_dict()) == fmt
  with pytest.raises(ValueError, match="vocab_size >= 17"):
    reward.PairwiseRanker(build_model(dict(MODEL, vocab_size=VOCAB)), fmt)
  ranker = reward.PairwiseRanker(build_model(MODEL), fmt)
  x = jnp.array([[5, 6, 0, 0]])
  a = jnp.array([[7, 8, 1, 0, 0, 0]])
  b = jnp.array([[9, 1, 4, 4, 0, 0]])  # tokens after EOS are not part of the completion
  got = ranker.build_inputs(x, a, b)
  np.testing.assert_array_equal(got[0, :8], [12, 5, 6, 13, 7, 8, 14, 9])
  assert not np.asarray(got[0, 8:]).any()


def test_flip_order_and_ranker_loss_use_the_flipped_labels():
  ranker = reward.PairwiseRanker(build_model(MODEL), reward.PairFormat.reserved(VOCAB))
  params = ranker.init(jax.random.PRNGKey(1), input_len=3 + S + 2 * L)
  n = 256
  chosen = jnp.tile(jnp.array([[4, 5, 1, 0, 0, 0]]), (n, 1))
  rejected = jnp.tile(jnp.array([[6, 1, 0, 0, 0, 0]]), (n, 1))
  a, b, a_is_chosen = reward.flip_order(jax.random.PRNGKey(3), chosen, rejected)
  frac = float(jnp.mean(a_is_chosen))
  assert 0.4 < frac < 0.6  # 256 fair coins
  np.testing.assert_array_equal(a, jnp.where(a_is_chosen[:, None], chosen, rejected))
  np.testing.assert_array_equal(b, jnp.where(a_is_chosen[:, None], rejected, chosen))
  batch = {
    "inputs": jnp.tile(jnp.array([[7, 8, 0, 0]]), (8, 1)),
    "chosen": chosen[:8],
    "rejected": rejected[:8],
  }

  @jax.jit
  def run(params, rng):
    loss, m = ranker.pair_loss(params, batch, rng)
    # Independently: -log P([label, EOS]) of the flipped input, label A where A is the chosen.
    k_flip, _ = jax.random.split(rng)
    a, b, flips = reward.flip_order(k_flip, batch["chosen"], batch["rejected"])
    logits, _ = ranker.model.target_logits(
      params,
      {"inputs": ranker.build_inputs(batch["inputs"], a, b), "targets": ranker.targets(flips)},
    )
    logp = jax.nn.log_softmax(logits, -1)
    label = jnp.where(flips, 15, 16)
    return loss, m["a_is_chosen"], flips, -(logp[jnp.arange(8), 0, label] + logp[:, 1, 1])

  losses, flips, want_flips, want = run(params, jax.random.PRNGKey(5))
  np.testing.assert_array_equal(flips.astype(bool), want_flips)
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  other = run(params, jax.random.PRNGKey(6))
  assert not np.array_equal(other[1], flips)  # each step draws new flips


def _toy_pairs(n_prompts, seed):
  """Two random completions per prompt; the one with more GOOD tokens is chosen."""
  rng = np.random.default_rng(seed)
  pairs = []
  while len(pairs) < n_prompts:
    x = rng.integers(4, VOCAB, size=rng.integers(2, S + 1)).tolist()
    ys = [rng.integers(4, VOCAB, size=rng.integers(2, L)).tolist() for _ in range(2)]
    ys = [y + [1] for y in ys]
    c0, c1 = (y.count(GOOD) for y in ys)
    if c0 == c1:
      continue
    w, lose = (ys[0], ys[1]) if c0 > c1 else (ys[1], ys[0])
    pairs.append(
      dict(
        index=len(pairs),
        prompt=x,
        chosen=w,
        rejected=lose,
        target=w,
        source="direct",
        ref_chosen_logp=None,
        ref_rejected_logp=None,
      )
    )
  return pairs


def _config(kind, steps):
  c = ml_collections.ConfigDict()
  c.model = dict(family="transformer", **MODEL)
  c.data = dict(
    name="reverse", synthetic_vocab=VOCAB, input_len=S, target_len=L, num_train=8, num_eval=8
  )
  c.reward = dict(
    kind=kind, steps=steps, batch_size=16, eval_fraction=0.25, log_every=10, progress=False
  )
  c.reward_optimizer = dict(learning_rate=3e-3, warmup_steps=5, schedule="constant")
  c.mesh_shape = (-1, 1, 1)
  return c


@pytest.fixture(scope="module")
def toy():
  cfg = _config("pointwise", 1)
  return tasks.load(cfg, batch_size=16), _toy_pairs(400, seed=0)


def test_pointwise_reward_model_learns_token_count(toy, tmp_path):
  data, pairs = toy
  loaded, report = reward_lib.train_reward(
    _config("pointwise", 150), str(tmp_path), data=data, pairs=pairs
  )
  assert report["heldout_pairs"] == 100 and report["train_pairs"] == 300
  assert report["heldout_accuracy"] > 0.8, report
  # Reloaded from the workdir, the model gives the same rewards.
  again = reward_lib.load_reward(str(tmp_path))
  x = jnp.array([[5, 6, 0, 0]] * 2)
  ys = jnp.array([[[GOOD, GOOD, GOOD, 1, 0, 0], [7, 8, 9, 1, 0, 0]]] * 2)
  np.testing.assert_allclose(
    again.candidate_rewards(x, ys), loaded.candidate_rewards(x, ys), rtol=1e-5
  )
  r = loaded.candidate_rewards(x, ys)
  assert r[0, 0] > r[0, 1]  # three GOOD tokens beat none


def test_ranker_learns_and_is_flip_consistent(toy, tmp_path):
  data, pairs = toy
  loaded, report = reward_lib.train_reward(
    _config("ranker", 150), str(tmp_path), data=data, pairs=pairs
  )
  assert report["heldout_accuracy"] > 0.75, report
  _, held = reward_lib.split_pairs(pairs, 0.25, seed=0)  # the split train_reward used
  arr = preference_pairs.pairs_to_arrays(held, S, L)
  net, params = loaded.net, loaded.params
  prob_a = jax.jit(net.prob_a)
  p_ab = np.asarray(prob_a(params, arr["inputs"], arr["chosen"], arr["rejected"]))
  p_ba = np.asarray(prob_a(params, arr["inputs"], arr["rejected"], arr["chosen"]))
  # Trained with random order flips: P(A | a, b) ≈ 1 − P(A | b, a).
  assert np.mean(np.abs(p_ab - (1.0 - p_ba))) < 0.15
  # Pointwise reward from the ranker against a baseline: logit ρ(x, y, y_b).
  r = jax.jit(net.reward)(params, arr["inputs"], arr["chosen"], arr["rejected"])
  np.testing.assert_allclose(jax.nn.sigmoid(r), p_ab, rtol=1e-4, atol=1e-5)


def test_early_stopping_keeps_the_best_step_on_the_selection_half(toy, tmp_path):
  data, pairs = toy
  cfg = _config("pointwise", 60)
  cfg.reward.eval_every = 20
  loaded, report = reward_lib.train_reward(cfg, str(tmp_path), data=data, pairs=pairs)
  # 100 held-out prompts: 50 select the step, the other 50 are reported.
  assert report["select_pairs"] == 50 and report["heldout_pairs"] == 50, report
  best = json.load(open(tmp_path / "best" / "best.json"))
  assert report["selected_step"] == best["step"] and best["step"] in (20, 40, 60)
  # The step kept is the best selection accuracy among the evaluated ones.
  evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  sel = {e["step"]: e["select_accuracy"] for e in evals if "select_accuracy" in e}
  assert sorted(sel) == [20, 40, 60]
  assert sel[best["step"]] == max(sel.values()) and 1.0 - best["value"] == pytest.approx(
    sel[best["step"]]
  )
  # The reloaded reward is the kept step's, and the report carries a bootstrap interval.
  again = reward_lib.load_reward(str(tmp_path))
  x = jnp.array([[5, 6, 0, 0]] * 2)
  ys = jnp.array([[[GOOD, GOOD, GOOD, 1, 0, 0], [7, 8, 9, 1, 0, 0]]] * 2)
  np.testing.assert_allclose(
    again.candidate_rewards(x, ys), loaded.candidate_rewards(x, ys), rtol=1e-5
  )
  lo, hi = report["heldout_accuracy_ci95"]
  assert lo <= report["heldout_accuracy"] <= hi


def test_heldout_report_hand_values():
  # Four pairs: correct = 1, 0, 1, 1; gold differences +0.2, −0.1 (a noisy label), 0 (tie), +0.3.
  pairs = [
    dict(chosen_reward=0.5, rejected_reward=0.3),
    dict(chosen_reward=0.2, rejected_reward=0.3),
    dict(chosen_reward=0.4, rejected_reward=0.4),
    dict(chosen_reward=0.6, rejected_reward=0.3),
  ]
  r = reward_lib.heldout_report([1.0, 0.0, 1.0, 1.0], pairs)
  assert r["heldout_accuracy"] == pytest.approx(0.75)
  # The gold reward agrees with 2 labels, disagrees with 1, ties 1 (counts one half): 2.5 / 4.
  assert r["gold_label_accuracy"] == pytest.approx(0.625)
  # Against the gold order (tie left out): pair 1 agrees, pair 2 the network preferred the
  # label's rejected = the gold-better one (agrees), pair 4 agrees: 3 / 3.
  assert r["gold_order_pairs"] == 3 and r["gold_order_accuracy"] == pytest.approx(1.0)
  # Without gold rewards only the accuracy and its interval are reported.
  r = reward_lib.heldout_report([1.0, 0.0], [{}, {}])
  assert "gold_order_accuracy" not in r and r["heldout_accuracy"] == pytest.approx(0.5)
