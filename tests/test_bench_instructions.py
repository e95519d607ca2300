"""benchmarks/bench_instructions: the workloads it counts run, and valgrind's total is read right.

The counting itself needs valgrind and minutes per stage, so it is run by hand, not here."""

from __future__ import annotations

import pytest

from benchmarks import bench_instructions

VALGRIND_TAIL = """==4242== Cachegrind, a cache and branch-prediction profiler
==4242==
==4242== I   refs:      1,933,689,738
"""


def test_valgrind_total_is_read_with_its_thousands_separators():
    assert bench_instructions.instruction_refs(VALGRIND_TAIL) == 1_933_689_738
    with pytest.raises(ValueError):
        bench_instructions.instruction_refs("==1== ERROR SUMMARY: 0 errors")


@pytest.mark.parametrize("stage, handled", [("normalize", 80), ("pickle", 80), ("pack", 80),
                                            ("insert", 120)])  # insert: 40 stored first, then 2 x 40
def test_each_stage_handles_its_repetitions(stage, handled):
    assert bench_instructions.run_stage(stage, 2, n=40) == handled


def test_unknown_stage_and_repetitions_are_refused():
    with pytest.raises(ValueError):
        bench_instructions.run_stage("decode", 1, n=10)
    with pytest.raises(ValueError):
        bench_instructions.run_stage("pack", 4, n=10)
    with pytest.raises(SystemExit) as refused:
        bench_instructions.main(["--what", "normalize,decode"])
    assert refused.value.code == 2
