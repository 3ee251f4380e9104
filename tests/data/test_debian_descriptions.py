"""debian_descriptions: dpkg status parsing, exclusions, deduplication, stable splits, errors."""

import os

import pytest

from slicjax.data import sources
from slicjax.data.builders import debian_descriptions as dd
from slicjax.data.builders.stdlib_docstrings import module_split

STATUS = """\
Package: alpha
Status: install ok installed
Conffiles:
 /etc/alpha.conf 0123456789abcdef
Version: 1.0
Description: the alpha   tool
 Alpha reads   files and writes
 them back.
 .
 A second paragraph
  with an indented line.

Package: alpha-dev
Version: 1.0
Description: development files for alpha
 Alpha reads files and writes
 them back.
 .
 A second paragraph with an indented line.

Package: shorty
Description: too short a description
 Tiny text.

Package: nolong
Description: synopsis only, no long description

Package: nodesc
Version: 2

Description: a stanza without a package name
 This long description has no package and must therefore be skipped.
"""


def _extra(n):
  """``n`` further valid stanzas (enough for every split to be non-empty)."""
  return "".join(
    f"\nPackage: pkg{i}\nDescription: synopsis number {i}\n The package number {i} does "
    f"something useful for the test.\n .\n It has a second paragraph too, number {i}.\n"
    for i in range(n)
  )


@pytest.fixture
def status_file(tmp_path):
  path = tmp_path / "status"
  path.write_text(STATUS + _extra(40))
  return str(path)


def test_long_description_paragraphs_and_whitespace():
  value = "the alpha   tool\n Alpha reads   files\n them back.\n .\n  indented  line\n ."
  assert dd.split_description(value) == (
    "the alpha tool", "Alpha reads files them back.\nindented line")
  assert dd.split_description("synopsis only") == ("synopsis only", "")


def test_parse_skip_dedup_and_exact_records(status_file):
  splits, meta = dd.extract(status_file)
  records = [r for recs in splits.values() for r in recs]
  by_pkg = {r["package"]: r for r in records}
  assert by_pkg["alpha"] == {
    "package": "alpha", "target": "the alpha tool",
    "input": "Alpha reads files and writes them back.\nA second paragraph with an indented line.",
  }
  # alpha-dev repeats alpha's long description: the first stanza wins.
  assert "alpha-dev" not in by_pkg
  assert not {"shorty", "nolong", "nodesc"} & set(by_pkg)
  assert meta["excluded"] == {"duplicate_description": 1, "no_synopsis": 2,
                              "short_description": 2}
  assert meta["stanzas"] == 46 and sum(meta["counts"].values()) == 41 == len(records)
  for name, recs in splits.items():
    assert all(module_split(r["package"]) == name for r in recs)
  assert all(splits[k] for k in ("train", "validation", "test")), meta["counts"]


def test_split_is_stable_under_other_packages(status_file, tmp_path):
  splits, _ = dd.extract(status_file)
  where = {r["package"]: k for k, recs in splits.items() for r in recs}
  # Another machine: a subset of the packages, in another order, plus new ones.
  other = tmp_path / "other"
  other.write_text(_extra(45).replace("Package: pkg3\n", "Package: pkg3x\n")
                   + STATUS)
  splits2, _ = dd.extract(str(other))
  where2 = {r["package"]: k for k, recs in splits2.items() for r in recs}
  common = set(where) & set(where2)
  assert len(common) >= 39 and all(where[p] == where2[p] for p in common)
  assert dd.extract(status_file)[0] == splits  # deterministic


def test_errors_name_the_file_and_the_fix(tmp_path):
  missing = str(tmp_path / "nope" / "status")
  with pytest.raises(FileNotFoundError, match=r"nope/status.*data\.dpkg_status"):
    dd.extract(missing)
  empty = tmp_path / "empty"
  empty.write_text("Package: a\nDescription: only a synopsis\n")
  with pytest.raises(ValueError, match=r"yields no examples.*short_description.*dpkg_status"):
    dd.extract(str(empty))


def test_builder_and_source_roundtrip(status_file, tmp_path):
  recs = sources.load_text_source("debian_descriptions", "train", status_path=status_file,
                                  data_dir=str(tmp_path / "tfds"))
  splits, _ = dd.extract(status_file)
  assert [r["target"] for r in recs] == [r["target"] for r in splits["train"]]
  assert [r["input"] for r in recs] == [r["input"] for r in splits["train"]]


@pytest.mark.skipif(not os.path.isfile(dd.DEFAULT_STATUS_PATH), reason="no dpkg database")
def test_this_machines_dpkg_database_gives_a_few_hundred_examples():
  splits, meta = dd.extract()
  n = sum(meta["counts"].values())
  assert n >= 100 and all(splits[k] for k in ("train", "validation", "test")), meta
  assert 0.6 < meta["counts"]["train"] / n < 0.95
