"""The binaries' persistent compilation cache (config key ``compilation_cache``)."""

import os
import subprocess
import sys
import textwrap

from slicjax.pipelines import common

_SCRIPT = textwrap.dedent(
  """
  import sys
  import jax, jax.numpy as jnp
  from slicjax.pipelines import common
  path = common.enable_compilation_cache({"compilation_cache": sys.argv[1]})
  assert path == sys.argv[1], path
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((4, 4))).sum()))
  """
)


def _run(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(
    [sys.executable, "-c", _SCRIPT, cache_dir], capture_output=True, text=True, env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip()


def test_programs_are_written_and_reused(tmp_path):
  cache = str(tmp_path / "xla_cache")
  first = _run(cache)
  entries = sorted(os.listdir(cache))
  assert entries, "no compiled program was written to the cache directory"
  second = _run(cache)  # loads from the cache: same result, no new entry for the same program
  assert second == first
  assert sorted(os.listdir(cache)) == entries


def test_off_and_default(monkeypatch, tmp_path):
  assert common.enable_compilation_cache({"compilation_cache": "off"}) is None
  assert common.enable_compilation_cache({"compilation_cache": ""}) is None
  monkeypatch.setenv("SLICJAX_CACHE_DIR", str(tmp_path))
  assert common.compilation_cache_dir() == os.path.join(str(tmp_path), "jax_compilation")


def test_unwritable_directory_turns_cache_off(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  assert common.enable_compilation_cache({"compilation_cache": str(blocker / "sub")}) is None
