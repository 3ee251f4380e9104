"""``debian_descriptions``: a second local dataset, package description -> one-line synopsis.

Built from the dpkg database of the machine (``/var/lib/dpkg/status`` by default, or any file
in that format), so it needs no download. Every package stanza's ``Description:`` field gives
one example:

* ``input``  — the long description: the field's continuation lines with their leading space
  removed; a line that is only ``.`` is a paragraph break (paragraphs are joined by a newline),
  and whitespace inside a paragraph is collapsed to single spaces;
* ``target`` — the synopsis, the text on the ``Description:`` line itself.

Excluded (counted in the metadata under ``excluded``): stanzas without a ``Package`` or a
synopsis (``no_synopsis``), long descriptions shorter than ``min_input_chars`` characters
(``short_description``; most are missing altogether), and long descriptions identical to an
earlier stanza's (``duplicate_description``: ``-dev`` / ``-doc`` / multi-arch variants
repeat their library's text), of which the first in file order is kept.

Splits are assigned BY PACKAGE NAME from the SHA-256 of the name (default 80/10/10
train/validation/test; the same rule as ``stdlib_docstrings`` uses for modules), so the
assignment of a package never depends on which other packages are installed. Records come out
in file order.

Record fields: ``input``, ``target`` (str), ``package`` (str). Metadata: ``status_path``,
``status_sha256``, ``options``, ``stanzas``, ``counts`` per split, ``excluded`` per reason.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import tensorflow_datasets as tfds

from slicjax.data.builders import base
from slicjax.data.builders.stdlib_docstrings import DEFAULT_SPLITS, module_split

DEFAULT_STATUS_PATH = "/var/lib/dpkg/status"
_FIX = ("set data.dpkg_status to a dpkg status file (on Debian/Ubuntu: /var/lib/dpkg/status, "
        "or copy one from such a machine), or use another data.name")


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
  """What to keep. See the module docstring for each rule.

  Attributes:
    min_input_chars: drop long descriptions shorter than this (characters, after cleaning).
    splits: ``((name, fraction), ...)``; fractions must sum to 1.
  """

  min_input_chars: int = 40
  splits: tuple[tuple[str, float], ...] = DEFAULT_SPLITS

  def __post_init__(self):
    total = sum(f for _, f in self.splits)
    if not self.splits or abs(total - 1.0) > 1e-9 or any(f < 0 for _, f in self.splits):
      raise ValueError(
        f"splits {self.splits} must be (name, fraction) pairs with fractions >= 0 summing to 1; "
        "e.g. (('train', 0.8), ('validation', 0.1), ('test', 0.1))."
      )
    if self.min_input_chars < 0:
      raise ValueError(f"min_input_chars must be >= 0, got {self.min_input_chars}.")


def parse_stanzas(text: str) -> list[dict[str, str]]:
  """The stanzas of a dpkg status (RFC 822-style) text: ``{field: raw value}`` per stanza.

  A field's value keeps its continuation lines (``"synopsis\\n line\\n ."``), so
  :func:`long_description` can read the paragraph structure; field names are case-sensitive
  as dpkg writes them.
  """
  stanzas, current, field = [], {}, None
  for line in text.replace("\r\n", "\n").split("\n"):
    if not line.strip():
      if current:
        stanzas.append(current)
      current, field = {}, None
    elif line[0] in " \t":
      if field is not None:
        current[field] += "\n" + line
    elif ":" in line:
      field, value = line.split(":", 1)
      current[field] = value.strip()
    else:
      field = None  # not a field: ignore the line and any continuation of it
  if current:
    stanzas.append(current)
  return stanzas


def split_description(value: str) -> tuple[str, str]:
  """``(synopsis, long description)`` of a ``Description`` field's raw value.

  The long description is the continuation lines without their leading space; a line that is
  only ``.`` separates paragraphs (joined by ``\\n``), whitespace inside a paragraph is
  collapsed to single spaces.
  """
  lines = value.split("\n")
  synopsis = " ".join(lines[0].split())
  paragraphs, words = [], []
  for line in lines[1:]:
    body = line[1:] if line[:1] in (" ", "\t") else line
    if body.strip() == ".":
      if words:
        paragraphs.append(" ".join(words))
      words = []
    else:
      words.extend(body.split())
  if words:
    paragraphs.append(" ".join(words))
  return synopsis, "\n".join(paragraphs)


def extract(status_path: str | None = None, options: ExtractOptions | None = None):
  """Every split of a dpkg status file.

  Returns:
    ``(splits, metadata)``: ``splits`` maps each split name to its records in file order;
    ``metadata`` holds the counts described in the module docstring.

  Raises:
    FileNotFoundError: the status file does not exist (naming it and the fix).
    ValueError: it yields no examples.
  """
  options = options or ExtractOptions()
  path = os.path.abspath(status_path or DEFAULT_STATUS_PATH)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dpkg status file {path!r} does not exist; {_FIX}.")
  with open(path, encoding="utf-8", errors="replace") as f:
    stanzas = parse_stanzas(f.read())
  splits = {name: [] for name, _ in options.splits}
  excluded: dict[str, int] = {}
  seen: set[str] = set()

  def skip(reason):
    excluded[reason] = excluded.get(reason, 0) + 1

  for st in stanzas:
    package = st.get("Package", "").strip()
    synopsis, text = split_description(st.get("Description", ""))
    if not package or not synopsis:
      skip("no_synopsis")
      continue
    if len(text) < options.min_input_chars:
      skip("short_description")
      continue
    if text in seen:
      skip("duplicate_description")
      continue
    seen.add(text)
    splits[module_split(package, options.splits)].append(
      {"input": text, "target": synopsis, "package": package}
    )
  if not any(splits.values()):
    raise ValueError(
      f"dpkg status file {path!r} yields no examples ({len(stanzas)} stanzas; excluded: "
      f"{excluded or 'none'}): it needs package stanzas with a 'Description:' synopsis and a "
      f"long description of at least {options.min_input_chars} characters; {_FIX}."
    )
  metadata = {
    "status_path": path,
    "status_sha256": base.file_sha256(path),
    "options": dataclasses.asdict(options),
    "stanzas": len(stanzas),
    "counts": {k: len(v) for k, v in splits.items()},
    "excluded": dict(sorted(excluded.items())),
  }
  return splits, metadata


@dataclasses.dataclass(eq=False)
class DebianDescriptionsConfig(tfds.core.BuilderConfig):
  """Which status file and options; the name hashes the file's content with the options."""

  status_path: str = DEFAULT_STATUS_PATH
  options: ExtractOptions = dataclasses.field(default_factory=ExtractOptions)


def make_config(status_path: str | None = None, **options: Any) -> DebianDescriptionsConfig:
  """A config for ``status_path`` (default ``/var/lib/dpkg/status``) and ExtractOptions.

  Raises:
    FileNotFoundError: the status file does not exist.
  """
  path = os.path.abspath(status_path or DEFAULT_STATUS_PATH)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dpkg status file {path!r} does not exist; {_FIX}.")
  opts = ExtractOptions(**options)
  payload = {"sha256": base.file_sha256(path), "options": dataclasses.asdict(opts)}
  return DebianDescriptionsConfig(
    name=base.config_name("dpkg", payload), status_path=path, options=opts
  )


class DebianDescriptions(base.LocalBuilder):
  """Debian package long description -> synopsis (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {"input": tfds.features.Text(), "target": tfds.features.Text(),
         "package": tfds.features.Text()}
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config or make_config()
    splits, metadata = extract(cfg.status_path, cfg.options)
    self.info.metadata.update(metadata)
    # TFDS cannot write an empty split; an empty one is simply absent (see `load_split`).
    return {name: self._generate_examples(recs) for name, recs in splits.items() if recs}

  def _generate_examples(self, records):
    for i, r in enumerate(records):
      yield f"{i:06d}:{r['package']}", r


def builder(
  *, data_dir: str | None = None, status_path: str | None = None, prepare: bool = True,
  **options,
) -> DebianDescriptions:
  """The (prepared, cached under ``data_dir``) builder for a status file and options."""
  b = DebianDescriptions(
    config=make_config(status_path, **options),
    data_dir=data_dir or base.default_data_dir(),
    file_format="array_record",
  )
  return base.prepare(b) if prepare else b


def load_split(split: str, **kwargs):
  """A random-access source of records for ``split`` (prepares the dataset on first use).

  Args:
    split: ``train``, ``validation`` or ``test`` (or a TFDS slice such as ``train[:10%]``).
    **kwargs: passed to :func:`builder` (``data_dir``, ``status_path``, ExtractOptions fields).
  """
  return base.data_source(builder(**kwargs), split)
