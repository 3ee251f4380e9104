"""Multi-process runs (jax.distributed over gloo on 127.0.0.1) and preemption, via the binaries."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = [
  "--config=experiments/configs/mle.py", "--config.data.name=reverse",
  "--config.model.preset=tiny", "--config.model.vocab_size=32", "--config.model.max_len=32",
  "--config.data.input_len=8", "--config.data.target_len=9", "--config.train.batch_size=8",
  "--config.train.log_every=1", "--config.train.progress=False",
  "--config.optimizer.warmup_steps=0", "--config.optimizer.learning_rate=0.01",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # each process sets its own device count with --local_device_count
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(args, log, **kw):
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=log,
                          stderr=subprocess.STDOUT, **kw)


def _params(workdir):
  from slicjax import checkpoint

  params, step = checkpoint.load_params(workdir)
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(params)], step


@pytest.mark.slow
def test_two_processes_equal_one_process_over_the_same_global_batch(tmp_path):
  steps = ["--config.train.steps=6", "--config.train.checkpoint_every=3"]
  port = _free_port()
  logs = [open(tmp_path / f"p{i}.log", "w") for i in range(3)]
  procs = [
    _run(["experiments/train.py", *TRAIN_ARGS, *steps, f"--workdir={tmp_path / 'two'}",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
          "--local_device_count=2"], logs[i])
    for i in range(2)
  ]
  for p in procs:
    assert p.wait(timeout=300) == 0, open(tmp_path / "p0.log").read()[-3000:]
  one = _run(["experiments/train.py", *TRAIN_ARGS, *steps, f"--workdir={tmp_path / 'one'}",
              "--local_device_count=4"], logs[2])
  assert one.wait(timeout=300) == 0, open(tmp_path / "p2.log").read()[-3000:]
  two_params, s2 = _params(tmp_path / "two")
  one_params, s1 = _params(tmp_path / "one")
  assert s1 == s2 == 6
  for a, b in zip(two_params, one_params):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # only process 0 wrote metrics
  assert len(open(tmp_path / "two" / "metrics.jsonl").read().splitlines()) == 6


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path):
  steps = ["--config.train.steps=40", "--config.train.checkpoint_every=1000"]
  log = open(tmp_path / "run.log", "w")
  wd = tmp_path / "preempted"
  p = _run(["experiments/train.py", *TRAIN_ARGS, *steps, f"--workdir={wd}"], log)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.05)
  assert p.poll() is None, "training finished before it could be interrupted"
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=120) == 75  # slicjax.cli.EXIT_PREEMPTED: checkpoint written, rerun
  text = open(tmp_path / "run.log").read()
  assert "SIGTERM received: checkpoint written at step" in text
  stopped = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert 3 <= stopped < 40
  p = _run(["experiments/train.py", *TRAIN_ARGS, *steps, f"--workdir={wd}"], log)
  assert p.wait(timeout=300) == 0
  full = _run(["experiments/train.py", *TRAIN_ARGS, *steps, f"--workdir={tmp_path / 'full'}"],
              log)
  assert full.wait(timeout=300) == 0
  a, sa = _params(wd)
  b, sb = _params(tmp_path / "full")
  assert sa == sb == 40
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


CAND_ARGS = [
  "--config=experiments/configs/slic.py", "--config.data.name=reverse",
  "--config.model.preset=tiny", "--config.model.vocab_size=32", "--config.model.max_len=32",
  "--config.data.input_len=8", "--config.data.target_len=9", "--config.data.num_train=96",
  "--config.candidates.num_examples=96", "--config.candidates.chunk_size=8",
  "--config.candidates.batch_size=8", "--config.candidates.num_candidates=3",
  "--config.candidates.method=sample", "--config.candidates.similarity=token_embedding",
  "--config.candidates.progress=False",
]


def _read_set(d):
  from slicjax.pipelines import candidates

  return [(r["index"], r["candidates"], [round(x, 4) for x in r["logp"]]) for r in
          candidates.read_candidates(str(d))]


@pytest.mark.slow
def test_two_process_candidates_survive_a_kill_and_match_one_process(tmp_path):
  log = open(tmp_path / "log.txt", "w")
  ft = tmp_path / "ft"
  p = _run(["experiments/train.py", *TRAIN_ARGS, "--config.train.steps=10",
            f"--workdir={ft}"], log)
  assert p.wait(timeout=300) == 0
  args = [*CAND_ARGS, f"--config.candidates.finetuned_workdir={ft}"]

  def two(out, port):
    return [_run(["experiments/generate_candidates.py", *args, f"--workdir={out}",
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={i}", "--local_device_count=1"], log) for i in range(2)]

  out = tmp_path / "two"
  procs = two(out, _free_port())
  deadline = time.time() + 240
  while time.time() < deadline and len(list(out.glob("chunk-*.jsonl"))) < 3:
    assert all(q.poll() is None for q in procs), open(tmp_path / "log.txt").read()[-3000:]
    time.sleep(0.05)
  for q in procs:  # kill both mid-way (a crashed job): only complete chunks remain
    q.kill()
    q.wait()
  written = sorted(out.glob("chunk-*.jsonl"))
  assert 0 < len(written) < 12, len(written)
  procs = two(out, _free_port())
  for q in procs:
    assert q.wait(timeout=300) == 0, open(tmp_path / "log.txt").read()[-3000:]
  one = _run(["experiments/generate_candidates.py", *args, f"--workdir={tmp_path / 'one'}"], log)
  assert one.wait(timeout=300) == 0
  a, b = _read_set(out), _read_set(tmp_path / "one")
  assert len(a) == len(b) == 96
  assert a == b
  assert not list(out.glob("*.tmp*"))
