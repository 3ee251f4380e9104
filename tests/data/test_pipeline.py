"""Pipeline: padding, truncation counts, packing at the data level, shuffling, resume, sharding."""

import collections
import json
import logging

import numpy as np
import pytest

from slicjax.data import pipeline as pl

EOS = 1


def token_records(n, seed=0, max_in=6, max_tgt=4):
  """Example i: inputs start with 100 + i, targets start with 1000 + i and end with EOS."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = int(rng.integers(1, max_in + 1)), int(rng.integers(1, max_tgt + 1))
    inputs = np.concatenate([[100 + i], rng.integers(4, 50, size=a - 1)]).astype(np.int32)
    targets = np.concatenate([[1000 + i], rng.integers(4, 50, size=b - 1), [EOS]]).astype(np.int32)
    out.append({"inputs": inputs, "targets": targets})
  return out


def ids_of(batch):
  """Example ids of the non-empty rows of a padded batch (from the targets' first token)."""
  return [int(t) - 1000 for t in batch["targets"][:, 0] if t != 0]


class CharTokenizer:
  """Deterministic stand-in: one token per character (id 4 + code point mod 90)."""

  def encode(self, text):
    return [4 + ord(c) % 90 for c in text]


def take(it, n):
  return [next(it) for _ in range(n)]


def test_padded_eval_pass_layout_in_order():
  recs = token_records(10)
  batches = pl.make_eval_batches(recs, batch_size=4, input_len=6, target_len=5, shard_count=1,
                                 shard_index=0)  # fmt: skip
  assert len(batches) == 3
  for b in batches:
    assert set(b) == {"inputs", "targets"}
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (4, 6)
    assert b["targets"].dtype == np.int32 and b["targets"].shape == (4, 5)
  rows = [(b, r) for b in batches for r in range(4)]
  for i, (b, r) in enumerate(rows):
    if i < 10:
      x, y = recs[i]["inputs"], recs[i]["targets"]
      np.testing.assert_array_equal(b["inputs"][r], np.pad(x, (0, 6 - len(x))))
      np.testing.assert_array_equal(b["targets"][r], np.pad(y, (0, 5 - len(y))))
    else:  # the last batch is padded with all-zero rows
      assert not b["inputs"][r].any() and not b["targets"][r].any()


def test_text_records_tokenized_with_eos_and_truncation_count(caplog):
  recs = [
    {"input": "abc", "target": "xy"},  # fits
    {"input": "abcdefgh", "target": "x"},  # input too long (8 > 5)
    {"input": b"ab", "target": "uvwxyz"},  # target too long (6 + EOS > 4), bytes input
    {"input": "abcdefg", "target": "uvwxyz"},  # both
    {"input": "", "target": ""},  # empty: targets = [EOS]
  ]
  tok = CharTokenizer()
  enc = lambda s: [4 + ord(c) % 90 for c in s]
  with caplog.at_level(logging.INFO):
    batches = pl.make_eval_batches(recs, tok, batch_size=5, input_len=5, target_len=4,
                                   shard_index=0, shard_count=1)  # fmt: skip
  (b,) = batches
  np.testing.assert_array_equal(b["inputs"][0], enc("abc") + [0, 0])
  np.testing.assert_array_equal(b["targets"][0], enc("xy") + [EOS, 0])
  np.testing.assert_array_equal(b["inputs"][1], enc("abcde"))
  np.testing.assert_array_equal(b["inputs"][2], enc("ab") + [0, 0, 0])
  np.testing.assert_array_equal(b["targets"][2], enc("uvw") + [EOS])  # first L-1 tokens + EOS
  np.testing.assert_array_equal(b["targets"][3], enc("uvw") + [EOS])
  np.testing.assert_array_equal(b["targets"][4], [EOS, 0, 0, 0])
  assert "truncated 3 of 5" in caplog.text
  with pytest.raises(ValueError, match="8 input and 2 target tokens.*input_len=5"):
    pl.make_eval_batches(recs, tok, batch_size=5, input_len=5, target_len=4, truncate=False,
                         shard_index=0, shard_count=1)  # fmt: skip
  caplog.clear()
  with caplog.at_level(logging.INFO):
    it = pl.make_seq2seq_iterator(recs, tok, batch_size=2, input_len=5, target_len=4, seed=3,
                                  shard_index=0, shard_count=1)  # fmt: skip
    take(it, 6)  # 12 examples: epochs 0 and 1 complete
  assert "Epoch 0: truncated 3 of 5" in caplog.text
  assert "Epoch 1: truncated 3 of 5" in caplog.text
  assert it.truncation_stats.seen >= 12


def test_train_shuffle_seeded_each_epoch_a_permutation():
  recs = token_records(12)
  kw = dict(batch_size=4, input_len=6, target_len=5, shard_index=0, shard_count=1)
  run = lambda seed: [ids_of(b) for b in take(pl.make_seq2seq_iterator(recs, seed=seed, **kw), 6)]
  a, a2, b = run(7), run(7), run(8)
  assert a == a2 and a != b
  epoch1, epoch2 = sum(a[:3], []), sum(a[3:], [])
  assert sorted(epoch1) == list(range(12)) and sorted(epoch2) == list(range(12))
  assert epoch1 != epoch2 and epoch1 != list(range(12))
  # finite epochs with drop_remainder: 10 examples, batch 4 -> 2 batches
  it = pl.make_seq2seq_iterator(token_records(10), num_epochs=1, **kw)
  assert len(list(it)) == 2


def check_packed_row(batch, row, originals, input_len, target_len):
  """Reconstructs every segment of one packed row; returns the example ids found."""
  seg_in, seg_tg = batch["inputs_segment_ids"][row], batch["targets_segment_ids"][row]
  pos_in, pos_tg = batch["inputs_positions"][row], batch["targets_positions"][row]
  # padding is exactly where segment id is 0, and segments are contiguous 1..k
  assert ((batch["targets"][row] == 0) == (seg_tg == 0)).all()
  assert ((batch["inputs"][row] == 0) == (seg_in == 0)).all()
  k = int(seg_tg.max())
  found = []
  for s in range(1, k + 1):
    where_t = np.flatnonzero(seg_tg == s)
    where_i = np.flatnonzero(seg_in == s)
    assert len(where_t) and (np.diff(where_t) == 1).all() and (np.diff(where_i) == 1).all()
    tgt = batch["targets"][row][where_t]
    ex_id = int(tgt[0]) - 1000
    ex = originals[ex_id]
    np.testing.assert_array_equal(tgt, ex["targets"])
    np.testing.assert_array_equal(batch["inputs"][row][where_i], ex["inputs"])
    np.testing.assert_array_equal(pos_tg[where_t], np.arange(len(where_t)))
    np.testing.assert_array_equal(pos_in[where_i], np.arange(len(where_i)))
    found.append(ex_id)
  assert (seg_tg[seg_tg > 0][:-1] <= seg_tg[seg_tg > 0][1:]).all()
  assert not pos_tg[seg_tg == 0].any() and not pos_in[seg_in == 0].any()
  return found


def test_packing_reconstructs_each_example_exactly_once():
  recs = token_records(30, seed=1)
  batches = pl.make_eval_batches(recs, batch_size=3, input_len=10, target_len=8, packing=True,
                                 shard_index=0, shard_count=1)  # fmt: skip
  keys = {"inputs", "targets", "inputs_segment_ids", "inputs_positions", "targets_segment_ids",
          "targets_positions"}  # fmt: skip
  seen = []
  for b in batches:
    assert set(b) == keys and all(v.dtype == np.int32 for v in b.values())
    assert b["inputs"].shape[1] == 10 and b["targets_positions"].shape == (3, 8)
    for row in range(3):
      seen += check_packed_row(b, row, recs, 10, 8)
  assert sorted(seen) == list(range(30))
  assert len(batches) * 3 < 30  # really packed: fewer rows than examples


def test_packing_train_rows_are_valid_and_cover_the_epoch():
  recs = token_records(24, seed=2)
  it = pl.make_seq2seq_iterator(recs, batch_size=2, input_len=12, target_len=9, packing=True,
                                seed=5, shard_index=0, shard_count=1)  # fmt: skip
  counts = collections.Counter()
  for b in take(it, 12):
    for row in range(2):
      counts.update(check_packed_row(b, row, recs, 12, 9))
  assert set(counts) == set(range(24))  # every example appears (the stream repeats epochs)


@pytest.mark.parametrize("packing", [False, True])
def test_checkpoint_restore_resumes_with_next_unseen_example(packing):
  recs = token_records(40, seed=3)
  kw = dict(batch_size=4, input_len=12, target_len=9, seed=11, packing=packing, shard_index=0,
            shard_count=1)  # fmt: skip
  it = pl.make_seq2seq_iterator(recs, **kw)
  first = take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # must survive the JSON checkpoint item
  rest = take(it, 6)  # runs past the 40-example epoch boundary for padded batches
  fresh = pl.make_seq2seq_iterator(recs, **kw)
  fresh.set_state(state)
  resumed = take(fresh, 6)
  for a, b in zip(rest, resumed):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # the uninterrupted stream equals first + rest
  ref = take(pl.make_seq2seq_iterator(recs, **kw), 9)
  for a, b in zip(first + rest, ref):
    np.testing.assert_array_equal(a["targets"], b["targets"])
  if not packing:  # within the first epoch, the resumed batch holds only unseen examples
    seen = {i for b in first for i in ids_of(b)}
    assert not seen & set(ids_of(resumed[0]))


@pytest.mark.parametrize("n", [9, 12])
def test_sharding_covers_dataset_exactly_once(n):
  recs = token_records(n, seed=4)
  evals = [pl.make_eval_batches(recs, batch_size=2, input_len=6, target_len=5, shard_index=i,
                                shard_count=2) for i in range(2)]  # fmt: skip
  assert len(evals[0]) == len(evals[1])  # processes stay in lockstep
  ids = [i for batches in evals for b in batches for i in ids_of(b)]
  assert sorted(ids) == list(range(n))
  # training: the first epoch of each shard, together, is the dataset once
  per_shard = []
  for i in range(2):
    shard_len = len(range(i, n, 2))
    it = pl.make_seq2seq_iterator(recs, batch_size=1, input_len=6, target_len=5, seed=0,
                                  shard_index=i, shard_count=2)  # fmt: skip
    per_shard.append([ids_of(b)[0] for b in take(it, shard_len)])
  assert sorted(per_shard[0] + per_shard[1]) == list(range(n))
  assert set(per_shard[0]) == set(range(0, n, 2))


def test_errors_are_clear():
  kw = dict(batch_size=2, input_len=4, target_len=4)
  with pytest.raises(ValueError, match="dataset is empty"):
    pl.make_seq2seq_iterator([], **kw)
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    pl.make_seq2seq_iterator(token_records(4), shard_index=2, shard_count=2, **kw)
  with pytest.raises(ValueError, match="shard 2 of 3 is empty"):
    pl.make_seq2seq_iterator(token_records(2), shard_index=2, shard_count=3, **kw)
  with pytest.raises(ValueError, match="no tokenizer"):
    next(pl.make_seq2seq_iterator([{"input": "a", "target": "b"}], shard_index=0, shard_count=1,
                                  **kw))  # fmt: skip
  with pytest.raises(ValueError, match="target_len >= 2"):
    pl.make_seq2seq_iterator(token_records(4), batch_size=2, input_len=4, target_len=1)


def test_end_to_end_sources_tokenizer_pipeline(tmp_path):
  from slicjax.data import sources

  lib = tmp_path / "lib"
  lib.mkdir()
  for i in range(6):
    (lib / f"mod{i:02d}.py").write_text(
      f'def func_{i}(values):\n    """Return the {i}th largest of the given values."""\n'
      f"    return sorted(values)[-{i + 1}]\n"
    )
  opts = dict(data_dir=str(tmp_path / "tfds"), stdlib_dir=str(lib))
  src = sources.load_text_source("stdlib_docstrings", "train", **opts)
  assert len(src) == 5  # mod05 hashes to the test split
  assert src[0] == {
    "input": "def func_0(values):\n    return sorted(values)[-1]",
    "target": "Return the 0th largest of the given values.",
  }
  tok = sources.tokenizer_for_source(
    "stdlib_docstrings", vocab_size=300, cache_dir=str(tmp_path / "tok"), **opts
  )
  assert sources.tokenizer_for_source("stdlib_docstrings", tokenizer_path=tok.model_path).encode(
    "return"
  ) == tok.encode("return")
  (batch,) = pl.make_eval_batches(
    src, tok, batch_size=8, input_len=96, target_len=64, shard_index=0, shard_count=1
  )
  texts = [tok.decode(row) for row in batch["targets"][:5]]
  assert texts == [src[i]["target"] for i in range(5)]
  assert [tok.decode(row) for row in batch["inputs"][:5]] == [src[i]["input"] for i in range(5)]
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text('{"input": "a b", "target": "c"}\n')
  got = sources.load_text_source("jsonl", "train", paths=str(jsonl), data_dir=opts["data_dir"])
  assert list(got) == [{"input": "a b", "target": "c"}]
  with pytest.raises(ValueError, match="unknown dataset 'wikihow'"):
    sources.load_text_source("wikihow", "train")
  with pytest.raises(ValueError, match="needs paths="):
    sources.load_text_source("jsonl", "train")
