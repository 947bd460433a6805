"""The command line (the issue's items 5 and 8): every error is one line with exit code 2
(--debug: the traceback), model names are checked before transformers sees them (a missing
folder, a typo, a run folder, no network: said at once), --help describes every key by group,
eval --help lists eval keys only, --version, lists take a,b and a single value."""

import subprocess
import sys
import time

import pytest

from fastrft import synthetic
from fastrft.__main__ import main
from fastrft.config import load_config
from fastrft.train import GRPOConfig


def _err(capsys, argv, rc=2):
    assert main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def test_errors_are_one_line_rc2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    out = str(tmp_path / "run")
    err = _err(capsys, ["train", "--dataset", "data/nope.jsonl", "--output_dir", out])
    assert "data/nope.jsonl" in err and "does not exist" in err
    err = _err(capsys, ["train", "--model", "./no_such_model", "--output_dir", out])
    assert "no such folder" in err and "tiny" in err
    t0 = time.perf_counter()
    err = _err(capsys, ["train", "--model", "tiyn", "--output_dir", out])
    assert "did you mean tiny" in err and time.perf_counter() - t0 < 5
    t0 = time.perf_counter()
    err = _err(capsys, ["train", "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--output_dir", out])
    assert "offline" in err and time.perf_counter() - t0 < 15
    run = tmp_path / "r"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny\n")
    err = _err(capsys, ["train", "--model", str(run), "--output_dir", out])
    assert "is a run folder" in err and "step-000002" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError):
        main(["train", "--dataset", "data/nope.jsonl", "--debug"])


def test_help_version_and_lists(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "rollouts:" in out and "  --max_completion_length null\n      None: 2 for the demo" in out
    assert "  --synthetic_tasks colour\n" in out and "  --dynamic_sampling false\n" in out
    assert "None\n" not in out and "[]" not in out
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--eval_dataset" in out and "--learning_rate" not in out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("fastrft 0.")
    cfg = load_config(GRPOConfig, None, ["--reward_weights", "2.0"])
    assert cfg.reward_weights == [2.0]
    cfg = load_config(GRPOConfig, None, ["--reward_funcs", "accuracy,format", "--reward_weights", "1,0.5"])
    assert cfg.reward_weights == [1.0, 0.5]
    assert _err(capsys, ["eval", "--learning_rate", "1"]).endswith("not an eval key (fastrft eval --help lists them)")


def test_console_script_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastrft", "train", "--max_stepz", "3"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "did you mean 'max_steps'" in p.stderr
    synthetic  # noqa: B018 (imported for the tiny model's vocabulary in other tests)
