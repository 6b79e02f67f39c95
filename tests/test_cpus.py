"""Settings derived from the machine: the image workers' default count follows the CPUs this process may
use (affinity, and the container's cgroup v1 or v2 quota), not the host's core count."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from gateway.settings import Settings, cgroup_cpu_limit, usable_cpus


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota: int, period: int, folder: str = "cpu,cpuacct") -> Path:
    (root / folder).mkdir(parents=True)
    (root / folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "limit"), [("1600000 100000", 16.0), ("150000 100000", 1.5), ("max 100000", None), ("junk", None)]
)
def test_a_cgroup_v2_quota_is_read(tmp_path: Path, cpu_max: str, limit: float | None) -> None:
    assert cgroup_cpu_limit(cgroup_v2(tmp_path / "v2", cpu_max)) == limit


@pytest.mark.parametrize(
    ("quota", "period", "limit"), [(400000, 100000, 4.0), (-1, 100000, None), (50000, 100000, 0.5)]
)
def test_a_cgroup_v1_quota_is_read(tmp_path: Path, quota: int, period: int, limit: float | None) -> None:
    assert cgroup_cpu_limit(cgroup_v1(tmp_path / "v1", quota, period)) == limit


def test_the_worker_count_is_the_smaller_of_affinity_and_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "none") == affinity  # no cgroup files: the affinity mask
    assert usable_cpus(cgroup_v2(tmp_path / "big", f"{(affinity + 100) * 100000} 100000")) == affinity
    assert usable_cpus(cgroup_v2(tmp_path / "half", "50000 100000")) == 1  # half a CPU: still one worker
    if affinity >= 2:
        quota = cgroup_v1(tmp_path / "v1", 150000, 100000)
        assert usable_cpus(quota) == min(affinity, math.ceil(1.5))


def test_cpu_workers_defaults_to_the_usable_cpus_and_the_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CPU_WORKERS", raising=False)
    assert Settings.from_env().cpu_workers == usable_cpus()
    monkeypatch.setenv("CPU_WORKERS", "3")
    assert Settings.from_env().cpu_workers == 3
