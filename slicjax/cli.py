"""What every ``experiments/`` binary shares: ``--helpconfig``, required flags and exit codes.

A binary defines its flags (``--config`` with :func:`define_config_file`), then ends with
``cli.run(main, config=_CONFIG, required=["workdir"])`` instead of ``app.run(main)``:

* ``--helpconfig`` prints every key of the binary's config (after any ``--config.*``
  overrides) with its value and one line of meaning (:mod:`slicjax.config_help`) and exits 0
  before ``main`` runs: no device is initialized and no model or data is touched. The required
  flags are not required with it.
* Exit codes (:data:`EXIT_CODES`): 0 done; 1 failed (an exception, or a usage error);
  75 (``EX_TEMPFAIL``) preempted: SIGTERM stopped training after a checkpoint was written
  (:class:`slicjax.training.Preempted`), or stopped a resumable job elsewhere (start-up,
  between atomic output chunks); rerun the same command to resume.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): temporary failure, try again
EXIT_CODES = {
  EXIT_OK: "done",
  EXIT_FAILURE: "failed (error message above), or a usage error",
  EXIT_PREEMPTED: "preempted by SIGTERM after writing a checkpoint / its finished chunks; "
  "rerun the same command to resume",
}

USAGE_EPILOG = (
  "\n--helpconfig lists every config key with its default and meaning.\n"
  "Exit status: 0 done; 1 failed or usage error; 75 preempted by SIGTERM (checkpoint written:"
  " rerun the same command to resume).\n"
)

# The flags below are attributed to the binary that calls define_flags (so --help lists them).
flags.disclaim_key_flags()


class Terminated(BaseException):  # like KeyboardInterrupt: not swallowed by `except Exception`
  """SIGTERM arrived while a resumable job (``resumable_on_sigterm``) ran outside a training
  loop."""


def define_flags():
  """Defines ``--helpconfig`` (idempotent); :func:`run` calls it."""
  if "helpconfig" not in flags.FLAGS:
    flags.DEFINE_bool(
      "helpconfig", False,
      "Print every config key (after --config.* overrides) with its default and meaning, "
      "then exit 0 without running anything.",
    )


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated("SIGTERM received")


def run(
  main: Callable[[list[str]], object],
  *,
  config=None,
  describe: Callable[[], str] | None = None,
  required: Sequence[str] = (),
  resumable_on_sigterm: bool = False,
):
  """``app.run(main)`` with ``--helpconfig``, ``required`` flags and the exit codes above.

  Args:
    main: the binary's main; it runs unless ``--helpconfig`` is given.
    config: the ``config_flags`` holder of ``--config`` whose keys ``--helpconfig`` prints.
    describe: instead of ``config``: returns the ``--helpconfig`` text.
    required: flags that must be set (except with ``--helpconfig``).
    resumable_on_sigterm: a rerun of the job resumes (training checkpoints, or output in
      atomic chunks whose finished ones a rerun skips): SIGTERM outside a training loop (start-up,
      compilation, decoding, the final report) then stops it at once with exit code 75 instead
      of killing it by the signal. Inside the loop the loop's own handler checkpoints first.
  """
  define_flags()
  main_module = sys.modules["__main__"]
  if USAGE_EPILOG not in (main_module.__doc__ or ""):
    main_module.__doc__ = (main_module.__doc__ or "") + USAGE_EPILOG
  for name in required:
    flags.register_multi_flags_validator(
      [name, "helpconfig"], lambda d, name=name: d["helpconfig"] or d[name] is not None,
      message=f"--{name} is required (except with --helpconfig).",
    )

  def wrapped(argv):
    _check_config_loaded(config)
    if flags.FLAGS.helpconfig:
      print(help_text(config=config, describe=describe), end="")
      return EXIT_OK
    return run_main(main, argv, resumable_on_sigterm=resumable_on_sigterm)

  app.run(wrapped, flags_parser=_parse_flags)


def parse_overrides(items, flag: str = "--set") -> dict:
  """``["a.b=1", "c.d=x"]`` -> ``{"a.b": 1, "c.d": "x"}``: values are Python literals, a bare
  word is a string.

  Raises:
    ValueError: an item without ``=`` or without a ``section.key`` name, naming the item.
  """
  import ast

  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
      raise ValueError(f"{flag}={item!r}: expected section.key=value, e.g. "
                       f"{flag}=reward.steps=200.")
    try:
      out[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key] = value.strip()
  return out


def define_config_file(name: str, default: str, help_string: str):
  """``config_flags.DEFINE_config_file`` whose override errors are usage errors: without
  ``--config`` on the command line ml_collections loads the default file (and applies the
  ``--config.<key>`` overrides) right here, at definition."""
  from ml_collections import config_flags

  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError) as e:
    _override_error(e)


def _check_config_loaded(config):
  """A ``--config`` file that is missing or fails to import is a one-line usage error (exit
  1) naming the file and the cause, not a traceback from the first key the job reads."""
  if config is None:
    return
  try:
    config.value.keys()
  except OSError as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if ln.startswith("[Errno") or "Error" in ln.split(":")[0]),
                 lines[-1] if lines else str(e))
    from ml_collections import config_flags

    path = config_flags.get_config_filename(flags.FLAGS[config.name])
    sys.stderr.write(
      f"FATAL Flags parsing error: --{config.name}={path} could not be loaded ({cause}); pass "
      "an existing config file, e.g. --config=experiments/configs/mle.py (relative paths "
      "start at the working directory).\n"
    )
    sys.exit(EXIT_FAILURE)


def _override_error(e: BaseException):
  sys.stderr.write(
    f"FATAL Flags parsing error: {_message(e)}\n(a --config.<key> override names a key the "
    "config does not have; --helpconfig lists every key)\n"
  )
  sys.exit(EXIT_FAILURE)


def _message(e: BaseException) -> str:
  while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def _parse_flags(argv):
  """absl's parser, plus a usage error (not a traceback) for a ``--config.<key>`` override of
  a key the config does not have (ml_collections raises AttributeError / KeyError)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    if not any(a.lstrip("-").partition("=")[0].count(".") for a in argv[1:]):
      raise
    _override_error(e)


def help_text(*, config=None, describe: Callable[[], str] | None = None) -> str:
  """The ``--helpconfig`` text of a binary (see :func:`run`)."""
  if describe is not None:
    return describe()
  if config is None:
    return "This binary has no config.\n"
  from ml_collections import config_flags

  from slicjax import config_help

  path = config_flags.get_config_filename(flags.FLAGS[config.name])
  return config_help.describe(
    config.value, title=f"Config {path} (set any key with --{config.name}.<key>=<value>):",
    prefix=f"--{config.name}.",
  )


def run_main(main, argv, *, resumable_on_sigterm: bool = False) -> int:
  """Runs ``main(argv)``; returns its exit code, :data:`EXIT_PREEMPTED` on preemption."""
  from slicjax import training

  old = signal.signal(signal.SIGTERM, _raise_terminated) if resumable_on_sigterm else None
  try:
    out = main(argv)
  except training.Preempted as e:  # the training loop wrote a checkpoint first
    logging.warning("%s (exit code %d)", e, EXIT_PREEMPTED)
    return EXIT_PREEMPTED
  except Terminated:
    logging.warning(
      "SIGTERM received: stopped; checkpoints and finished chunks are on disk, rerun the same "
      "command to resume (exit code %d).", EXIT_PREEMPTED,
    )
    return EXIT_PREEMPTED
  finally:
    if old is not None:
      signal.signal(signal.SIGTERM, old)
  return EXIT_OK if out is None else out
