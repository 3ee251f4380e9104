"""Test set-up: 8 simulated CPU devices and strict rank promotion, before jax is imported; one
JAX compilation cache per test session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite compiles thousands of tiny programs and runs each a few times, so LLVM's code
# optimization is mostly wasted: at level 0 compile-bound tests took 15-20% less time on this
# 2-core machine, the SmolLM2 tests (run-time bound) took the same, and the whole suite took
# 14 min 22 s against 17 min 35 s at the default level 3 (README).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A fresh persistent compilation cache for this session, shared by the xdist workers (they
# inherit the variable from the controller): tests that build the same small models reuse each
# other's compiled programs, the binaries' default cache (SLICJAX_CACHE_DIR) points here too, so
# nothing is read from or written to ~/.cache, and every run starts cold, as on CI.
if "SLICJAX_CACHE_DIR" not in os.environ:
  os.environ["SLICJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="slicjax-tests-")
  atexit.register(shutil.rmtree, os.environ["SLICJAX_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
jax.config.update(
  "jax_compilation_cache_dir", os.path.join(os.environ["SLICJAX_CACHE_DIR"], "jax_compilation")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
