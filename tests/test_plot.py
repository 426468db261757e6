"""`python -m dpo.plot`: which figures a run gets, overlaid runs, torn logs, errors, and a missing matplotlib."""

import json
import sys

import pytest

from dpo import plot
from dpo.errors import RunDirError

DPO_FIGURES = ["loss.png", "rewards.png", "accuracy.png", "logps.png", "judge.png", "overview.png"]
SFT_FIGURES = ["loss.png", "logps.png", "overview.png"]


@pytest.fixture
def needs_matplotlib():
    return pytest.importorskip("matplotlib", reason='drawing figures needs matplotlib: pip install -e ".[plot]"')


def dpo_records(n_train=40, eval_every=10, drift=0.0):
    """A DPO-like log: train lines every 32 examples and eval lines, with judge scores, every `eval_every`."""
    records = []
    for index in range(n_train + 1):
        step = 32 * index
        if index % eval_every == 0:
            records.append({"event": "eval", "step": step, "time": 1.0 + index, "loss/eval": 0.69 - 0.001 * index,
                            "rewards_eval/chosen": 0.01 * index, "rewards_eval/rejected": -0.02 * index,
                            "rewards_eval/accuracies": min(1.0, 0.05 * index), "rewards_eval/margins": 0.03 * index,
                            "logps_eval/chosen": -1.0 - drift * index, "logps_eval/rejected": -6.0 - 0.05 * index,
                            "judge_eval/policy": 0.4 + 0.002 * index, "judge_eval/reference": 0.4,
                            "counters/examples": step, "counters/updates": index})
        if index:
            noise = 0.01 * (-1) ** index
            records.append({"event": "train", "step": step, "time": 1.5 + index,
                            "loss/train": 0.69 - 0.001 * index + noise,
                            "rewards_train/chosen": 0.01 * index + noise, "rewards_train/rejected": -0.02 * index,
                            "rewards_train/accuracies": 0.5 + noise, "rewards_train/margins": 0.03 * index,
                            "logps_train/chosen": -1.0 - drift * index, "logps_train/rejected": -6.0 - 0.05 * index,
                            "grad_norm": 1.0, "lr": 1e-4, "examples_per_second": 300.0,
                            "counters/examples": step, "counters/updates": index, "counters/skipped_steps": 0})
    return records


def sft_records(n_train=20):
    records = [{"event": "eval", "step": 0, "time": 1.0, "loss/eval": 30.0, "logps_eval/chosen": -30.0}]
    for index in range(1, n_train + 1):
        records.append({"event": "train", "step": 32 * index, "time": 1.0 + index, "loss/train": 30.0 / index,
                        "logps_train/chosen": -30.0 / index, "grad_norm": 2.0, "lr": 1e-3})
    records.append({"event": "eval", "step": 32 * n_train, "time": 99.0, "loss/eval": 1.5, "logps_eval/chosen": -1.5})
    return records


def write_run(directory, records, tail=""):
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return str(directory)


def assert_png(path, min_width=400, min_height=250):
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, f"{path} is {width}x{height}"
    assert pixels.std() > 0, f"{path} is blank"


# ---- reading, no matplotlib needed ---------------------------------------------------------------

def test_a_torn_last_line_and_null_values_are_skipped(tmp_path):
    records = dpo_records(n_train=4, eval_every=2)
    records[1]["loss/train"] = None  # how metrics.py writes a non-finite value
    run = plot.load_run(write_run(tmp_path / "going", records, tail='{"event": "train", "step": 160, "loss/tr'))
    assert run.name == "going" and len(run.records) == len(records)
    steps, values = plot.series(run.records, "train", "loss/train")
    assert steps == [64, 96, 128] and len(values) == 3
    assert plot.series(run.records, "eval", "judge_eval/policy")[0] == [0, 64, 128]


def test_moving_average_is_centred_and_ends_on_the_data():
    values = [0.0, 10.0, 0.0, 10.0, 0.0, 10.0, 0.0]
    smoothed = plot.moving_average(values, window=3)
    assert len(smoothed) == len(values)
    assert smoothed[0] == values[0] and smoothed[-1] == values[-1]
    assert smoothed[3] == pytest.approx(10 / 3)
    ramp = [float(x) for x in range(10)]
    assert plot.moving_average(ramp, window=5) == pytest.approx(ramp)  # centred: a trend does not lag
    assert plot.moving_average([], window=5) == []


def test_the_panels_follow_the_metrics_a_run_logged(tmp_path):
    dpo = plot.load_run(write_run(tmp_path / "dpo", dpo_records()))
    sft = plot.load_run(write_run(tmp_path / "sft", sft_records()))
    assert [panel.name for panel in plot.panels_for([dpo])] == ["loss", "rewards", "accuracy", "logps", "judge"]
    assert [panel.name for panel in plot.panels_for([sft])] == ["loss", "logps"]
    assert len(plot.panels_for([sft, dpo])) == 5  # a panel is kept when any run has its metrics


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp / "a_file", "is not a directory"),
    (lambda tmp: tmp, "has no metrics.jsonl"),
])
def test_a_bad_run_directory_is_one_clear_error_naming_it(tmp_path, capsys, make_path, message):
    (tmp_path / "a_file").write_text("")
    path = str(make_path(tmp_path))
    with pytest.raises(RunDirError, match=message) as error:
        plot.plot_runs([path])
    assert path in str(error.value)
    assert plot.main([path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and path in err and err.count("\n") == 1


def test_naming_metrics_jsonl_itself_points_to_its_directory(tmp_path):
    run_dir = write_run(tmp_path / "run", sft_records())
    with pytest.raises(RunDirError, match=f"give the directory that holds it, {run_dir}$"):
        plot.load_run(f"{run_dir}/metrics.jsonl")


def test_a_run_with_nothing_logged_yet_writes_nothing(tmp_path, capsys):
    run_dir = write_run(tmp_path / "starting", [], tail='{"event": "ev')
    assert plot.plot_runs([run_dir]) == []
    assert not (tmp_path / "starting" / "plots").exists()
    assert plot.main([run_dir]) == 1 and "nothing to plot" in capsys.readouterr().err
    assert "no metrics yet" in plot.plot_run_quietly(run_dir)


def test_without_matplotlib_the_trainer_gets_a_note_and_the_command_an_error(tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import` of it raise ImportError
    run_dir = write_run(tmp_path / "run", dpo_records())
    assert plot.plot_run_quietly(run_dir) == 'plots skipped: matplotlib is not installed (pip install -e ".[plot]")'
    with pytest.raises(plot.PlotDependencyError, match=r'pip install -e "\.\[plot\]"'):
        plot.plot_runs([run_dir])
    assert plot.main([run_dir]) == 1 and 'pip install -e ".[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "run" / "plots").exists()


def test_plot_run_quietly_never_raises(tmp_path):
    assert plot.plot_run_quietly(str(tmp_path / "nowhere")).startswith("plots skipped: run directory")


# ---- figures -------------------------------------------------------------------------------------

def test_a_dpo_run_gets_every_figure(tmp_path, capsys, needs_matplotlib):
    run_dir = write_run(tmp_path / "dpo", dpo_records())
    assert plot.main([run_dir]) == 0
    expected = [str(tmp_path / "dpo" / "plots" / name) for name in DPO_FIGURES]
    assert capsys.readouterr().out.split() == expected
    for path in expected[:-1]:
        assert_png(path)
    assert_png(expected[-1], min_width=1200, min_height=500)  # 3 panels a row, 2 rows
    assert sorted(p.name for p in (tmp_path / "dpo" / "plots").iterdir()) == sorted(DPO_FIGURES)  # no temp files


def test_an_sft_run_gets_no_reward_figures(tmp_path, needs_matplotlib):
    run_dir = write_run(tmp_path / "sft", sft_records())
    note = plot.plot_run_quietly(run_dir)
    assert note == f"plots written to {run_dir}/plots/ ({', '.join(SFT_FIGURES)})"
    assert sorted(p.name for p in (tmp_path / "sft" / "plots").iterdir()) == sorted(SFT_FIGURES)
    for name in SFT_FIGURES:
        assert_png(str(tmp_path / "sft" / "plots" / name))


def test_the_overview_has_one_panel_per_figure(tmp_path, needs_matplotlib):
    dpo = plot.load_run(write_run(tmp_path / "dpo", dpo_records()))
    sft = plot.load_run(write_run(tmp_path / "sft", sft_records()))
    for run, panels in ((dpo, 5), (sft, 2)):
        figure = plot.build_figure([run], plot.panels_for([run]))
        assert len(figure.axes) == panels
        assert figure.axes[0].get_title() == "Loss" and figure.axes[0].get_xlabel() == "examples seen"
    logps = plot.build_figure([dpo], [plot.PANELS[3]]).axes[0]
    assert logps.get_legend_handles_labels()[1] == ["chosen (train, smoothed)", "chosen (eval)",
                                                    "rejected (train, smoothed)", "rejected (eval)"]


def test_several_runs_are_overlaid_one_colour_each(tmp_path, needs_matplotlib):
    first = write_run(tmp_path / "beta_0.1", dpo_records())
    second = write_run(tmp_path / "beta_0.5", dpo_records(drift=0.1), tail="{torn")
    runs = [plot.load_run(first), plot.load_run(second)]
    logps = plot.build_figure(runs, [plot.PANELS[3]]).axes[0]
    lines, labels = logps.get_legend_handles_labels()
    assert "beta_0.1: chosen (eval)" in labels and "beta_0.5: chosen (eval)" in labels
    colours = {label.split(":")[0]: line.get_color() for line, label in zip(lines, labels)}
    assert colours["beta_0.1"] != colours["beta_0.5"]

    paths = plot.plot_runs([first, second], str(tmp_path / "compare"))
    assert paths == [str(tmp_path / "compare" / name) for name in DPO_FIGURES]
    assert_png(paths[-1], min_width=1200)


def test_several_runs_go_to_the_first_runs_plots_by_default(tmp_path, monkeypatch, needs_matplotlib):
    monkeypatch.setattr(plot, "save_figure", lambda figure, path: path)  # drawing is not what this tests
    first = write_run(tmp_path / "a" / "run", sft_records())
    second = write_run(tmp_path / "b" / "run", sft_records())
    assert plot.plot_runs([first, second]) == [f"{first}/plots/{name}" for name in SFT_FIGURES]
    # Both are called "run": the paths given tell them apart.
    runs = plot._distinct_names([plot.load_run(first), plot.load_run(second)], [first, second])
    assert [run.name for run in runs] == [first, second]


def test_a_real_short_sft_run(tmp_path, needs_matplotlib):
    from test_train import quick, train_script

    run_dir = tmp_path / "sft"
    train_script.train(quick(run_dir, "loss=sft", "n_eval_model_samples=2", "eval_every=256"))
    paths = plot.plot_runs([str(run_dir)])
    names = [path.rsplit("/", 1)[1] for path in paths]
    # The toy task has a judge, so SFT gets judge.png too (the policy's score only: SFT has no reference).
    assert names == ["loss.png", "logps.png", "judge.png", "overview.png"]
    for path in paths:
        assert_png(path)


def test_huge_and_non_finite_metrics_are_left_out_with_a_note(tmp_path, capsys, needs_matplotlib):
    # was: ValueError: arange: cannot compute length (matplotlib's ticks over ±1e308), a traceback
    records = dpo_records(n_train=20, eval_every=5)
    for index, record in enumerate(records):
        if record["event"] == "train" and index > 20:
            record["loss/train"] = 1e308 if index % 2 else -1e308  # a run that diverged
    records[-1]["rewards_train/margins"] = float("inf")  # json writes Infinity, which json reads back
    records[0]["loss/eval"] = float("nan")
    run_dir = write_run(tmp_path / "diverged", records)
    assert plot.main([run_dir]) == 0
    captured = capsys.readouterr()
    n_huge = sum(1 for record in records if abs(record.get("loss/train") or 0) == 1e308)
    assert captured.err == (f"note: {n_huge + 2} logged values left out of the plots as null, non-finite or beyond "
                            f"±1e100 (loss/eval: 1, loss/train: {n_huge}, rewards_train/margins: 1); a run that "
                            "logs such values has diverged\n")
    for name in DPO_FIGURES:
        assert_png(tmp_path / "diverged" / "plots" / name)
    assert plot.series(records, "train", "loss/train")[1] and max(plot.series(records, "train", "loss/train")[1]) < 1

    everything_huge = write_run(tmp_path / "only_huge", [{"event": "train", "step": 32, "loss/train": 1e308}])
    assert plot.main([everything_huge]) == 1
    error = capsys.readouterr().err
    assert "note: 1 logged value left out" in error and "every value the runs logged is left out" in error
    assert "Traceback" not in error and not (tmp_path / "only_huge" / "plots").exists()
    assert "1 logged value left out" in plot.plot_run_quietly(everything_huge)
