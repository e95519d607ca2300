"""Normalize a popped batch on two cores: part in a worker process, the rest in the caller.

Normalization is pure Python (the GIL allows one thread at a time), and on the benchmark shape
it costs more than the insert, so the collector can use a second core for it. For each batch
`NormalizePool.normalize_all(raws)` sends the first `share` of the items to a worker process
(spawned once, `spawn` start method: safe in a threaded process), normalizes the rest itself
meanwhile, then returns the results in input order. The batch is still stored whole in one
transaction afterwards, and nothing is popped early, so a crash between pop and commit loses
exactly what it lost before. If the worker fails in any way (killed, broken pool, pickling), the
caller normalizes that part itself and the pool is started again on the next batch: an item
is never dropped because of the pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Sequence

from datasource.model import Control, Normalized, Rejected
from datasource.normalize import normalize
from datasource.pricing import Pricer

logger = logging.getLogger(__name__)

Outcome = Normalized | Control | Rejected
MIN_PARALLEL = 64  # smaller batches are normalized in the caller: a round trip costs more
# Share of a batch the worker normalizes. The caller also unpickles the worker's results
# (~10 us/event against ~9 us/event to pickle them in the worker), so half and half balances.
DEFAULT_SHARE = 0.5


# CPA_MONITOR_NORMALIZE_WORKERS=auto: one worker, used only while the collector is behind its queue
# (`backlog_items`), and stopped after this long without such a group (its ~50-70 MB returned).
AUTO_IDLE_S = 60.0


def backlog_items(batch_size: int, commit_max: int) -> int:
    """The smallest group that shows a backlog: consecutive full pops that reached the transaction
    cap (with the defaults, 3,501 of 500-item pops capped at 4,000), or one full pop when a
    transaction is one pop. Live traffic, even at 1,000 events/s, is stored in groups well under it."""
    return max(batch_size, commit_max - batch_size + 1)


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "quota period", "max" for none
CGROUP_V1_CPU = "/sys/fs/cgroup/cpu"  # cgroup v1: cpu.cfs_quota_us (-1 for none) and cpu.cfs_period_us


def _read_words(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().split()
    except OSError:
        return []


def usable_cpus(cpu_max: str = CGROUP_CPU_MAX, v1_dir: str = CGROUP_V1_CPU) -> float:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota
    (`docker run --cpus`, a Kubernetes limit), read from cgroup v2's cpu.max or else v1's CFS files."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota_period = _read_words(cpu_max)[:2] or (_read_words(os.path.join(v1_dir, "cpu.cfs_quota_us"))[:1]
                                                 + _read_words(os.path.join(v1_dir, "cpu.cfs_period_us"))[:1])
    try:
        quota, period = (int(word) for word in quota_period)  # "max" (v2) raises: no quota
    except ValueError:
        return cpus
    return min(cpus, quota / period) if quota > 0 and period > 0 else cpus


def worker_plan(value: int | str, cpus: float | None = None) -> tuple[int, bool]:
    """(workers, on demand) of a CPA_MONITOR_NORMALIZE_WORKERS value: `auto` is one worker on demand,
    or none with at most one usable CPU (`cpus`, default `usable_cpus()`: a second process would
    only take turns with the collector on it); a whole number N >= 0 is N workers always used.
    Raises ValueError for anything else."""
    text = str(value).strip().lower()
    if text == "auto":
        return (1 if (usable_cpus() if cpus is None else cpus) > 1 else 0), True
    try:
        workers = int(text)
    except ValueError:
        workers = -1
    if workers < 0:
        raise ValueError(f"normalize workers must be auto or a whole number >= 0, not {value!r}")
    return workers, False


# A worker polls for its parent this often. It must: a worker blocks reading its task queue, and
# holds that queue's write end itself (multiprocessing passes both), so a parent killed with
# SIGKILL never gives it EOF; it lingered forever, one orphan per killed collector.
PARENT_POLL_S = 0.5


# The price table of a worker process (CPA_MONITOR_PRICES_FILE, read once by `_worker_init`);
# None: the built-in table.
_worker_pricer: Pricer | None = None


def _worker_init(parent_pid: int, prices_file: str = "") -> None:
    """Worker initializer: the price table, SIGINT ignored, and an end once the parent is gone.

    A Ctrl-C in a terminal (or `timeout`) signals the whole process group: the worker used to die
    of it with a KeyboardInterrupt traceback in the middle of the collector's orderly stop. The
    parent ends the worker itself (the pool's shutdown), or the watch below does once it is gone."""
    global _worker_pricer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_pricer = Pricer.from_file(prices_file) if prices_file else None

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _normalize_chunk(raws: Sequence[bytes], instance: str, pricer: Pricer | None = None) -> list[Outcome]:
    return [normalize(raw, instance=instance, pricer=pricer) for raw in raws]


def _normalize_part(raws: Sequence[bytes], instance: str) -> list[object]:
    """The worker's task. A Normalized travels as a plain (row, private, ledger_hash) tuple: a
    frozen slots dataclass unpickles field by field in Python, and the unpickling is done by the
    storing process (4,000 events: 8.1 -> 6.1 us/event to load, 6.3 -> 4.7 to dump). Packing the
    rows for the store here too was measured slower: the worker was the busier side then."""
    return [(o.row, o.private, o.ledger_hash) if type(o) is Normalized else o
            for o in _normalize_chunk(raws, instance, _worker_pricer)]


def _received(part: list[object]) -> list[Outcome]:
    return [Normalized(*o) if type(o) is tuple else o for o in part]  # type: ignore[misc]


class NormalizePool:
    """`workers` normalize processes, spawned at first use. With `min_items`, a batch smaller than
    that is normalized in the caller (`uses_worker`), and `release_idle` stops the workers once
    none has been used for a while: the `auto` setting (a worker only while the collector is behind)."""

    def __init__(self, workers: int, instance: str = "default", *, share: float = DEFAULT_SHARE,
                 min_items: int = 0, prices_file: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        """`prices_file` is CPA_MONITOR_PRICES_FILE (empty: the built-in table), read here and in each
        worker; a bad file raises PriceError here."""
        if workers < 0:
            raise ValueError("workers must be >= 0")
        if not 0.0 < share < 1.0:
            raise ValueError("share must be between 0 and 1")
        self.workers = workers
        self.instance = instance
        self.share = share
        self.min_items = max(min_items, MIN_PARALLEL)
        self.prices_file = prices_file
        self.pricer = Pricer.from_file(prices_file) if prices_file else None
        self.fallbacks = 0  # batches whose worker part was normalized here after a pool failure
        self.starts = 0  # times the workers were started (again)
        self._clock = clock
        self._last_used = 0.0
        self._pool: ProcessPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._pool is not None

    def uses_worker(self, count: int) -> bool:
        """Whether a batch of `count` items goes (in part) to a worker."""
        return self.workers > 0 and count >= self.min_items

    def _executor(self) -> ProcessPoolExecutor:
        self._last_used = self._clock()
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                             mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init,
                                             initargs=(os.getpid(), self.prices_file))
            self.starts += 1
        return self._pool

    def release_idle(self, idle_s: float) -> bool:
        """Stop the workers if none was used for `idle_s` seconds; returns whether they stopped.
        The next batch that needs one starts them again."""
        if self._pool is None or self._clock() - self._last_used < idle_s:
            return False
        self.close()
        return True

    def normalize_all(self, raws: Sequence[bytes]) -> list[Outcome]:
        """Every item normalized, in input order. Never raises for a pool failure."""
        if not self.uses_worker(len(raws)):
            return _normalize_chunk(raws, self.instance, self.pricer)
        split = int(len(raws) * self.share)
        head_raws = [bytes(r) for r in raws[:split]]
        try:
            future = self._executor().submit(_normalize_part, head_raws, self.instance)
        except Exception as exc:  # a broken or shut-down pool: do it all here
            self._failed(exc)
            return _normalize_chunk(raws, self.instance, self.pricer)
        tail = _normalize_chunk(raws[split:], self.instance, self.pricer)
        try:
            head = _received(future.result())
        except Exception as exc:
            self._failed(exc)
            head = _normalize_chunk(head_raws, self.instance, self.pricer)
        return head + tail

    def submit(self, raws: Sequence[bytes]) -> "Pending":
        """Start normalizing a whole batch in the worker and return at once (the pipelined collector:
        the caller stores the previous batch meanwhile). Without a worker, or for a small batch,
        the items are normalized when `Pending.result()` is called."""
        items = [bytes(r) for r in raws]
        futures: list[Future] = []
        if self.uses_worker(len(items)):
            parts = max(1, min(self.workers, len(items) // MIN_PARALLEL))
            size = -(-len(items) // parts)
            try:
                for i in range(0, len(items), size):  # one part per worker
                    futures.append(self._executor().submit(_normalize_part, items[i:i + size], self.instance))
            except Exception as exc:  # a broken or shut-down pool: normalized here on result()
                for future in futures:
                    future.cancel()
                futures = []
                self._failed(exc)
        return Pending(self, items, futures)

    def _failed(self, exc: Exception) -> None:
        self.fallbacks += 1
        logger.warning("%s: normalize worker failed (%s: %s); normalizing here, restarting the worker",
                       self.instance, type(exc).__name__, exc)
        self.close(wait=False)

    def close(self, wait: bool = True) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)


class Pending:
    """A batch handed to `NormalizePool.submit`; `result()` gives every item normalized, in input
    order, once (later calls return the same list). A worker failure is redone in the caller."""

    def __init__(self, pool: NormalizePool, raws: list[bytes], futures: list[Future]) -> None:
        self.pool = pool
        self.raws = raws
        self._count = len(raws)
        self._futures = futures
        self._result: list[Outcome] | None = None

    def __len__(self) -> int:
        return self._count

    def result(self) -> list[Outcome]:
        if self._result is None:
            out: list[Outcome] | None = None
            if self._futures:
                try:
                    out = [item for future in self._futures for item in _received(future.result())]
                except Exception as exc:  # `out` stays None: normalized here below
                    self.pool._failed(exc)
                self._futures = []
            self._result = out if out is not None else _normalize_chunk(self.raws, self.pool.instance, self.pool.pricer)
            # the popped bytes are not needed once normalized (a store retry stores the result):
            # 5.6 MB in a 4,000-event group of the benchmark shape, freed while it is stored
            self.raws = []
        return self._result
