"""benchmarks.bench_query: arguments that would time nothing are refused before any server starts."""

from __future__ import annotations

import pytest

from benchmarks import bench_query


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        bench_query.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_a_dashboards_glob_that_matches_nothing_is_an_error(tmp_path, capsys) -> None:
    pattern = str(tmp_path / "monitoring" / "*.json")
    err = _refused(["--db", str(tmp_path / "none.db"), "--dashboards", pattern], capsys)
    assert f"--dashboards: no file matches {pattern}" in err


def test_an_unknown_range_is_an_error(tmp_path, capsys) -> None:
    err = _refused(["--db", str(tmp_path / "none.db"), "--ranges", "24h,2h"], capsys)
    assert "--ranges: unknown 2h (choose from 1h, 24h, 7d, 30d)" in err


def test_p95_is_the_nearest_rank() -> None:
    """20 values: rank ceil(0.95 * 20) = 19, the 19th smallest; 7 values: rank ceil(6.65) = 7."""
    assert bench_query.p95(list(range(20, 0, -1))) == 19
    assert bench_query.p95([5, 1, 4, 2, 7, 3, 6]) == 7
