"""Where metrics go: stdout, `metrics.jsonl` in the run directory, and Weights & Biases.

`MetricsSink.log(metrics, step, event)` sends one event everywhere. `metrics.jsonl` gets one JSON
object per event, `{"event": "train"|"eval", "step": examples seen, "time": unix time, **metrics}`,
with the reference implementation's metric names. wandb runs online when credentials exist,
offline (files only, `wandb sync` later) when they do not, and not at all when disabled.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from typing import Any, Mapping, Optional

import tqdm

from dpo.errors import RunDirError
from dpo.rundir import describe_os_error


def mean_metrics(lists: Mapping[str, list]) -> dict[str, float]:
    """Average each metric's per-example values, as the reference does before logging."""
    return {key: sum(values) / len(values) for key, values in lists.items() if values}


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}: {value:.5g}" if isinstance(value, float) else f"{key}: {value}"
                     for key, value in metrics.items())


def wandb_mode() -> str:
    """'online' with an API key (env or ~/.netrc), else 'offline'; WANDB_MODE wins if set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class MetricsSink:
    """Fans metric events out to stdout, metrics.jsonl and wandb; silent on non-main processes."""

    def __init__(self, run_dir: str, enabled: bool = True, wandb_config: Optional[Mapping[str, Any]] = None,
                 run_name: Optional[str] = None, config_dict: Optional[dict] = None,
                 wandb_id: Optional[str] = None):
        """`wandb_id` continues that wandb run (a resumed training run) instead of starting a new one."""
        self.enabled = enabled
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if enabled and wandb_config and wandb_config.get("enabled"):
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            wandb.init(entity=wandb_config.get("entity"), project=wandb_config.get("project"), config=config_dict,
                       dir=run_dir, name=run_name, mode=wandb_mode(), id=wandb_id,
                       resume="allow" if wandb_id else None)
            self.wandb = wandb

    @property
    def wandb_id(self) -> Optional[str]:
        """The wandb run's id, kept in checkpoints so that a resumed run logs to the same wandb run."""
        return self.wandb.run.id if self.wandb is not None and self.wandb.run is not None else None

    def log(self, metrics: Mapping[str, Any], step: int, event: str, echo: bool = True) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": time.time(), **_plain(metrics)}
        _append_lines(self.jsonl_path, [json.dumps(record)])
        if echo:
            self.print(f"{event} stats after {step} examples: {format_metrics(metrics)}")
            if self.wandb is not None:
                self.wandb.log(dict(metrics), step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Eval samples: appended to samples.jsonl, and to wandb as a table."""
        if not self.enabled or not rows:
            return
        _append_lines(os.path.join(os.path.dirname(self.jsonl_path), "samples.jsonl"),
                      [json.dumps({"step": step, **row}) for row in rows])
        if self.wandb is not None:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.wandb.log({"samples": table}, step=step)

    def print(self, message: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _append_lines(path: str, lines: list[str]) -> None:
    try:
        with open(path, "a") as file:
            file.write("".join(line + "\n" for line in lines))
    except OSError as error:
        raise RunDirError(f"cannot write {path}: {describe_os_error(error)}") from None


def _plain(metrics: Mapping[str, Any]) -> dict:
    """JSON-safe values: NaN and infinities become null rather than invalid JSON."""
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in metrics.items()}
