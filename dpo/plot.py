"""Figures of a run's metrics.jsonl: loss, rewards, reward accuracy, log-probs, judge, and an overview.

    python -m dpo.plot RUN_DIR [RUN_DIR ...] [--out DIR]

Writes `loss.png`, `rewards.png`, `accuracy.png`, `logps.png`, `judge.png` and `overview.png` (all
of them as panels of one figure) against examples seen, to `RUN_DIR/plots/` (several runs: to `--out`,
default the first run's `plots/`, with the runs overlaid in one colour each). A figure whose metrics
no run has (an SFT run has no rewards) is not written. metrics.jsonl is read as it stands, so this
works on a run still going: a torn last line is skipped. Values that are null (non-finite when logged),
non-finite or beyond ±1e100 (a run that diverged) are left out, with a note saying how many. The trainer
calls `plot_run_quietly` when a run ends. matplotlib is an optional dependency: `pip install -e ".[plot]"`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

from dpo.errors import RunDirError, UserError

INSTALL_HINT = 'pip install -e ".[plot]"'


class PlotDependencyError(UserError):
    """matplotlib, which only plotting needs, is not installed."""


@dataclass(frozen=True)
class Run:
    """One run directory's metric records, in the order they were logged."""

    name: str
    records: list


@dataclass(frozen=True)
class Quantity:
    """One thing a panel shows, as a train curve and an eval curve where the run logs them."""

    label: str
    train_key: Optional[str]
    eval_key: Optional[str]


@dataclass(frozen=True)
class Panel:
    name: str  # also the figure's file name
    title: str
    ylabel: str
    quantities: tuple
    raw_train: bool = False  # also draw the unsmoothed train values, faintly


PANELS = (
    Panel("loss", "Loss", "loss", (Quantity("loss", "loss/train", "loss/eval"),), raw_train=True),
    Panel("rewards", "Implicit rewards", "reward", (
        Quantity("chosen", "rewards_train/chosen", "rewards_eval/chosen"),
        Quantity("rejected", "rewards_train/rejected", "rewards_eval/rejected"),
        Quantity("margin", "rewards_train/margins", "rewards_eval/margins"))),
    Panel("accuracy", "Reward accuracy", "chosen reward > rejected", (
        Quantity("accuracy", "rewards_train/accuracies", "rewards_eval/accuracies"),)),
    Panel("logps", "Log-probabilities", "log p(response | prompt)", (
        Quantity("chosen", "logps_train/chosen", "logps_eval/chosen"),
        Quantity("rejected", "logps_train/rejected", "logps_eval/rejected"))),
    Panel("judge", "Judge score of samples", "mean judge score", (
        Quantity("policy", None, "judge_eval/policy"),
        Quantity("reference", None, "judge_eval/reference"))),
)

# Values beyond this are left out, with a note: far past any metric of a run that trains (losses and log-probs stay
# within about 1e4), and far enough inside float64's 1.8e308 that the smoothing's running sums and matplotlib's
# axis arithmetic cannot overflow (at ±1e308 both did, and the figure failed with a traceback).
MAX_PLOTTED = 1e100
MAX_PLOTTED_TEXT = "1e100"

LINESTYLES = ("-", "--", ":")
MARKERS = ("o", "s", "^")


# ---- reading -------------------------------------------------------------------------------------

def load_run(run_dir: str) -> Run:
    """The run's metric records; lines that do not parse (a run still writing its last one) are skipped."""
    if not os.path.isdir(run_dir):
        what = "is not a directory" if os.path.exists(run_dir) else "does not exist"
        fix = "give the directory of a train.py run (its local_run_dir), which holds metrics.jsonl"
        if os.path.basename(run_dir) == "metrics.jsonl":
            fix = f"give the directory that holds it, {os.path.dirname(run_dir) or '.'}"
        raise RunDirError(f"run directory {run_dir} {what}; {fix}")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} has no metrics.jsonl; give the directory of a train.py run that has "
                          "logged at least one step")
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.readlines()
    except OSError as error:
        raise RunDirError(f"cannot read {path}: {error.strerror or error}; check its permissions") from None
    return Run(os.path.basename(os.path.normpath(os.path.abspath(run_dir))), _parse_records(lines))


def _parse_records(lines: list) -> list:
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def series(records: list, event: str, key: str) -> tuple:
    """(steps, values) of one metric in one event's records; null, non-finite and huge values are left out."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if record.get("event") == event and _plottable(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _plottable(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= MAX_PLOTTED)


def left_out(runs: list) -> dict:
    """How many logged values of each plotted metric `series` leaves out (null, non-finite or beyond ±MAX_PLOTTED)."""
    keys = {(event, key) for panel in PANELS for quantity in panel.quantities
            for event, key in (("train", quantity.train_key), ("eval", quantity.eval_key)) if key}
    counts = {}
    for run in runs:
        for record in run.records:
            for event, key in keys:
                if record.get("event") == event and key in record and not _plottable(record[key]):
                    counts[key] = counts.get(key, 0) + 1
    return counts


def left_out_note(runs: list) -> str:
    """One line naming the values left out of the figures, or '' when none were."""
    counts = left_out(runs)
    if not counts:
        return ""
    listed = ", ".join(f"{key}: {count}" for key, count in sorted(counts.items()))
    total = sum(counts.values())
    return (f"note: {total} logged value{'s' if total != 1 else ''} left out of the plots as null, non-finite or "
            f"beyond ±{MAX_PLOTTED_TEXT} ({listed}); a run that logs such values has diverged")


def moving_average(values: list, window: Optional[int] = None) -> list:
    """Each point's mean with its neighbours, centred so that the curve does not lag behind the data.

    The window shrinks symmetrically near the ends, so the curve starts and ends on the data. The
    default window scales with the curve, so that long runs are smoothed as much as short ones, but
    spans at least 5 points: one batch's mean is too noisy to read.
    """
    if window is None:
        window = max(5, round(len(values) / 30))
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    averages = []
    for index in range(len(values)):
        half = min(window // 2, index, len(values) - 1 - index)
        averages.append((prefix[index + half + 1] - prefix[index - half]) / (2 * half + 1))
    return averages


def panels_for(runs: list) -> list:
    """The panels for which at least one run logged at least one value."""
    return [panel for panel in PANELS if any(_has_values(run, panel) for run in runs)]


def _has_values(run: Run, panel: Panel) -> bool:
    return any(series(run.records, event, key)[1]
               for quantity in panel.quantities
               for event, key in (("train", quantity.train_key), ("eval", quantity.eval_key)) if key)


# ---- drawing -------------------------------------------------------------------------------------

def _matplotlib_figure_classes():
    """Figure and the Agg canvas, imported only when plotting; no pyplot, so no GUI backend is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotDependencyError(f"plotting needs matplotlib, which is not installed; run {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def draw_panel(axes, runs: list, panel: Panel) -> None:
    """Each run's curves: one colour per quantity for one run, one colour per run when comparing runs."""
    several = len(runs) > 1
    for run_index, run in enumerate(runs):
        for quantity_index, quantity in enumerate(panel.quantities):
            color = f"C{run_index if several else quantity_index}"
            linestyle = LINESTYLES[quantity_index % len(LINESTYLES)] if several else "-"
            prefix = f"{run.name}: " if several else ""
            if quantity.train_key:
                steps, values = series(run.records, "train", quantity.train_key)
                if steps and panel.raw_train:
                    # Labelled only for one run: with several, the legend would list each run twice.
                    axes.plot(steps, values, color=color, linestyle=linestyle, linewidth=0.8, alpha=0.25,
                              label=None if several else f"{quantity.label} (train)")
                if steps:
                    axes.plot(steps, moving_average(values), color=color, linestyle=linestyle, linewidth=1.5,
                              label=f"{prefix}{quantity.label} (train, smoothed)")
            if quantity.eval_key:
                steps, values = series(run.records, "eval", quantity.eval_key)
                if steps:
                    axes.plot(steps, values, color=color, linestyle=linestyle, linewidth=1,
                              marker=MARKERS[quantity_index % len(MARKERS)], markersize=4,
                              label=f"{prefix}{quantity.label} (eval)")
    axes.set_title(panel.title)
    axes.set_xlabel("examples seen")
    axes.set_ylabel(panel.ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")


def build_figure(runs: list, panels: list):
    """One figure with `panels` side by side (at most 3 a row), not yet saved."""
    Figure, FigureCanvasAgg = _matplotlib_figure_classes()
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.5 * columns, 4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, panel in enumerate(panels):
        draw_panel(figure.add_subplot(rows, columns, index + 1), runs, panel)
    if len(runs) == 1:
        figure.suptitle(runs[0].name)
    return figure


def save_figure(figure, path: str) -> str:
    """Write a PNG atomically, so a viewer (or a second plot of a run still going) never sees half a file."""
    temporary = f"{path}.tmp"
    try:
        figure.savefig(temporary, format="png", dpi=110)
        os.replace(temporary, path)
    except OSError as error:
        raise RunDirError(f"cannot write {path}: {error.strerror or error}; choose a writable --out "
                          "directory with free space") from None
    return path


# ---- entry points --------------------------------------------------------------------------------

def plot_runs(run_dirs: list, out_dir: Optional[str] = None, notes: Optional[list] = None) -> list:
    """Write the figures of these runs (overlaid when several) and return their paths.

    `out_dir` defaults to the first run's `plots/`. Returns [] when no run has logged anything yet.
    A note on values left out of the figures is appended to `notes`, if given.
    """
    if not run_dirs:
        raise RunDirError("no run directory given; name at least one directory holding metrics.jsonl")
    runs = _distinct_names([load_run(run_dir) for run_dir in run_dirs], run_dirs)
    note = left_out_note(runs)
    if note and notes is not None:
        notes.append(note)
    panels = panels_for(runs)
    if not panels:
        return []
    _matplotlib_figure_classes()  # the clear error before any directory is created
    out_dir = out_dir or os.path.join(run_dirs[0], "plots")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot create {out_dir}: {error.strerror or error}; choose another --out") from None
    paths = [save_figure(build_figure(runs, [panel]), os.path.join(out_dir, f"{panel.name}.png"))
             for panel in panels]
    paths.append(save_figure(build_figure(runs, panels), os.path.join(out_dir, "overview.png")))
    return paths


def _distinct_names(runs: list, run_dirs: list) -> list:
    """Label runs by directory name, or by the path given when two names collide (run_a/LATEST, run_b/LATEST)."""
    names = [run.name for run in runs]
    if len(set(names)) == len(names):
        return runs
    return [Run(os.path.normpath(run_dir), run.records) for run, run_dir in zip(runs, run_dirs)]


def plot_run_quietly(run_dir: str) -> Optional[str]:
    """Plot a finished run for the trainer; a one-line note either way, never an exception.

    Plots are a convenience: a run that trained for hours must not end in a traceback because of them.
    """
    notes = []
    try:
        paths = plot_runs([run_dir], notes=notes)
    except PlotDependencyError:
        return f"plots skipped: matplotlib is not installed ({INSTALL_HINT})"
    except UserError as error:
        return f"plots skipped: {error}"
    except Exception as error:  # see the docstring
        return f"plots skipped: {type(error).__name__}: {error}"
    if not paths:
        return f"plots skipped: {os.path.join(run_dir, 'metrics.jsonl')} has no metrics yet" + \
            "".join(f" ({note})" for note in notes)
    return f"plots written to {os.path.dirname(paths[0])}/ ({', '.join(os.path.basename(p) for p in paths)})" + \
        "".join(f"\n{note}" for note in notes)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: the first run's plots/)")
    args = parser.parse_args(argv)
    notes = []
    try:
        paths = plot_runs(args.run_dirs, args.out, notes=notes)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for note in notes:
        print(note, file=sys.stderr)
    if not paths:
        if notes:
            print(f"error: nothing to plot: every value the runs logged is left out (checked "
                  f"{', '.join(args.run_dirs)}); see the note above", file=sys.stderr)
        else:
            print(f"error: nothing to plot: no run has logged a metric yet (checked {', '.join(args.run_dirs)}); "
                  "try again once training has started", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
