"""The GPU suite (``experiments/bench/gpu_suite.sh``) in its dry mode, end to end.

Dry mode runs the suite's steps at toy sizes on the CPU. Running it here keeps the suite's commands
in step with the scripts and flags they call, so that a GPU session finds a suite that works. It
takes about a minute on a 2-core machine.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = REPO_ROOT / "experiments" / "bench" / "gpu_suite.sh"
SLUG = "cpu_dry"  # the device part of every file name in dry mode
# What each step must leave in the output folder (besides its log).
OUTPUTS = {
    "kernel_tests": [f"kernel_tests_{SLUG}.xml"],
    "fsdp_smoke": [f"fsdp_smoke_{SLUG}/metrics.jsonl", f"fsdp_smoke_{SLUG}/config.json"],
    "kernels_bench": [f"kernels_bench_{SLUG}.csv"],
    "optimizer_step_float32": [f"optimizer_step_float32_{SLUG}.csv"],
    "optimizer_step_bfloat16": [f"optimizer_step_bfloat16_{SLUG}.csv"],
    "memory_bench": [f"memory_bench_{SLUG}/results.md", f"memory_bench_{SLUG}/results.json"],
    "compare": [f"compare_{SLUG}/results.md", f"compare_{SLUG}/results.json", f"compare_{SLUG}/val_loss.png"],
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``(output folder, completed process)`` of one dry run, started outside the repository with a
    relative ``--out``, as a person would type it."""
    workdir = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        ["bash", str(SUITE), "--dry", "--out", "out"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # above the 7 steps' dry budgets of 90 s each, which stop them anyway
    )
    return workdir / "out", completed


def summary_rows(out: Path) -> dict[str, list[str]]:
    """Rows of the summary table by step: status, exit code, wall s, budget s, outputs."""
    rows = {}
    for line in (out / f"summary_{SLUG}.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("step", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_every_step_ran_and_passed(dry_run):
    out, completed = dry_run
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    rows = summary_rows(out)
    assert list(rows) == list(OUTPUTS)
    for step, (status, exit_code, wall, budget, _) in rows.items():
        assert (status, exit_code) == ("ok", "0"), (step, status)
        assert 0 <= int(wall) <= int(budget)
        command = (out / "logs" / f"{step}_{SLUG}.log").read_text().splitlines()[0]
        assert command.startswith("+ ") and not command.endswith("--help"), (step, command)  # it measured
    assert f"All {len(OUTPUTS)} steps passed" in completed.stdout  # the printed summary


def test_every_step_wrote_its_outputs(dry_run):
    out, _ = dry_run
    for step, paths in OUTPUTS.items():
        for path in paths:
            assert (out / path).stat().st_size > 0, (step, path)
    # The sharded checkpoints were written (the step checks them), then removed: not results.
    assert not list((out / f"fsdp_smoke_{SLUG}").glob("model_*"))
    assert not list((out / f"compare_{SLUG}" / "runs").glob("*/model_*"))  # each run's final checkpoint
    assert not (REPO_ROOT / "experiments" / "results" / SLUG).exists()


def test_every_table_names_the_device(dry_run):
    out, _ = dry_run
    for name in ("kernels_bench", "optimizer_step_float32", "optimizer_step_bfloat16"):
        with open(out / f"{name}_{SLUG}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(row["device"].startswith("CPU") for row in rows), name
    assert "Device: CPU" in (out / f"compare_{SLUG}" / "results.md").read_text()


def test_apollo_has_its_rows(dry_run):
    """APOLLO's Triton channel scaling (the interpreter's, in dry mode) beside the PyTorch reference, and
    APOLLO and APOLLO-Mini in the optimizer-step tables."""
    out, _ = dry_run
    with open(out / f"kernels_bench_{SLUG}.csv", newline="") as handle:
        kernels = list(csv.DictReader(handle))
    for section in ("APOLLO scaling: per channel", "APOLLO-Mini scaling: per tensor"):
        assert {row["impl"] for row in kernels if row["section"] == section} == {"torch reference",
                                                                                "triton norms + update"}
    for dtype in ("float32", "bfloat16"):
        with open(out / f"optimizer_step_{dtype}_{SLUG}.csv", newline="") as handle:
            labels = {(row["optimizer"], row["step"]) for row in csv.DictReader(handle)}
        assert {(label, step) for label in ("APOLLO", "APOLLO-Mini") for step in ("refresh", "ordinary")} <= labels
    assert (out / f"summary_{SLUG}.md").read_text().startswith("# GPU suite: CPU (dry run")
