"""Config: defaults < YAML < --key value overrides; unknown keys name the closest valid ones."""

import pytest

from fastrft.__main__ import main
from fastrft.config import load_config, parse_overrides
from fastrft.train import GRPOConfig


def test_precedence_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-3\nnum_generations: 4\nreward_funcs: [accuracy, format]\nepsilon_high: 0.28\n")
    cfg = load_config(GRPOConfig, str(path), ["--num_generations", "6", "--beta=0.04", "--dynamic_sampling",
                                              "--reward_weights", "[1, 0.5]", "--epsilon_high", "null"])
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.num_generations == 6 and cfg.beta == 0.04 and cfg.dynamic_sampling is True
    assert cfg.reward_funcs == ["accuracy", "format"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.epsilon_high is None
    assert load_config(GRPOConfig) == GRPOConfig()


def test_comma_lists_and_dashes():
    cfg = load_config(GRPOConfig, None, ["--synthetic-tasks", "colour,count", "--max-steps", "5", "--learning_rate",
                                         "1e-3"])
    assert cfg.synthetic_tasks == ["colour", "count"] and cfg.max_steps == 5 and cfg.learning_rate == 1e-3


@pytest.mark.parametrize("where", ["yaml", "cli"])
def test_unknown_key_names_closest(tmp_path, where):
    path = None
    args = []
    if where == "yaml":
        path = tmp_path / "c.yaml"
        path.write_text("learning_rat: 0.1\n")
        path = str(path)
    else:
        args = ["--num_generation", "4"]
    with pytest.raises(ValueError, match="did you mean") as e:
        load_config(GRPOConfig, path, args)
    assert ("'learning_rate'" if where == "yaml" else "'num_generations'") in str(e.value)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--num_generations", "abc"], "expected an integer"),
        (["--num_generations", "1"], "num_generations must be >= 2"),
        (["--loss_type", "ppo"], "loss_type must be one of"),
        (["--scale_rewards", "yes"], "scale_rewards must be one of"),
        (["--reward_weights", "[1, 2]"], "reward_weights has 2 entries"),
        (["--dynamic_sampling", "maybe"], "expected true/false"),
    ],
)
def test_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        load_config(GRPOConfig, None, args)


def test_overrides_syntax():
    assert parse_overrides(["--a", "1", "--b=x", "--c"]) == {"a": 1, "b": "x", "c": True}
    with pytest.raises(ValueError, match="expected --key value"):
        parse_overrides(["a", "1"])


def test_cli_reports_unknown_key(capsys, tmp_path):
    assert main(["train", "--output_dir", str(tmp_path / "run"), "--lerning_rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'lerning_rate'" in err and "'learning_rate'" in err
    assert not (tmp_path / "run").exists()  # nothing was written
    assert main(["fly"]) == 2
    assert main(["--help"]) == 0
    assert main(["train", "--help"]) == 0 and "--num_generations 8" in capsys.readouterr().out


def test_missing_config_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_config(GRPOConfig, "/nonexistent/c.yaml")
