"""Builders: stdlib docstrings on a fake stdlib, jsonl seq2seq / preference files, catalog keys."""

import ast
import hashlib
import json
import math
import os
import platform
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from slicjax.data.builders import catalog, jsonl_preference, jsonl_seq2seq
from slicjax.data.builders import stdlib_docstrings as sd
from slicjax.data.builders.jsonl_seq2seq import JsonlError

MOD = '''\
"""Module docstring."""
import functools


@functools.lru_cache(maxsize=None)
def add(x, y):
    """Add two numbers together. The result is returned.

    More text.
    """
    return x + y


def grüße(name): "Say hello to the named person."; return "hi " + name


class Greeter:
    """A class docstring."""

    def greet(self, who):
        """Return a greeting for
        the given   person.

        Args:
          who: the person.
        """
        message = "héllo " + who
        return message

    def _private(self):
        """This is a private helper method."""
        return 1

    def __repr__(self):
        """Return the representation of this greeter."""
        return "Greeter()"

    def get_name(self):
        """Get the name."""
        return self.name

    def hi(self):
        """Hi there."""
        return 1

    def abstract_op(self):
        """Perform the abstract operation here."""


def outer():
    """Run the outer function with an inner helper."""
    def inner():
        """Inner helper that should not be extracted."""
        return 2
    return inner()


def sig():
    """sig() -> int

    Compute the answer to everything, e.g. forty two. Then stop.
    """
    return 42


class _Hidden:
    def visible_name(self):
        """Method of a private class is excluded."""
        return 0
'''

GOOD_FN = 'def {name}(a):\n    """Return the argument unchanged for sure."""\n    return a\n'


def _write(root, rel, text):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


@pytest.fixture()
def fake_stdlib(tmp_path):
  root = str(tmp_path / "lib")
  _write(root, "pkg/mod.py", MOD)
  _write(root, "pkg/__init__.py", GOOD_FN.format(name="pkg_helper"))
  for rel in [
    "test/test_a.py", "pkg/tests/b.py", "idlelib/idle_test/c.py", "test_top.py",
    "site-packages/third/d.py", "_private_mod.py",
  ]:  # fmt: skip
    _write(root, rel, GOOD_FN.format(name="would_be_kept"))
  _write(root, "broken.py", "def f(:\n    pass\n" + GOOD_FN.format(name="never"))
  return root


def test_stdlib_extraction_exact_records_and_exclusions(fake_stdlib):
  splits, meta = sd.extract_stdlib(fake_stdlib)
  recs = [r for rs in splits.values() for r in rs]
  by_name = {(r["module"], r["name"]): r for r in recs}
  assert sorted(by_name) == [
    ("pkg", "pkg_helper"), ("pkg.mod", "Greeter.greet"), ("pkg.mod", "add"),
    ("pkg.mod", "grüße"), ("pkg.mod", "outer"), ("pkg.mod", "sig"),
  ]  # fmt: skip
  expected = {
    "add": (
      "@functools.lru_cache(maxsize=None)\ndef add(x, y):\n    return x + y",
      "Add two numbers together.",
    ),
    # docstring on the def line after non-ASCII characters (byte vs character offsets)
    "grüße": ('def grüße(name): return "hi " + name', "Say hello to the named person."),
    "Greeter.greet": (
      'def greet(self, who):\n    message = "héllo " + who\n    return message',
      "Return a greeting for the given person.",
    ),
    "outer": (
      'def outer():\n    def inner():\n        """Inner helper that should not be extracted."""'
      "\n        return 2\n    return inner()",
      "Run the outer function with an inner helper.",
    ),
    "sig": ("def sig():\n    return 42", "Compute the answer to everything, e.g. forty two."),
  }
  for name, (inp, tgt) in expected.items():
    r = by_name[("pkg.mod", name)]
    assert r["input"] == inp, name
    assert r["target"] == tgt, name
    assert ast.get_docstring(ast.parse(r["input"]).body[0]) is None or name == "outer"
  # source order within the module
  assert [r["name"] for r in recs if r["module"] == "pkg.mod"] == [
    "add", "grüße", "Greeter.greet", "outer", "sig"
  ]  # fmt: skip
  ex = meta["excluded"]
  assert ex["private_function"] == 3  # _private, __repr__, _Hidden.visible_name
  assert ex["trivial_docstring"] == 2  # "Get the name." for get_name, "Hi there."
  assert ex["docstring_only_body"] == 1
  assert ex["file_test_module"] == 4
  assert ex["dir_site_packages"] == 1
  assert ex["file_private_module"] == 1
  assert ex["file_parse_error"] == 1
  assert meta["python_version"] == platform.python_version()
  assert sum(meta["counts"].values()) == 6


def test_first_sentence_and_trivial_rules():
  assert sd.first_sentence("Return x, e.g. 3. Then more.") == "Return x, e.g. 3."
  assert sd.first_sentence("Call f. then g. Done.") == "Call f. then g."
  assert sd.first_sentence("Is it? Yes (really).") == "Is it?"
  assert sd.first_sentence("getline(f, n) -> str\n\nGet a line!  Ok.") == "Get a line!"
  assert sd.first_sentence("No final period\nover two lines\n\nSecond.") == (
    "No final period over two lines"
  )
  assert sd.first_sentence("  \n") == ""
  assert sd.is_trivial("Set the value.", "set_value")
  assert sd.is_trivial("Get the HTTP response.", "getHttpResponse")
  assert not sd.is_trivial("Set the value of the counter.", "set_value")
  assert sd.is_trivial("Two words.", "f")


def _independent_split(module):
  u = int(hashlib.sha256(module.encode()).hexdigest()[:16], 16) / 2**64
  return "train" if u < 0.8 else ("validation" if u < 0.9 else "test")


def test_stdlib_builder_splits_by_module_deterministic_metadata(tmp_path):
  root = str(tmp_path / "lib")
  for i in range(24):  # two functions per module
    _write(root, f"mod{i:02d}.py", GOOD_FN.format(name="first") + GOOD_FN.format(name="second"))
  data_dir = str(tmp_path / "tfds")
  b = sd.builder(data_dir=data_dir, stdlib_dir=root)
  modules = {}
  for split in ("train", "validation", "test"):
    src = b.as_data_source(split=split)
    modules[split] = {src[i]["module"].decode() for i in range(len(src))}
    assert all(_independent_split(m) == split for m in modules[split])
  assert set.union(*modules.values()) == {f"mod{i:02d}" for i in range(24)}
  assert sum(len(v) for v in modules.values()) == 24  # disjoint
  assert all(modules.values())  # these names put modules in every split
  # Same records in the same order as a direct extraction, twice.
  splits, _ = sd.extract_stdlib(root)
  assert splits == sd.extract_stdlib(root)[0]
  src = b.as_data_source(split="train")
  got = [(src[i]["module"].decode(), src[i]["name"].decode()) for i in range(len(src))]
  assert got == [(r["module"], r["name"]) for r in splits["train"]]
  # Metadata survives a reload from disk.
  meta = sd.builder(data_dir=data_dir, stdlib_dir=root).info.metadata
  assert meta["python_version"] == platform.python_version()
  assert meta["counts"] == {k: 2 * len(v) for k, v in modules.items()}
  assert meta["modules"] == {k: len(v) for k, v in modules.items()}


def test_stdlib_empty_split_and_missing_dir_errors(tmp_path):
  root = str(tmp_path / "lib")
  _write(root, "mod00.py", GOOD_FN.format(name="only"))  # mod00 -> train
  assert _independent_split("mod00") == "train"
  with pytest.raises(ValueError, match="no records in split 'test'"):
    sd.load_split("test", data_dir=str(tmp_path / "tfds"), stdlib_dir=root)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sd.extract_stdlib(str(tmp_path / "nope"))


def test_real_stdlib_extraction_has_disjoint_nonempty_splits():
  splits, meta = sd.extract_stdlib()
  mods = {k: {r["module"] for r in v} for k, v in splits.items()}
  assert all(len(v) > 20 for v in mods.values())
  assert not (mods["train"] & mods["validation"] or mods["train"] & mods["test"])
  assert not mods["validation"] & mods["test"]
  assert not any(r["module"].startswith("test") or ".test" in r["module"] for v in splits.values()
                 for r in v)  # fmt: skip
  assert meta["counts"]["train"] > 1000


# ---------------------------------------------------------------- jsonl seq2seq


def _jsonl(path, rows, raw_lines=()):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for line in raw_lines:
      f.write(line + "\n")
  return str(path)


def test_jsonl_seq2seq_unicode_roundtrip_custom_keys(tmp_path):
  rows = [{"doc": "Grüße aus Köln 🚀\nzweite Zeile", "sum": "Grüße 🚀", "x": 1},
          {"doc": "日本語のテキスト", "sum": "テキスト"}]  # fmt: skip
  train = _jsonl(tmp_path / "train.jsonl", rows)
  dev = _jsonl(tmp_path / "dev.jsonl", rows[:1])
  src = jsonl_seq2seq.load_split(
    {"train": train, "validation": dev}, "train", data_dir=str(tmp_path / "d"), input_key="doc",
    target_key="sum",
  )  # fmt: skip
  assert len(src) == 2
  for i, r in enumerate(rows):
    assert src[i]["input"].decode() == r["doc"] and src[i]["target"].decode() == r["sum"]
    assert src[i]["line"] == i + 1


def test_jsonl_seq2seq_errors_name_file_and_line(tmp_path):
  ok = {"input": "a", "target": "b"}
  bad_json = _jsonl(tmp_path / "a.jsonl", [ok, ok], ['{"input": "x", "target": '])
  with pytest.raises(JsonlError, match=r"a\.jsonl:3: not valid JSON"):
    jsonl_seq2seq.read_seq2seq_jsonl(bad_json)
  missing = _jsonl(tmp_path / "b.jsonl", [ok, {"text": "x", "target": "y"}])
  with pytest.raises(JsonlError, match=r"b\.jsonl:2: missing field 'input'.*input_key"):
    jsonl_seq2seq.read_seq2seq_jsonl(missing)
  not_str = _jsonl(tmp_path / "c.jsonl", [{"input": 3, "target": "y"}])
  with pytest.raises(JsonlError, match=r"c\.jsonl:1: field 'input' must be a string"):
    jsonl_seq2seq.read_seq2seq_jsonl(not_str)
  empty = tmp_path / "e.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(JsonlError, match="empty"):
    jsonl_seq2seq.read_seq2seq_jsonl(str(empty))
  with pytest.raises(JsonlError, match="no such file"):
    jsonl_seq2seq.read_seq2seq_jsonl(str(tmp_path / "missing.jsonl"))


def test_jsonl_seq2seq_empty_target_and_long_input_policies(tmp_path):
  rows = [{"input": "abc", "target": "t1"}, {"input": "x" * 12, "target": "t2"},
          {"input": "de", "target": "  "}, {"input": "fgh", "target": "t4"}]  # fmt: skip
  path = _jsonl(tmp_path / "f.jsonl", rows)
  recs, stats = jsonl_seq2seq.read_seq2seq_jsonl(path)
  assert [r["line"] for r in recs] == [1, 2, 4] and stats["dropped_empty_target"] == 1
  recs, _ = jsonl_seq2seq.read_seq2seq_jsonl(path, on_empty_target="keep")
  assert recs[2]["target"] == "  "
  with pytest.raises(JsonlError, match=r"f\.jsonl:3: empty target"):
    jsonl_seq2seq.read_seq2seq_jsonl(path, on_empty_target="error")
  with pytest.raises(JsonlError, match=r"f\.jsonl:2: input has 12 characters.*max_input_chars=5"):
    jsonl_seq2seq.read_seq2seq_jsonl(path, max_input_chars=5)
  recs, stats = jsonl_seq2seq.read_seq2seq_jsonl(path, max_input_chars=5, on_too_long="truncate")
  assert recs[1]["input"] == "xxxxx" and stats["truncated_input"] == 1
  recs, stats = jsonl_seq2seq.read_seq2seq_jsonl(path, max_input_chars=5, on_too_long="drop")
  assert [r["line"] for r in recs] == [1, 4] and stats["dropped_too_long"] == 1
  # The builder records the counts, and an edited file gets a new cache entry.
  b = jsonl_seq2seq.builder(path, data_dir=str(tmp_path / "d"))
  assert b.info.metadata["stats"]["train"]["dropped_empty_target"] == 1
  _jsonl(tmp_path / "f.jsonl", rows[:1])
  b2 = jsonl_seq2seq.builder(path, data_dir=str(tmp_path / "d"))
  assert b2.builder_config.name != b.builder_config.name
  assert len(b2.as_data_source(split="train")) == 1


def test_prepare_waits_for_a_concurrent_build_and_reads_its_info(tmp_path):
  """Two builders of one dataset made before either prepared it (two seeds started at once):
  both end up with the records; the one prepared second reads the first one's info instead of
  reporting empty splits, and threads preparing at the same time do not collide."""
  import threading

  from slicjax.data.builders import base

  rows = [{"input": f"document {i}", "target": f"summary {i}"} for i in range(6)]
  path = _jsonl(tmp_path / "train.jsonl", rows)
  first, second = (jsonl_seq2seq.builder(path, data_dir=str(tmp_path / "d"), prepare=False)
                   for _ in range(2))
  base.prepare(first)
  base.prepare(second)
  assert len(base.data_source(second, "train")) == 6
  assert second.info.splits["train"].num_examples == 6

  fresh = [jsonl_seq2seq.builder(path, data_dir=str(tmp_path / "t"), prepare=False)
           for _ in range(3)]
  errors = []

  def run(b):
    try:
      base.prepare(b)
    except Exception as e:  # noqa: BLE001 -- reported by the assertion below
      errors.append(e)

  threads = [threading.Thread(target=run, args=(b,)) for b in fresh]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert [len(base.data_source(b, "train")) for b in fresh] == [6, 6, 6]


# ---------------------------------------------------------------- preference files


def test_preference_pairs_roundtrip(tmp_path):
  rows = [{"q": "Wie geht's?", "good": "Gut 😀", "bad": "…"}, {"q": "a", "good": "b", "bad": "c"}]
  path = _jsonl(tmp_path / "p.jsonl", rows)
  src = jsonl_preference.load_split(
    path, data_dir=str(tmp_path / "d"), prompt_key="q", chosen_key="good", rejected_key="bad"
  )
  got = [{k: src[i][k].decode() for k in ("prompt", "chosen", "rejected")} for i in range(2)]
  assert got == [{"prompt": r["q"], "chosen": r["good"], "rejected": r["bad"]} for r in rows]


def test_candidate_sets_write_read_and_validation(tmp_path):
  recs = [
    {"input": "doc one", "target": "sum", "candidates": ["c1", "c2", "c3"],
     "scores": [0.25, 1, 0.5], "logp": [-3.5, -1.25, -7.0]},
    {"input": "doc two", "target": "s2", "candidates": ["only"], "scores": [0.75],
     "logp": [-2.0], "id": 7},
  ]  # fmt: skip
  path = str(tmp_path / "cands.jsonl")
  assert jsonl_preference.write_candidates_jsonl(path, recs) == 2
  fmt, back = jsonl_preference.read_preference_jsonl(path)
  assert fmt == "candidates" and back[1]["candidates"] == ["only"] and "id" not in back[1]
  src = jsonl_preference.load_split(path, data_dir=str(tmp_path / "d"))
  assert [c.decode() for c in src[0]["candidates"]] == ["c1", "c2", "c3"]
  np.testing.assert_allclose(src[0]["scores"], [0.25, 1.0, 0.5])
  np.testing.assert_allclose(src[0]["logp"], [-3.5, -1.25, -7.0])
  with pytest.raises(JsonlError, match="num_candidates=3"):
    jsonl_preference.read_preference_jsonl(path, num_candidates=3)
  bad = dict(recs[0], scores=[0.1, 0.2])
  with pytest.raises(JsonlError, match="3 candidates but 2 scores"):
    jsonl_preference.write_candidates_jsonl(path, [bad])
  nan_line = json.dumps(dict(recs[0], logp=[-1.0, math.nan, -2.0]))
  bad_path = _jsonl(tmp_path / "nan.jsonl", [recs[0]], [nan_line])
  with pytest.raises(JsonlError, match=r"nan\.jsonl:2: 'logp' holds a non-finite"):
    jsonl_preference.read_preference_jsonl(bad_path)
  renamed = _jsonl(
    tmp_path / "r.jsonl",
    [{"input_text": "a", "target_text": "b", "candidate_texts": ["x", "y"], "sim": [0.5, 0.0],
      "logp": [-1.0, -2.0]}],
  )  # fmt: skip
  keys = {"input": "input_text", "target": "target_text", "candidates": "candidate_texts",
          "scores": "sim"}  # fmt: skip
  fmt, back = jsonl_preference.read_preference_jsonl(renamed, candidate_keys=keys)
  assert fmt == "candidates" and back == [
    {"input": "a", "target": "b", "candidates": ["x", "y"], "scores": [0.5, 0.0],
     "logp": [-1.0, -2.0]}
  ]  # fmt: skip
  missing = _jsonl(tmp_path / "m.jsonl", [{"input": "a", "target": "b", "candidates": ["x"]}])
  with pytest.raises(JsonlError, match=r"m\.jsonl:1: missing field\(s\) \['scores', 'logp'\]"):
    jsonl_preference.read_preference_jsonl(missing)


# ---------------------------------------------------------------- catalog


def test_catalog_mapping_on_dicts():
  ex = {"document": b"Caf\xc3\xa9 news", "summary": "short", "id": "x"}
  assert catalog.to_seq2seq("xsum", ex) == {"input": "Café news", "target": "short"}
  assert catalog.to_seq2seq(
    "tfds:samsum", {"dialogue": "A: hi", "summary": "greet", "id": "1"}
  ) == {"input": "A: hi", "target": "greet"}
  with pytest.raises(KeyError, match="no 'highlights'"):
    catalog.to_seq2seq("cnn_dailymail", {"article": "a"})
  with pytest.raises(ValueError, match="unknown catalog dataset"):
    catalog.entry("gigaword")


@pytest.mark.parametrize(
  "name,in_key,tgt_key",
  [("xsum", "document", "summary"), ("cnn_dailymail", "article", "highlights"),
   ("samsum", "dialogue", "summary"), ("reddit_tifu", "documents", "tldr")],
)  # fmt: skip
def test_catalog_source_maps_mock_data(name, in_key, tgt_key):
  with tfds.testing.mock_data(num_examples=3):
    src = catalog.catalog_source(name, "train")
    raw = tfds.builder(catalog.CATALOG[name].tfds_name).as_data_source(split="train")
    assert len(src) == 3
    for i in range(3):
      want = {"input": raw[i][in_key], "target": raw[i][tgt_key]}
      want = {k: v.decode() if isinstance(v, bytes) else v for k, v in want.items()}
      assert src[i] == want
      assert src[i]["input"] != src[i]["target"]  # mock fields differ: keys really mapped


def test_catalog_not_prepared_error(tmp_path):
  with pytest.raises(catalog.CatalogNotPreparedError, match="tfds build xsum"):
    catalog.catalog_source("xsum", "train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="manual_dir"):
    catalog.catalog_source("samsum", "train", data_dir=str(tmp_path), download=True)


def test_fake_stdlib_text_is_dedented_python(fake_stdlib):
  splits, _ = sd.extract_stdlib(fake_stdlib)
  for r in (r for rs in splits.values() for r in rs):
    assert r["input"] == textwrap.dedent(r["input"]) and not r["input"].startswith(" ")
