"""The load benchmark at a small size, as a correctness and fairness test (no timing asserted).

``benchmarks/load.py`` runs 32 clients x 20 jobs and prints throughput; here 8 clients x 5 jobs
run through the same code against a real server, and every check it makes must pass.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer

pytestmark = pytest.mark.timeout(60)


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("genfill_load_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


load = _load_benchmark()


async def test_many_clients_lose_nothing_and_take_turns():
    with BackgroundServer(ServerConfig(write_state_file=False)) as server:
        report = await load.run_load(server.url, server.token, clients=8, jobs=5, timeout_s=50)
    assert len(report.records) == 40
    assert all(record.outcome == "result" for record in report.records.values())
    assert report.problems() == []
    print("\n" + load.summary(report))


def _report(order: list[int], clients: int, jobs: int):
    """A report whose results arrived in ``order`` (client numbers, one per job)."""
    report = load.LoadReport(clients, jobs)
    seen: dict[int, int] = {}
    for rank, client in enumerate(order):
        k = seen[client] = seen.get(client, -1) + 1
        job_id = f"c{client:02d}-j{k:02d}"
        report.records[job_id] = load.JobRecord(client, job_id, 0.0, 1.0, rank, "result", (client, 0, 8, 8))
        report.terminal_counts[job_id] = 1
    return report


def test_the_fairness_check_catches_a_first_come_first_served_queue():
    fifo = _report([0, 0, 0, 1, 1, 1, 2, 2, 2], clients=3, jobs=3)
    assert any("waited for all" in problem for problem in fifo.problems())
    round_robin = _report([0, 1, 2, 0, 1, 2, 0, 1, 2], clients=3, jobs=3)
    assert round_robin.problems() == []


def test_the_report_catches_lost_duplicated_and_misrouted_results():
    report = _report([0, 1, 0, 1], clients=2, jobs=2)
    report.records["c00-j01"].outcome = None
    report.terminal_counts["c01-j00"] = 2
    report.records["c01-j01"].box = (0, 0, 8, 8)
    problems = " | ".join(report.problems())
    assert "1 jobs lost" in problems
    assert "answered more than once" in problems
    assert "boxes other than its own" in problems
