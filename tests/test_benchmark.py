"""`benchmarks/dpo_step.py --quick`: every implementation trains the same weights on the same batches, so
their losses agree; a mode that silently fell back or broke would show as a skipped row or another loss."""

import json
import subprocess
import sys

import pytest

from test_train import REPO


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # A fresh process, as a user runs it: inside pytest's process, state other tests left behind (Hydra
    # resolvers they registered) once hid that the command failed on every library row.
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "benchmarks/dpo_step.py", "--device", "cpu", "--out", str(out), "--quick",
               "--implementations", "dpo,reference"]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_no_library_row_was_skipped(results):
    _, rows = results
    skipped = {row["mode"]: row["skipped"] for row in rows if row["implementation"] == "dpo" and row["skipped"]}
    assert set(skipped) <= {"+compile"}, skipped  # compile is off on CPU unless asked for, and says so


def test_every_mode_of_both_implementations_ran(results):
    _, rows = results
    ran = {(row["implementation"], row["mode"]) for row in rows if not row["skipped"]}
    assert {mode for implementation, mode in ran if implementation == "dpo"} >= {
        "plain", "chunked", "packed", "prefix_shared", "prefix_shared+cached_reference"}
    assert any(implementation == "reference" for implementation, _ in ran)
    for row in rows:
        if not row["skipped"]:
            assert row["pairs_per_s"] > 0 and row["useful_tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
            assert row["device"] == "cpu"


def test_each_library_mode_ran_with_its_own_settings(results):
    _, rows = results
    settings = {row["mode"]: row["settings"] for row in rows if row["implementation"] == "dpo" and not row["skipped"]}
    assert settings["plain"]["lm_head_chunk_size"] is None and not settings["plain"]["packing"]
    assert settings["chunked"]["lm_head_chunk_size"] == 1024 and not settings["chunked"]["packing"]
    assert settings["packed"]["packing"] and not settings["packed"]["prefix_sharing"]
    assert settings["prefix_shared"]["packing"] and settings["prefix_shared"]["prefix_sharing"]
    assert settings["prefix_shared+cached_reference"]["cache_reference_logps"]
    assert all(mode["lm_head_chunk_size"] == 1024 for name, mode in settings.items() if name != "plain")


def test_the_library_and_the_reference_step_reach_the_same_loss(results):
    _, rows = results
    float32 = [row for row in rows if not row["skipped"] and "bf16" not in row["mode"]]
    losses = [row["final_loss"] for row in float32]
    assert len(losses) >= 6
    assert max(losses) - min(losses) < 1e-4, {(row["implementation"], row["mode"]): row["final_loss"] for row in float32}


def test_the_table_is_written(results):
    out, rows = results
    table = (out / "results.md").read_text()
    assert "| dpo |" in table and "| reference |" in table and "pairs/s" in table
