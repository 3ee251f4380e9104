"""data.input_len / data.target_len = 0: lengths chosen from the train split's token counts."""

import json

import ml_collections
import numpy as np
import pytest

from slicjax.pipelines import tasks, text_tasks


class _WordTokenizer:
  """One token per whitespace-separated word (ids irrelevant here)."""

  vocab_size = 100

  def encode(self, text):
    return [3] * len(text.split())


def _records(n_in, n_tgt):
  return [{"input": " ".join(["w"] * a), "target": " ".join(["t"] * b)}
          for a, b in zip(n_in, n_tgt)]


def test_zero_lengths_take_the_98th_percentile_and_explicit_ones_stay():
  n_in = list(range(1, 101))  # 1..100 words
  n_tgt = [5] * 90 + [40] * 10
  recs = _records(n_in, n_tgt)
  d = {"input_len": 0, "target_len": 0}
  out = text_tasks.choose_lengths(d, recs, _WordTokenizer())
  assert out["input_len"] == int(np.ceil(np.percentile(n_in, 98))) == 99
  assert out["target_len"] == 41  # 40 words + EOS: more than 2% of targets are that long
  assert out["chosen_from_data"] == ["input_len", "target_len"]
  kept = text_tasks.choose_lengths({"input_len": 64, "target_len": 0}, recs, _WordTokenizer())
  assert kept["input_len"] == 64 and kept["chosen_from_data"] == ["target_len"]
  same = text_tasks.choose_lengths({"input_len": 7, "target_len": 9}, recs, _WordTokenizer())
  assert (same["input_len"], same["target_len"], same["chosen_from_data"]) == (7, 9, [])


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_task_records_the_chosen_lengths(tmp_path):
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 9))))
           for _ in range(400)]
  rows = [{"input": " ".join(rng.choice(words, int(rng.integers(3, 30)))),
           "target": " ".join(rng.choice(words, int(rng.integers(1, 6))))} for _ in range(200)]
  c = ml_collections.ConfigDict()
  c.data = {**tasks.DATA_KEYS, "name": "jsonl", "input_len": 0, "target_len": 0,
            "vocab_size": 300, "train_path": _jsonl(tmp_path / "train.jsonl", rows[:160]),
            "eval_path": _jsonl(tmp_path / "dev.jsonl", rows[160:]),
            "cache_dir": str(tmp_path / "tok"), "data_dir": str(tmp_path / "d")}
  data = tasks.load(c, batch_size=4)
  ins, tgts = text_tasks.token_lengths(
    [{"input": r["input"], "target": r["target"]} for r in rows[:160]], data.tokenizer)
  assert data.input_len == int(np.ceil(np.percentile(ins, 98))) and data.input_len < ins.max()
  assert data.target_len == int(np.ceil(np.percentile(tgts, 98)))
  assert data.lengths["chosen_from_data"] == ["input_len", "target_len"]
  assert data.lengths["input_len"] == data.input_len
  assert all(len(e["inputs"]) <= data.input_len for e in data.train_examples)
  assert data.truncation["train"]["truncated_inputs"] >= 1  # the top 2% are cut


def test_reverse_task_refuses_zero_lengths():
  c = ml_collections.ConfigDict()
  c.data = {**tasks.DATA_KEYS, "name": "reverse", "input_len": 0}
  with pytest.raises(ValueError, match="needs a text task"):
    tasks.load(c, batch_size=4)
