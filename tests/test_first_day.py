"""A real user's first day (the issue's items 1-4, 6, 7, 9, 10): one source of defaults, real-data
defaults, rows checked before the run folder exists, eval and resume read the run's config,
the run-folder rule, the plots and TensorBoard, the stop-learning reward, the small ones.
Runs are 1-3 steps of the tiny model on a few rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastrft import rewards, runs, synthetic
from fastrft.__main__ import main
from fastrft.config import load_config
from fastrft.metrics import read_metrics
from fastrft.train import GRPOConfig, train

FAST = ["--max_steps", "2", "--prompts_per_step", "4", "--num_generations", "4", "--train_size", "64",
        "--eval_size", "8", "--save_steps", "0", "--progress", "false", "--warmup_steps", "0"]


def _data(tmp_path, n=40, name="train"):
    return synthetic.write_jsonl(synthetic.make_split(n, seed=5), tmp_path / "data", name)


# 1. one source of defaults; real-data defaults
def test_bare_train_is_the_demo_and_the_yaml_says_the_same():
    assert load_config(GRPOConfig, "configs/shapes.yaml") == GRPOConfig()
    cfg = GRPOConfig()
    assert (cfg.synthetic_tasks, cfg.max_steps, cfg.max_completion_length, cfg.reward_funcs, cfg.accuracy_reward,
            cfg.output_dir) == (["colour"], 250, 2, ["shapes"], "shapes", "runs/shapes")
    assert "fastrft train --overwrite true" in Path("scripts/train.sh").read_text()


def test_real_data_defaults(tmp_path):
    path = _data(tmp_path)
    cfg = GRPOConfig(dataset=str(path), reward_funcs=["accuracy", "format"])
    assert cfg.max_completion_length == 256 and cfg.accuracy_reward == "accuracy"
    assert cfg.output_dir == "runs/train"
    assert GRPOConfig(dataset=str(path), reward_funcs=["format"]).accuracy_reward == "format"
    train_rows = __import__("fastrft.train", fromlist=["_train_rows"])._train_rows(cfg)
    eval_rows = __import__("fastrft.train", fromlist=["_eval_rows"])._eval_rows(cfg)
    assert len(eval_rows) == 4 and len(train_rows) == 36  # 10% held out, disjoint
    assert not {r.where for r in train_rows} & {r.where for r in eval_rows}


def test_unk_warning_and_thread_choice(tmp_path, capsys):
    path = tmp_path / "words.jsonl"
    path.write_text(json.dumps({"problem": "Quelle est la couleur du carré dessiné ici", "solution": "rouge"}) + "\n")
    processor = synthetic.make_processor()
    cfg = GRPOConfig(dataset=str(path))
    runs.check_rows(__import__("fastrft.data", fromlist=["x"]).load_rows(str(path)), processor, cfg, "dataset")
    assert "are <unk>" in capsys.readouterr().err
    assert runs.choose_threads(cfg, synthetic.make_model(processor)) == 1
    assert runs.choose_threads(GRPOConfig(num_threads=3), None) == 3


# 2. bad rows: found before the run folder, named FILE:LINE, optionally skipped
def _bad_data(tmp_path):
    folder = tmp_path / "bad"
    path = synthetic.write_jsonl(synthetic.make_split(20, seed=1), folder, "train")
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"image": "images/broken.png", "problem": "what colour is the square ?", "solution": "red"})
    lines[4] = json.dumps({"problem": "what colour is the square ? " * 40, "solution": "red",
                           "image": "images/train-00000.png"})
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line: line 6 is row 5
    return path


def test_bad_rows_named_by_file_line_before_the_run_folder(tmp_path):
    path = _bad_data(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train.jsonl:3: cannot read image .*2 bad rows"):
        train(load_config(GRPOConfig, None, [*FAST, "--dataset", str(path), "--output_dir", str(out),
                                              "--max_prompt_length", "64"]))
    assert not out.exists()
    res = train(load_config(GRPOConfig, None, [*FAST, "--dataset", str(path), "--output_dir", str(out),
                                               "--max_prompt_length", "64", "--skip_bad_rows", "true",
                                               "--max_completion_length", "2", "--max_steps", "1"]))
    data = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "data"][0]
    assert data["train_skipped"] + data.get("eval_skipped", 0) == 2
    assert any("train.jsonl:6: the prompt is" in b for b in data["bad"])
    assert res["after"] is not None


# 3 and 4. eval and resume read the run's config; 6. the run-folder rule; 7. plots, TensorBoard
def test_eval_and_resume_follow_the_run(tmp_path, capsys):
    out = tmp_path / "r2"
    args = [*FAST, "--output_dir", str(out), "--synthetic_tasks", "position", "--eval_size", "12",
            "--save_steps", "1", "--report_to", "tensorboard"]
    assert main(["train", *args]) == 0
    # 3: eval of the run folder evaluates what the run evaluated (position only, its lengths)
    capsys.readouterr()
    assert main(["eval", "--model", str(out)]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out[cap.out.index("{"):])
    assert set(res) == {"accuracy", "n", "accuracy/position"} and res["n"] == 12
    assert "synthetic shapes held-out split (tasks position)" in cap.err and "config.yaml" in cap.err
    after = json.loads((out / "summary.json").read_text())["after"]
    assert res["accuracy"] == after["accuracy"]
    # 4: resume with only --max_steps; a changed dataset and a spent max_steps are errors
    before_yaml = (out / "config.yaml").read_text()
    assert main(["train", "--output_dir", str(out), "--resume", "true", "--max_steps", "2"]) == 2
    assert "at step 2" in capsys.readouterr().err and (out / "config.yaml").read_text() == before_yaml
    assert main(["train", "--output_dir", str(out), "--resume", "true", "--max_steps", "3",
                 "--synthetic_tasks", "colour"]) == 2
    assert "synthetic_tasks: ['position'] -> ['colour']" in capsys.readouterr().err
    assert main(["train", "--output_dir", str(out), "--resume", "true", "--max_steps", "3"]) == 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3]
    # 6: a second fresh run in the folder needs --overwrite
    assert main(["train", *args]) == 2
    assert "--overwrite true" in capsys.readouterr().err
    # 7: tensorboard event files, readable; curves.png written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/reward")] == [1, 2, 3]
    assert "eval/accuracy" in acc.Tags()["scalars"]
    assert (out / "curves.png").stat().st_size > 10_000


def test_curves_autoscale(tmp_path):
    from fastrft.metrics import MetricsLog, plot_curves

    log = MetricsLog(tmp_path)
    for s in range(1, 5):
        log.log({"kind": "train", "step": s, "reward": -1.5 * s, "rewards/a": -s, "rewards/b": 2.0 * s, "loss": 0.1})
    log.close()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    orig = plt.Figure.savefig

    def grab(fig, *a, **k):
        seen["ylim"] = fig.axes[0].get_ylim()
        seen["title"] = fig._suptitle.get_text()
        return orig(fig, *a, **k)

    plt.Figure.savefig = grab
    try:
        plot_curves(tmp_path)
    finally:
        plt.Figure.savefig = orig
    lo, hi = seen["ylim"]
    assert lo < -6 and hi > 8 and tmp_path.name in seen["title"]


# 9. the demo must stop: the shapes reward pays for the word and, on its own, for the stop after it
def test_shapes_reward_requires_the_stop():
    eos = synthetic.EOS_ID
    got = rewards.shapes(["red", "red", "red green", "blue", "blue", "circle"], ["red"] * 6,
                         completion_ids=[[10, eos], [10, 11], [10, 11], [12, eos], [12, 4], [9, eos]])
    assert got == [1.0, 0.5, 0.5, 0.6, 0.1, 0.5]  # only the right word, then stop, makes 1


# 10. the progress bar in a log file; no FutureWarning per rollout; dynamic sampling skips
def test_progress_bar_in_a_log_file_and_no_future_warning(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-W", "always::FutureWarning", "-m", "fastrft", "train", *FAST,
                              "--max_steps", "3", "--progress", "true", "--output_dir", str(tmp_path / "r")],
                             stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert text.count("grpo:") <= 3, text  # start, end (+ at most one 10 s frame)
    assert "past_key_values" not in text


def test_dynamic_sampling_with_no_signal_skips_the_update(tmp_path, monkeypatch):
    import fastrft.train as train_mod

    monkeypatch.setitem(rewards.BUILTIN, "flat", lambda completions, **_: [0.5] * len(completions))
    out = tmp_path / "d"
    train(load_config(GRPOConfig, None, [*FAST, "--output_dir", str(out), "--reward_funcs", "flat",
                                          "--dynamic_sampling", "true", "--eval_size", "0"]))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["groups_kept"] for r in rows] == [0, 0] and rows[-1]["updates_skipped"] == 2
    assert train_mod is not None
