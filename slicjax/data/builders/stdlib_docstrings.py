"""``stdlib_docstrings``: the embedded default dataset, code -> docstring summary.

Built from the Python standard library installed on the machine
(``sysconfig.get_paths()["stdlib"]``), so it needs no download. For every public function or
method that has a docstring:

* ``input``  — the function's source (decorators included, indentation removed) with its own
  docstring removed (a body that held only the docstring becomes ``...``);
* ``target`` — the docstring's first sentence, whitespace normalised. Leading signature lines
  such as ``getline(filename, lineno) -> str`` are skipped.

Excluded (each counted in the dataset's metadata under ``excluded``): test code (directories
``test``, ``tests``, ``idle_test``; modules ``test_*`` / ``*_test``), ``site-packages`` /
``dist-packages``, private modules (a dotted component starting with ``_``, unless
``include_private_modules``), private functions and methods (``_name``, dunders included) and
methods of private classes, functions nested in functions, files that fail to parse, trivial
docstrings (fewer than ``min_target_words`` words, or words that only repeat the function's
name), docstring-only bodies (fewer than ``min_body_statements`` other statements), inputs
over ``max_input_chars`` and targets over ``max_target_chars``.

Splits are assigned BY MODULE from the SHA-256 of the dotted module name (default 80/10/10
train/validation/test), so no module appears in two splits and the assignment does not depend
on which other modules exist. Records come out in a fixed order (files sorted by path,
functions in source order), so the same machine always yields the same records.

Record fields: ``input``, ``target`` (str), ``module`` (dotted name), ``name`` (qualified name,
``Class.method``), ``lineno`` (int32). Metadata: ``python_version``, ``stdlib_dir``,
``options``, ``counts`` and ``modules`` per split, ``excluded`` per reason, ``files_scanned``.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import os
import platform
import re
import sysconfig
import tokenize
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from slicjax.data.builders import base

DEFAULT_SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_SITE_DIRS = frozenset({"site-packages", "dist-packages"})
_FILLER_WORDS = frozenset(
  {"a", "an", "the", "return", "returns", "get", "gets", "set", "sets", "this", "method",
   "function", "of"}
)  # fmt: skip
# A docstring line that is only a call signature, e.g. ``S.find(sub[, start]) -> int``.
_SIGNATURE_RE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
# A sentence ends at . ! or ? followed by whitespace and a capital, digit, quote or bracket,
# except after the abbreviations e.g., i.e., cf. and vs.
_SENTENCE_END_RE = re.compile(
  r"(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)(?<!\bvs)[.!?](?=\s+[A-Z0-9\"'`(\[])"
)


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
  """What to keep. See the module docstring for each rule.

  Attributes:
    max_input_chars: drop functions whose stripped source is longer than this.
    max_target_chars: drop summaries longer than this.
    min_target_words: drop summaries with fewer words than this.
    min_body_statements: statements besides the docstring a function needs to be kept.
    include_private_modules: keep modules with a ``_``-prefixed dotted component.
    splits: ``((name, fraction), ...)``; fractions must sum to 1.
  """

  max_input_chars: int = 4000
  max_target_chars: int = 300
  min_target_words: int = 3
  min_body_statements: int = 1
  include_private_modules: bool = False
  splits: tuple[tuple[str, float], ...] = DEFAULT_SPLITS

  def __post_init__(self):
    total = sum(f for _, f in self.splits)
    if not self.splits or abs(total - 1.0) > 1e-9 or any(f < 0 for _, f in self.splits):
      raise ValueError(
        f"splits {self.splits} must be (name, fraction) pairs with fractions >= 0 summing to 1; "
        "e.g. (('train', 0.8), ('validation', 0.1), ('test', 0.1))."
      )
    for field in ("max_input_chars", "max_target_chars", "min_target_words"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}.")


def module_name(relpath: str) -> str:
  """``email/mime/text.py`` -> ``email.mime.text``; a package's ``__init__.py`` -> the package."""
  parts = relpath[: -len(".py")].replace(os.sep, "/").split("/")
  if parts[-1] == "__init__" and len(parts) > 1:
    parts = parts[:-1]
  return ".".join(parts)


def exclusion_reason(relpath: str, *, include_private_modules: bool = False) -> str | None:
  """Why a ``.py`` file (path relative to the stdlib root) is excluded, or None to keep it."""
  parts = relpath.replace(os.sep, "/").split("/")
  dirs, stem = parts[:-1], parts[-1][: -len(".py")]
  if any(d in _SITE_DIRS for d in dirs):
    return "site_packages"
  if any(d in _TEST_DIRS for d in dirs) or stem == "test" or stem.startswith("test_"):
    return "test_module"
  if stem.endswith("_test") or stem == "conftest":
    return "test_module"
  mod_parts = module_name(relpath).split(".")
  if not all(p.isidentifier() for p in mod_parts):
    return "not_importable"
  if not include_private_modules and any(p.startswith("_") for p in mod_parts):
    return "private_module"
  return None


def module_split(module: str, splits=DEFAULT_SPLITS) -> str:
  """The split of ``module``: the first 8 bytes of SHA-256(name) as a fraction in [0, 1)."""
  u = int.from_bytes(hashlib.sha256(module.encode("utf-8")).digest()[:8], "big") / 2.0**64
  cumulative = 0.0
  for name, fraction in splits:
    cumulative += fraction
    if u < cumulative:
      return name
  return splits[-1][0]


def first_sentence(docstring: str) -> str:
  """The first sentence of a docstring's summary, whitespace normalised ('' if none).

  Leading lines that are only a call signature are skipped; the summary is the first
  paragraph after them; it ends at the first ``.``/``!``/``?`` followed by a space and a
  capital letter, digit, quote or bracket, except after ``e.g.``, ``i.e.``, ``cf.``, ``vs.``.
  """
  lines = docstring.strip().splitlines()
  while lines and (not lines[0].strip() or _SIGNATURE_RE.match(lines[0].strip())):
    lines.pop(0)
  paragraph = []
  for line in lines:
    if not line.strip():
      break
    paragraph.append(line.strip())
  text = " ".join(" ".join(paragraph).split())
  m = _SENTENCE_END_RE.search(text)
  return text[: m.end()] if m else text


def _name_words(name: str) -> set[str]:
  spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
  return set(re.findall(r"[a-z0-9]+", spaced.lower()))


def is_trivial(target: str, name: str, *, min_words: int = 3) -> bool:
  """True when a summary has fewer than ``min_words`` words or only repeats the name.

  "Only repeats the name": every word, apart from filler such as "return", "get", "the",
  is a word of the (snake_case or CamelCase) name, e.g. ``"Get the name."`` for ``get_name``.
  """
  words = re.findall(r"[a-z0-9]+", target.lower())
  if len(words) < min_words:
    return True
  content = [w for w in words if w not in _FILLER_WORDS]
  return all(w in _name_words(name) for w in content)


def strip_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """The source of ``node`` (decorators included, dedented) without its docstring.

  Args:
    lines: the module's source lines (no line endings), as parsed.
    node: a function whose first statement is its docstring.
  """
  start = min([d.lineno for d in node.decorator_list] + [node.lineno])
  seg = [ln.encode("utf-8") for ln in lines[start - 1 : node.end_lineno]]
  doc = node.body[0]
  a, b = doc.lineno - start, doc.end_lineno - start
  # ast column offsets count UTF-8 bytes.
  prefix, suffix = seg[a][: doc.col_offset], seg[b][doc.end_col_offset :]
  rest = suffix.lstrip()
  if rest.startswith(b";"):  # ``"""doc"""; x = 1`` keeps ``x = 1``
    suffix = rest[1:].lstrip()
  replacement = b"..." if len(node.body) == 1 else b""
  joined = prefix + replacement + suffix
  seg[a : b + 1] = [joined] if joined.strip() else []
  text = [s.decode("utf-8") for s in seg]
  indent = text[0][: len(text[0]) - len(text[0].lstrip())]
  out = [(ln[len(indent) :] if ln.startswith(indent) else ln).rstrip() for ln in text]
  return "\n".join(out).strip("\n")


def _walk_functions(body, prefix: str, private_scope: bool):
  """Yields ``(qualname, node, private_scope)`` for functions at module/class level, in order."""
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield prefix + node.name, node, private_scope
    elif isinstance(node, ast.ClassDef):
      yield from _walk_functions(
        node.body, f"{prefix}{node.name}.", private_scope or node.name.startswith("_")
      )
    else:  # if/try/with/for blocks at module or class level can define functions too
      for field in ("body", "orelse", "finalbody", "handlers"):
        sub = getattr(node, field, None)
        if isinstance(sub, list):
          yield from _walk_functions(sub, prefix, private_scope)


def extract_functions(source: str, module: str, options: ExtractOptions, excluded: dict) -> list:
  """Records for one module's source. Raises ``SyntaxError``/``ValueError`` if it fails to parse.

  ``excluded`` (reason -> count) is updated with every function skipped.
  """
  source = source.replace("\r\n", "\n").replace("\r", "\n")
  tree = ast.parse(source)
  lines = source.split("\n")
  records = []

  def skip(reason):
    excluded[reason] = excluded.get(reason, 0) + 1

  for qualname, node, private_scope in _walk_functions(tree.body, "", False):
    doc = ast.get_docstring(node, clean=True)
    if doc is None:
      continue
    if node.name.startswith("_") or private_scope:
      skip("private_function")
      continue
    if len(node.body) - 1 < options.min_body_statements:
      skip("docstring_only_body")
      continue
    target = first_sentence(doc)
    if not target or target.startswith(">>>"):  # no prose summary (e.g. a doctest first)
      skip("no_summary")
      continue
    if is_trivial(target, node.name, min_words=options.min_target_words):
      skip("trivial_docstring")
      continue
    if len(target) > options.max_target_chars:
      skip("target_too_long")
      continue
    text = strip_docstring(lines, node)
    if len(text) > options.max_input_chars:
      skip("input_too_long")
      continue
    try:
      ast.parse(text)
    except SyntaxError:
      skip("unparsable_after_strip")
      continue
    records.append(
      {"input": text, "target": target, "module": module, "name": qualname, "lineno": node.lineno}
    )
  return records


def _read_source(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
  return raw.decode(encoding)


def default_stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def extract_stdlib(stdlib_dir: str | None = None, options: ExtractOptions | None = None):
  """Extracts every split from a standard-library directory.

  Returns:
    ``(splits, metadata)``: ``splits`` maps each split name to its records in a fixed order;
    ``metadata`` holds the counts described in the module docstring.
  """
  options = options or ExtractOptions()
  stdlib_dir = os.path.abspath(stdlib_dir or default_stdlib_dir())
  if not os.path.isdir(stdlib_dir):
    raise FileNotFoundError(
      f"stdlib directory {stdlib_dir!r} does not exist; pass the directory holding the Python "
      "standard library (sysconfig.get_paths()['stdlib'])."
    )
  relpaths = []
  excluded: dict[str, int] = {}
  for root, dirs, files in os.walk(stdlib_dir):
    for d in dirs:
      if d in _SITE_DIRS:  # installed third-party packages: not standard library
        excluded["dir_site_packages"] = excluded.get("dir_site_packages", 0) + 1
    dirs[:] = sorted(d for d in dirs if d != "__pycache__" and d not in _SITE_DIRS)
    for f in files:
      if f.endswith(".py"):
        relpaths.append(os.path.relpath(os.path.join(root, f), stdlib_dir))
  relpaths.sort(key=lambda p: p.replace(os.sep, "/"))
  splits = {name: [] for name, _ in options.splits}
  modules = {name: set() for name, _ in options.splits}
  for rel in relpaths:
    reason = exclusion_reason(rel, include_private_modules=options.include_private_modules)
    if reason is not None:
      excluded[f"file_{reason}"] = excluded.get(f"file_{reason}", 0) + 1
      continue
    module = module_name(rel)
    try:
      records = extract_functions(
        _read_source(os.path.join(stdlib_dir, rel)), module, options, excluded
      )
    except (SyntaxError, ValueError, UnicodeDecodeError):
      excluded["file_parse_error"] = excluded.get("file_parse_error", 0) + 1
      continue
    if records:
      split = module_split(module, options.splits)
      splits[split].extend(records)
      modules[split].add(module)
  metadata = {
    "python_version": platform.python_version(),
    "python_implementation": platform.python_implementation(),
    "stdlib_dir": stdlib_dir,
    "options": dataclasses.asdict(options),
    "files_scanned": len(relpaths),
    "counts": {k: len(v) for k, v in splits.items()},
    "modules": {k: len(v) for k, v in modules.items()},
    "excluded": dict(sorted(excluded.items())),
  }
  return splits, metadata


@dataclasses.dataclass(eq=False)
class StdlibDocstringsConfig(tfds.core.BuilderConfig):
  """Which stdlib directory and options; the name hashes them with the Python version."""

  stdlib_dir: str = ""
  options: ExtractOptions = dataclasses.field(default_factory=ExtractOptions)


def make_config(stdlib_dir: str | None = None, **options: Any) -> StdlibDocstringsConfig:
  """A config for ``stdlib_dir`` (default: this interpreter's stdlib) and ExtractOptions."""
  stdlib_dir = os.path.abspath(stdlib_dir or default_stdlib_dir())
  opts = ExtractOptions(**options)
  payload = {
    "stdlib": stdlib_dir,
    "python": platform.python_version(),
    "options": dataclasses.asdict(opts),
  }
  return StdlibDocstringsConfig(
    name=base.config_name("py" + platform.python_version().replace(".", "_"), payload),
    stdlib_dir=stdlib_dir, options=opts,
  )  # fmt: skip


class StdlibDocstrings(base.LocalBuilder):
  """Python function source -> first sentence of its docstring (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "input": tfds.features.Text(),
          "target": tfds.features.Text(),
          "module": tfds.features.Text(),
          "name": tfds.features.Text(),
          "lineno": np.int32,
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config or make_config()
    splits, metadata = extract_stdlib(cfg.stdlib_dir, cfg.options)
    self.info.metadata.update(metadata)
    # TFDS cannot write an empty split; an empty one is simply absent (see `load_split`).
    return {name: self._generate_examples(recs) for name, recs in splits.items() if recs}

  def _generate_examples(self, records):
    for r in records:
      yield f"{r['module']}:{r['name']}:{r['lineno']}", r


def builder(
  *, data_dir: str | None = None, stdlib_dir: str | None = None, prepare: bool = True, **options
) -> StdlibDocstrings:
  """The (prepared, cached under ``data_dir``) builder for a stdlib directory and options."""
  b = StdlibDocstrings(
    config=make_config(stdlib_dir, **options),
    data_dir=data_dir or base.default_data_dir(),
    file_format="array_record",
  )
  return base.prepare(b) if prepare else b


def load_split(split: str, **kwargs):
  """A random-access source of records for ``split`` (prepares the dataset on first use).

  Args:
    split: ``train``, ``validation`` or ``test`` (or a TFDS slice such as ``train[:10%]``).
    **kwargs: passed to :func:`builder` (``data_dir``, ``stdlib_dir``, ExtractOptions fields).
  """
  b = builder(**kwargs)
  return base.data_source(b, split)
