"""Tests marked `slurm` run against the local test cluster (`sudo bash slurm/cluster.sh start`).

Without a cluster they are skipped, except under CI (`CI` set), where they fail: CI starts the cluster
(.ci/run) and a cluster that does not answer there is a broken build, not a reason to skip.

Jobs get a private /tmp and /dev/shm on each node (job_container/tmpfs), so the files a test shares with its
jobs live under `slurm_tmp_path` (below /var/tmp/llm-training-tests, or $LLM_SLURM_TEST_TMP), never under
pytest's `tmp_path` (/tmp); the Python that runs the jobs (this interpreter) must not live under /tmp either.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_helpers import NODES, PARTITION, TMP_BASE, cluster_problem


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _under_tmp(path: Path) -> bool:
    return Path(path).resolve().is_relative_to("/tmp")


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    nodes: tuple[str, ...]
    python: str  # the interpreter (project virtual environment) that jobs run


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The local test cluster, checked once per session: skip without it (fail under CI)."""
    problem = cluster_problem()
    if problem is None and _under_tmp(Path(sys.prefix)):
        problem = (
            f"the Python environment {sys.prefix} is under /tmp, which SLURM jobs cannot see (private /tmp)"
        )
    if problem is None and _under_tmp(TMP_BASE):
        problem = f"LLM_SLURM_TEST_TMP={TMP_BASE} is under /tmp, which SLURM jobs cannot see (private /tmp)"
    if problem is not None:
        message = f"local SLURM cluster unavailable: {problem} (start it: sudo bash slurm/cluster.sh start)"
        if _in_ci():
            pytest.fail(f"{message}; CI is set, so this is an error", pytrace=False)
        pytest.skip(message)
    return SlurmCluster(PARTITION, NODES, sys.executable)


@pytest.fixture(autouse=True)
def _slurm_marker_needs_cluster(request):
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.slurm_call_failed = report.failed
    return report


@pytest.fixture
def slurm_tmp_path(request) -> Path:
    """A fresh folder that the test and its jobs on every node share (outside /tmp).

    Removed after a passing test, kept (and named in the report) after a failing one.
    """
    TMP_BASE.mkdir(parents=True, exist_ok=True)
    try:
        TMP_BASE.chmod(0o1777)  # shared by every user's tests, like /tmp
    except PermissionError:
        pass
    name = re.sub(r"[^\w.-]+", "_", request.node.name)[:60]
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=TMP_BASE))
    yield path
    if getattr(request.node, "slurm_call_failed", False):
        print(f"\nkept the failed test's folder: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)
