"""The binaries' command line: --helpconfig, model-field overrides and exit codes (slicjax.cli)."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from slicjax import cli, config_help, training
from slicjax.models import diffusion_seq, factory
from slicjax.pipelines import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: f"experiments/configs/{name}.py" for name in ("mle", "slic", "preference")}
# Each binary and its default config (None: the binary builds its config itself).
BINARIES = {
  "train": "mle", "calibrate": "slic", "decode": "slic", "evaluate": "slic",
  "generate_candidates": "slic", "rso_sample": "preference", "train_preference": "preference",
  "train_reward": "preference", "demo": None, "export": None, "preference_study": None,
}


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # one CPU device: the cheapest start
  return env


# Runs a binary as __main__ without TensorBoard output: tensorboardX imports torch, ~5 s of a
# start on a loaded CPU (MetricWriter treats the ImportError as "no TensorBoard").
_NO_TENSORBOARD = (
  "import runpy, sys; sys.modules['tensorboardX'] = None; sys.argv = sys.argv[1:]; "
  "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _popen(binary, *args):
  return subprocess.Popen(
    [sys.executable, "-c", _NO_TENSORBOARD, os.path.join("experiments", f"{binary}.py"), *args],
    cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


# Runs each binary as __main__ (its real code path: cli.run -> app.run) in a child forked from
# one process that imported jax and the pipelines once: a fresh interpreter per binary would pay
# those imports ten times over. Prints one JSON line per run.
_FORK_RUNNER = r"""
import json, os, runpy, sys, tempfile
import absl.app, ml_collections.config_flags
import slicjax.cli, slicjax.config_help, slicjax.distributed
for m in ("mle", "calibrate", "candidates", "evaluate", "rso", "reward", "preference",
          "gold_experiment", "demo", "common"):
  __import__("slicjax.pipelines." + m)
import slicjax.interop.hf_export
root, runs = sys.argv[1], json.loads(sys.argv[2])
for name, argv in runs.items():
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  sys.stdout.flush(); sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
    code = 0
    try:
      sys.argv = [os.path.join("experiments", argv[0] + ".py"), *argv[1:]]
      runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    except BaseException:
      import traceback; traceback.print_exc(); code = 1
    try:  # did the run start a JAX backend (devices)?
      from jax._src import xla_bridge
      print(f"\nJAX_BACKENDS={len(xla_bridge._backends)}", file=sys.stderr)
    except (ImportError, AttributeError):
      print("\nJAX_BACKENDS=?", file=sys.stderr)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  out.seek(0); err.seek(0)
  print(json.dumps([name, os.waitstatus_to_exitcode(status), out.read(), err.read()]))
"""


@pytest.fixture(scope="module")
def helpconfig_runs():
  """``{name: (exit code, stdout, stderr)}``: ``--helpconfig`` of every binary, and usage."""
  runs = {b: [b, "--helpconfig"] for b in BINARIES}
  runs["train --config.model.num_layers=2"] = [
    "train", "--helpconfig", "--config.model.num_layers=2", "--config.model.family=ssm"
  ]
  runs["demo --set"] = ["demo", "--helpconfig", "--preset=smoke", "--set=train.steps=7"]
  runs["train --help"] = ["train", "--help"]
  runs["train (no --workdir)"] = ["train"]
  runs["train (typo)"] = ["train", "--workdir=/nonexistent", "--config.model.num_layer=2"]
  runs["train (no config file)"] = ["train", "--workdir=/nonexistent",
                                    "--config=experiments/configs/nope.py"]
  p = subprocess.run([sys.executable, "-c", _FORK_RUNNER, ROOT, json.dumps(runs)], cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  out = {}
  for line in p.stdout.splitlines():
    name, rc, stdout, stderr = json.loads(line)
    out[name] = (rc, stdout, stderr)
  assert set(out) == set(runs), p.stderr[-3000:]
  return out


def _load_config(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, CONFIGS[name]))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flat_keys(d, prefix=""):
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out += _flat_keys(v, f"{prefix}{k}.")
    else:
      out.append(f"{prefix}{k}")
  return out


def _setting_lines(text, prefix):
  """``{dotted key: value text}`` of the ``<prefix><key>=<value>  <meaning>`` lines."""
  out = {}
  for line in text.splitlines():
    m = re.match(r"  %s([A-Za-z_][\w.]*)=(.*?)(  |$)" % re.escape(prefix), line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


# ------------------------------------------------------------------------------------------
# Descriptions cannot drift from the checked key tables


def test_every_checked_key_has_a_description():
  for section, (keys, docs) in config_help.section_tables().items():
    missing, stale = sorted(set(keys) - set(docs)), sorted(set(docs) - set(keys))
    assert not missing, f"config_help: no description for {section}.{missing}"
    assert not stale, f"config_help: {section}.{stale} described but no longer checked"
    assert all(doc.strip() for doc in docs.values())


def test_model_keys_cover_every_family():
  keys = factory.model_keys()  # raises when a key has two types
  for family, fam_keys in factory.family_keys().items():
    assert set(fam_keys) <= set(keys), family
  assert set(factory.DIFFUSION_KEY_TYPES) == set(diffusion_seq.ADAPTER_KEYS)
  for name in ("num_layers", "n_layers", "d_state", "schedule", "num_elbo_samples", "rope_theta"):
    assert name in keys


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_files_hold_every_model_key_and_describe_every_key(name):
  config = _load_config(name)
  for section in ("model", "reward_model"):
    if section in config:
      assert set(config[section]) == set(factory.model_keys()), section
  text = config_help.describe(config)
  assert config_help.UNDOCUMENTED not in text
  assert set(_setting_lines(text, "--config.")) == set(_flat_keys(config.to_dict()))


# ------------------------------------------------------------------------------------------
# --helpconfig of every binary (subprocesses)


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_helpconfig_lists_every_key(helpconfig_runs, binary):
  rc, stdout, stderr = helpconfig_runs[binary]
  assert rc == 0, stderr[-3000:]
  assert "JAX_BACKENDS=0" in stderr or "JAX_BACKENDS=?" in stderr  # no device was started
  assert config_help.UNDOCUMENTED not in stdout
  if binary == "export":
    listed = _setting_lines(stdout, "")
    assert set(listed) == {f"model.{k}" for k in factory.model_keys()}
    return
  if binary == "demo":
    from slicjax.pipelines import demo

    expected = demo.build_config("default").to_dict()
    expected["model"] = dict.fromkeys(factory.model_keys())
    listed = _setting_lines(stdout, "--set=")
  elif binary == "preference_study":
    from slicjax.pipelines import gold_experiment

    expected = gold_experiment.experiment_config("default").to_dict()
    listed = _setting_lines(stdout, "--set=")
  else:
    expected = _load_config(BINARIES[binary]).to_dict()
    listed = _setting_lines(stdout, "--config.")
  missing = sorted(set(_flat_keys(expected)) - set(listed))
  assert not missing, f"{binary} --helpconfig does not list {missing}"
  assert set(listed) == set(_flat_keys(expected))


def test_helpconfig_shows_overrides_and_usage(helpconfig_runs):
  rc, stdout, stderr = helpconfig_runs["train --config.model.num_layers=2"]
  assert rc == 0, stderr[-3000:]
  listed = _setting_lines(stdout, "--config.")
  assert listed["model.num_layers"] == "2" and listed["model.family"] == "'ssm'"
  assert listed["model.d_state"] == "unset (=16)"  # the ssm family's default
  rc, stdout, stderr = helpconfig_runs["demo --set"]
  assert rc == 0, stderr[-3000:]
  assert _setting_lines(stdout, "--set=")["train.steps"] == "7"
  rc, stdout, stderr = helpconfig_runs["train --help"]
  assert "--helpconfig" in stdout and "75" in stdout
  rc, stdout, stderr = helpconfig_runs["train (no --workdir)"]
  assert rc == 1 and "--workdir is required" in stderr
  rc, stdout, stderr = helpconfig_runs["train (typo)"]
  assert rc == 1 and "num_layers" in stderr and "--helpconfig" in stderr
  assert "Traceback" not in stderr
  rc, stdout, stderr = helpconfig_runs["train (no config file)"]
  assert rc == 1 and "Traceback" not in stderr, stderr[-2000:]
  assert re.search(r"--config=experiments/configs/nope\.py could not be loaded \(\[Errno 2\] "
                   r"No such file or directory.*pass an existing config file", stderr), stderr


# ------------------------------------------------------------------------------------------
# Every model field can be overridden from the command line


def _parse(config_name, *overrides):
  argv = ["prog", f"--config={os.path.join(ROOT, CONFIGS[config_name])}", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return holder.value


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_field_overrides(name):
  config = _parse(name, "--config.model.num_layers=2", "--config.model.rope_theta=500",
                  "--config.model.remat", "--config.model.mlp=gelu")
  assert config.model.num_layers == 2
  model = common.model_from(config)
  cfg = model.module.cfg
  assert (cfg.num_layers, cfg.rope_theta, cfg.remat, cfg.mlp) == (2, 500.0, True, "gelu")
  assert cfg.d_model == factory.PRESETS["small"]["d_model"]  # an unset key: the preset's value
  if name == "preference":
    config = _parse(name, "--config.reward_model.num_layers=1")
    assert factory.build_model(config.reward_model).module.cfg.num_layers == 1


def test_model_overrides_of_other_families():
  config = _parse("mle", "--config.model.family=ssm", "--config.model.d_state=8",
                  "--config.model.variant=s5", "--config.model.num_layers=1")
  module = factory.build_model(config.model).module
  assert (module.config.d_state, module.config.variant, module.config.n_layers) == (8, "s5", 1)
  config = _parse("mle", "--config.model.family=diffusion", "--config.model.num_elbo_samples=2",
                  "--config.model.schedule=cosine")
  model = factory.build_model(config.model)
  assert model.num_elbo_samples == 2 and model.lm.schedule.kind == "cosine"
  config = _parse("mle", "--config.model.family=ssm", "--config.model.num_encoder_layers=1",
                  "--config.model.encoder_position=rope")
  assert factory.build_model(config.model).module.config.encoder_position == "rope"


def test_effective_model_config_resolves_unset_keys():
  config = _parse("mle", "--config.model.d_model=96")
  eff = factory.effective_model_config(config.model)
  assert (eff["d_model"], eff["num_layers"], eff["rope_theta"]) == (96, 3, 10000.0)
  eff = factory.effective_model_config(dict(family="ssm", preset="tiny", num_layers=1))
  assert (eff["n_layers"], eff["d_state"]) == (1, 16)


def test_model_typos_still_fail():
  with pytest.raises((AttributeError, KeyError), match="num_layer"):  # cli.run: a usage error
    _parse("mle", "--config.model.num_layer=2")
  with pytest.raises(ValueError, match="num_layer"):
    factory.build_model(dict(family="transformer", num_layer=2))
  with pytest.raises(ValueError, match="only apply to the SSM encoder-decoder"):
    factory.build_model(factory.model_config(family="ssm", d_ff=64))


# ------------------------------------------------------------------------------------------
# Exit codes


def test_run_main_exit_codes():
  assert cli.run_main(lambda argv: None, []) == cli.EXIT_OK

  def preempted(argv):
    raise training.Preempted("checkpoint written")

  assert cli.run_main(preempted, []) == cli.EXIT_PREEMPTED == 75

  def sigterm(argv):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises at the next bytecode
    return 0

  before = signal.getsignal(signal.SIGTERM)
  assert cli.run_main(sigterm, [], resumable_on_sigterm=True) == cli.EXIT_PREEMPTED
  assert signal.getsignal(signal.SIGTERM) is before

  def fails(argv):
    raise ValueError("bad")

  with pytest.raises(ValueError):
    cli.run_main(fails, [])


def _train_args(workdir, steps):
  return [
    f"--workdir={workdir}", "--config.data.name=reverse", "--config.data.num_train=64",
    "--config.data.num_eval=8", "--config.data.input_len=6", "--config.data.target_len=7",
    "--config.data.synthetic_vocab=16", "--config.model.preset=tiny",
    "--config.model.num_layers=1", "--config.model.vocab_size=16", "--config.model.max_len=16",
    f"--config.train.steps={steps}", "--config.train.batch_size=4", "--config.train.log_every=1",
    "--config.train.checkpoint_every=1000000", "--config.train.progress=false",
  ]


def _train_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip().endswith("}")]
  return [r["step"] for r in lines if r["split"] == "train"]


def test_sigterm_exits_75_and_rerun_resumes(tmp_path):
  wd = str(tmp_path / "run")
  p = _popen("train", *_train_args(wd, steps=10**6))
  deadline = time.time() + 240
  while not _train_steps(wd):  # the loop is running: SIGTERM now means checkpoint-and-exit
    assert p.poll() is None, p.communicate()[1][-3000:]
    assert time.time() < deadline, "no training step within 240 s"
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  _, stderr = p.communicate(timeout=240)
  assert p.returncode == cli.EXIT_PREEMPTED, stderr[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert saved, os.listdir(os.path.join(wd, "checkpoints"))
  step = saved[-1]
  p = _popen("train", *_train_args(wd, steps=step + 2))
  _, stderr = p.communicate(timeout=240)
  assert p.returncode == cli.EXIT_OK, stderr[-3000:]
  steps = _train_steps(wd)
  assert steps[-2:] == [step + 1, step + 2] and steps.count(1) == 1  # resumed, not restarted


def test_parse_overrides_reads_literals_and_names_bad_items():
  got = cli.parse_overrides(["reward.steps=200", "human.min_gold_gap=0.01", "data.name=stdlib",
                             "experiment.losses=('hinge', 'ipo')", "train.progress=False"])
  assert got == {"reward.steps": 200, "human.min_gold_gap": 0.01, "data.name": "stdlib",
                 "experiment.losses": ("hinge", "ipo"), "train.progress": False}
  with pytest.raises(ValueError, match="--set='steps=3': expected section.key=value"):
    cli.parse_overrides(["steps=3"])
  with pytest.raises(ValueError, match="expected section.key=value"):
    cli.parse_overrides(["reward.steps"])
