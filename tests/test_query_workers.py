"""Query worker processes (:mod:`owner_console.workers`), against a real executor process.

Every ``fetch`` and ``save`` runs in a worker process of the executor.  These
tests look at the processes themselves through ``/proc``: a cancel or a time
limit kills the worker that ran the query (the computation really stops), a
long query is moved to a lower CPU priority, a worker that dies mid-query
(as under the kernel's out-of-memory killer) costs its scientist a typed
error and nobody else anything, and the workers share one memory-mapped copy
of a dataset.
"""
from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from bastion_kernel.contract.plan import alias, col, fn, frame_op, scan
from bastion_kernel.contract.protocol import BastionError
from owner_console import dp, engine, executor as core
from owner_console.engine import cache as engine_cache
from owner_console import workers
from owner_console.model import Dataset, Held, Policy, Released

from conftest import serving
from test_cancel_and_limits import QUICK, SLOW, _audit, _fetch, _replies, _serves, _still_serving, config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads processes from /proc (Linux)")]


@pytest.fixture(scope="module")
def running(tmp_path_factory, patients_csv):
    with serving(tmp_path_factory, patients_csv) as process:
        yield process


def worker_pids(executor_pid: int) -> set[int]:
    """The executor's live query worker processes."""
    pids = set()
    for task in Path(f"/proc/{executor_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"owner_console.workers" in command:
                pids.add(int(child))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _thread_stat_fields(pid: int, index: int) -> set[int]:
    # Field N (1-based, man 5 proc) of /proc/PID/task/TID/stat is item N-3 after the command's ")".
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        values.add(int(fields[index]))
    return values


def nice_values(pid: int) -> set[int]:
    """The nice value of every thread of a process (field 19)."""
    return _thread_stat_fields(pid, 19 - 3)


def scheduling_policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of a process (field 41)."""
    return _thread_stat_fields(pid, 41 - 3)


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def is_small_worker(pid: int) -> bool:
    return b"POLARS_MAX_THREADS=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def busy_worker(running) -> int:
    """The one regular worker process that is computing (its CPU time grows); the slow query is a join."""
    def find():
        pids = [pid for pid in worker_pids(running.process.pid) if not is_small_worker(pid)]
        first = {pid: cpu_ticks(pid) for pid in pids}
        time.sleep(0.3)
        busy = [pid for pid in pids if cpu_ticks(pid) > first[pid]]
        return busy if len(busy) == 1 else None
    return wait_for(find)[0]


def test_a_cancel_kills_the_worker_that_runs_the_query(running):
    alice = running.client("alice")
    target = _fetch(alice, SLOW)
    busy = busy_worker(running)
    cancel = alice.send("cancel", {"target": target})
    replies = _replies(alice, target, cancel)
    assert replies[target][1]["details"] == {"cancelled": True}
    # polars is not left computing a result nobody wants: its process is gone.
    assert not alive(busy) and busy not in worker_pids(running.process.pid)
    _still_serving(running)


def test_the_time_limit_kills_the_worker_that_runs_the_query(running):
    alice = running.client("alice")
    with config(running, query_timeout_seconds=2):
        target = _fetch(alice, SLOW)
        busy = busy_worker(running)
        kind, body = _replies(alice, target)[target]
    assert kind == "error" and body["ename"] == "LimitExceeded", body
    assert body["details"]["limit"] == "query_timeout_seconds"
    assert not alive(busy)
    _still_serving(running)


def test_a_long_query_moves_to_a_lower_cpu_priority(running):
    alice = running.client("alice")
    target = _fetch(alice, SLOW)
    busy = busy_worker(running)
    wait_for(lambda: nice_values(busy) == {workers.BACKGROUND_NICE}, seconds=20)
    if hasattr(os, "SCHED_IDLE"):  # runs only when no normal thread wants the CPU
        assert scheduling_policies(busy) == {os.SCHED_IDLE}
    # Short queries from another scientist run at normal priority meanwhile.
    _still_serving(running)
    others = worker_pids(running.process.pid) - {busy}
    assert others and all(nice_values(pid) == {0} and scheduling_policies(pid) == {os.SCHED_OTHER}
                          for pid in others)
    cancel = alice.send("cancel", {"target": target})
    assert _replies(alice, target, cancel)[target][1]["details"] == {"cancelled": True}


def test_a_worker_that_dies_mid_query_is_a_typed_error_and_the_executor_serves_on(running):
    alice = running.client("alice")
    target = _fetch(alice, SLOW, "killed-mid-query")
    busy = busy_worker(running)
    os.kill(busy, signal.SIGKILL)  # as the kernel's out-of-memory killer would: no chance to answer
    kind, body = _replies(alice, target)[target]
    assert kind == "error" and body["ename"] == "LimitExceeded" and body["details"]["limit"] == "worker_memory"
    assert "other sessions were not affected" in body["evalue"]
    [refusal] = _audit(running, "refusal", request=target)
    assert refusal["ename"] == "LimitExceeded"
    assert running.process.poll() is None
    _still_serving(running)
    _serves(alice, "after the crash")


def test_workers_share_one_memory_mapped_copy_of_a_dataset(running):
    alice, bob = running.client("alice"), running.client("bob")
    target = _fetch(alice, SLOW)
    busy = busy_worker(running)  # keeps one worker busy, so bob's query needs another
    kind, body, _ = bob.request("fetch", {"plan": QUICK, "text": "beside a long one"}, timeout=120)
    assert kind == "result", body
    copies = list((running.workspace / "cache" / "datasets").glob("*.arrow"))
    assert len(copies) == 1  # patients and patients_open are the same file
    mapping = {pid for pid in worker_pids(running.process.pid)
               if str(copies[0]) in Path(f"/proc/{pid}/maps").read_text()}
    assert busy in mapping and len(mapping) >= 2
    cancel = alice.send("cancel", {"target": target})
    _replies(alice, target, cancel)


# ---------------------------------------------------------------- in-process, no server
@pytest.fixture
def pool(tmp_path):
    queries = workers.QueryWorkers(tmp_path / "shared", size=2)
    yield queries
    queries.close()


def test_a_worker_gives_the_same_outcome_as_the_executor_in_process(pool, patients_csv):
    catalog = {"patients": Dataset("patients", patients_csv, "csv", Policy(min_group_size=10)),
               "patients_open": Dataset("patients_open", patients_csv, "csv", Policy(unsafe="log"))}
    by_sex = frame_op("sort", input=QUICK, by=[col("sex")], descending=[False], nulls_last=False)
    for plan in (by_sex, frame_op("select", input=scan("patients"), exprs=[col("age")])):
        here = core.evaluate(plan, catalog, "alice")
        there = pool.evaluate(plan, catalog, "alice")
        assert type(there) is type(here) and isinstance(there, (Released, Held))
        assert there.table.frame().equals(here.table) and there.decision == here.decision and there.notes == here.notes
        assert there.table.height == here.table.height
        assert there.table.schema == {name: str(dtype) for name, dtype in here.table.schema.items()}
        assert pl.read_ipc(io.BytesIO(there.ipc)).equals(here.table)
    saved, policy = pool.prepare_save(by_sex, catalog, scientist="alice")
    here, inherited = core.prepare_save(by_sex, catalog, scientist="alice")
    assert saved.equals(here) and policy == inherited


def test_errors_cross_the_pipe_typed(pool, patients_csv):
    catalog = {"patients": Dataset("patients", patients_csv, "csv", Policy())}
    hostile = {"op": "scan", "dataset": "patients", "__class__": "os.system"}
    with pytest.raises(BastionError) as raised:
        pool.evaluate(hostile, catalog, "alice")
    with pytest.raises(BastionError) as direct:
        core.evaluate(hostile, catalog, "alice")
    assert raised.value.body() == direct.value.body()
    with pytest.raises(BastionError) as raised:
        pool.evaluate(frame_op("select", input=scan("nowhere"), exprs=[col("a")]), catalog, "alice")
    assert raised.value.ename == "SchemaError"
    # A worker that answered an error is reused for the next query.
    assert pool.evaluate(frame_op("select", input=scan("patients"),
                                  exprs=[alias(fn("mean", col("age")), "m")]), catalog, "alice").table.height == 1


def test_a_worker_is_sent_only_the_datasets_its_plan_reads(pool, patients_csv, monkeypatch):
    # The catalog is copied for each query and crosses the pipe: its cost must not follow the workspace's size.
    catalog = {f"table{i}": Dataset(f"table{i}", patients_csv, "csv", Policy(min_group_size=10)) for i in range(40)}
    sent: list[dict] = []
    call = workers._Worker.call

    def recording(worker, request, *args, **kwargs):  # the real call, with the request it was given noted
        sent.append(request["catalog"])
        return call(worker, request, *args, **kwargs)

    monkeypatch.setattr(workers._Worker, "call", recording)
    plan = frame_op("group_by", input=scan("table7"), keys=[col("sex")], aggs=[alias(fn("mean", col("age")), "m")])
    there, here = pool.evaluate(plan, catalog, "alice"), core.evaluate(plan, catalog, "alice")
    assert sent[-1].keys() == {"table7"}
    assert there.table.frame().equals(here.table) and there.decision == here.decision
    # A name the catalog lacks: the whole catalog goes, and the refusal lists every dataset, as in process.
    unknown = frame_op("select", input=scan("nowhere"), exprs=[col("age")])
    with pytest.raises(BastionError) as raised:
        pool.evaluate(unknown, catalog, "alice")
    with pytest.raises(BastionError) as direct:
        core.evaluate(unknown, catalog, "alice")
    assert len(sent[-1]) == 40
    assert raised.value.body() == direct.value.body() and "'table39'" in raised.value.evalue


def test_read_by_keeps_the_sources_a_plan_names_or_the_whole_catalog():
    catalog = {name: Dataset(name, Path(f"/data/{name}.csv"), "csv", Policy()) for name in ("a", "b", "c")}
    both = frame_op("join", left=scan("a"), right={"op": "saved", "name": "c"}, how="inner", left_on=[col("k")],
                    right_on=[col("k")], suffix="_r")
    assert list(core.read_by(both, catalog).items()) == [("a", catalog["a"]), ("c", catalog["c"])]
    assert core.read_by(scan("a"), catalog, names={"b"}) == {"b": catalog["b"]}
    # In the catalog's order, whatever the order of the set of names (which changes between processes).
    many = {f"t{i:02}": Dataset(f"t{i:02}", Path(f"/data/t{i}.csv"), "csv", Policy()) for i in range(30)}
    every_third = [f"t{i:02}" for i in range(0, 30, 3)]
    assert list(core.read_by(None, many, names=set(every_third))) == every_third
    for plan in (scan("zz"), frame_op("join", left=scan("a"), right=scan("zz"), how="inner", left_on=[col("k")],
                                      right_on=[col("k")], suffix="_r"), {"op": "scan"}, 7, None):
        assert core.read_by(plan, catalog) is catalog


def test_a_cancel_before_the_query_starts_never_reaches_a_worker(pool, patients_csv):
    catalog = {"patients": Dataset("patients", patients_csv, "csv", Policy())}
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BastionError) as raised:
        pool.evaluate(QUICK, catalog, "alice", cancel=cancel)
    assert raised.value.details == {"cancelled": True}


def test_a_shared_copy_follows_the_source_file_and_old_copies_go(tmp_path):
    source = tmp_path / "table.parquet"
    pl.DataFrame({"x": [1, 2, 3]}).write_parquet(source)
    dataset = Dataset("t", source, "parquet", Policy())
    shared = tmp_path / "shared"
    first = engine.DatasetCache(shared).frame(dataset)
    assert first["x"].to_list() == [1, 2, 3]
    [copy] = shared.glob("*.arrow")
    assert shared.stat().st_mode & 0o777 == 0o700  # the copies are the owner's data
    pl.DataFrame({"x": [7, 8]}).write_parquet(source)
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version even within one mtime tick
    second = engine.DatasetCache(shared).frame(dataset)
    assert second["x"].to_list() == [7, 8]
    assert [p.name for p in shared.glob("*.arrow")] != [copy.name] and len(list(shared.glob("*.arrow"))) == 1
    assert first["x"].to_list() == [1, 2, 3]  # a process still mapping the old copy keeps its pages


def test_an_unreadable_dataset_is_a_typed_error_with_no_copy_left(tmp_path):
    source = tmp_path / "broken.parquet"
    source.write_bytes(b"PAR1 this is not parquet")
    dataset = Dataset("broken", source, "parquet", Policy())
    with pytest.raises(BastionError) as raised:
        engine.DatasetCache(tmp_path / "shared").frame(dataset)
    assert raised.value.ename == "ExecutionError" and "'broken' cannot be read" in raised.value.evalue
    assert "PAR1" not in raised.value.evalue
    assert not list((tmp_path / "shared").glob("*.arrow")) and not list((tmp_path / "shared").glob(".*.arrow.*"))


def test_a_catalog_crosses_the_pipe_unchanged(tmp_path):
    dp_policy = dp.DPPolicy(epsilon=1.0, max_rows=100, privacy_unit_column="patient_id",
                            bounds={"age": (0, 120)}, public_keys={"sex": ("F", "M")}, ledger=tmp_path / "ledger")
    # As the workspace reads it from datasets/NAME.toml.
    policy = Policy.from_dict({"min_group_size": 7, "hidden": ["name"], "unsafe": "reject", "allow_save": True,
                               "query_timeout_seconds": 9.5,
                               "scientists": {"alice": {"min_group_size": 3, "hidden": ["zip"]}}})
    catalog = {"plain": Dataset("plain", tmp_path / "a.csv", "csv", policy),
               "private": Dataset("private", tmp_path / "b.parquet", "parquet", Policy(), dp=dp_policy)}
    crossed = workers._catalog_from_json(json.loads(json.dumps(workers._catalog_to_json(catalog))))
    assert crossed == catalog
    assert crossed["private"].dp.ledger == dp_policy.ledger  # not compared by ==, needed to charge the budget
    assert crossed["plain"].policy.for_scientist("alice") == catalog["plain"].policy.for_scientist("alice")


def test_on_started_is_called_exactly_once_whatever_the_outcome(pool, patients_csv):
    catalog = {"patients": Dataset("patients", patients_csv, "csv", Policy())}
    calls = []
    pool.evaluate(QUICK, catalog, "alice", on_started=lambda: calls.append("ok"))
    with pytest.raises(BastionError):
        pool.evaluate({"op": "nope"}, catalog, "alice", on_started=lambda: calls.append("refused"))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BastionError):
        pool.evaluate(QUICK, catalog, "alice", cancel=cancel, on_started=lambda: calls.append("cancelled"))
    assert calls == ["ok", "refused", "cancelled"]

    # The caller's own failure (an audit write that fails) stops the query: its worker is not reused.
    def failing() -> None:
        raise OSError("disk full")
    with pytest.raises(OSError):
        pool.evaluate(QUICK, catalog, "alice", on_started=failing)
    assert pool.evaluate(QUICK, catalog, "alice").table.height == 2


def test_a_large_source_is_copied_by_a_process_of_its_own(tmp_path, monkeypatch):
    source = tmp_path / "table.csv"
    pl.DataFrame({"x": [1, 2, 3], "d": ["2024-01-02", "2024-02-03", None]}).write_csv(source)
    monkeypatch.setattr(engine_cache, "COPY_IN_PROCESS_MAX_BYTES", 0)  # as for a file of 64 MB or more
    table = engine.DatasetCache(tmp_path / "shared").frame(Dataset("t", source, "csv", Policy()))
    assert table.equals(engine_cache._read(Dataset("t", source, "csv", Policy()), str(source)))
    assert table.schema["d"] == pl.Date and len(list((tmp_path / "shared").glob("*.arrow"))) == 1


def test_workers_run_with_the_allocator_settings_that_give_memory_back(running):
    alice = running.client("alice")
    assert alice.request("fetch", {"plan": QUICK, "text": "any query"}, timeout=120)[0] == "result"
    for pid in worker_pids(running.process.pid):
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        [conf] = [e for e in environment if e.startswith(b"_RJEM_MALLOC_CONF=")]
        # polars puts its defaults first; the last setting of a key is the one jemalloc keeps.
        assert conf.decode().endswith(workers.WORKER_ALLOCATOR_CONF)


def test_small_queries_go_to_one_thread_workers_and_others_to_regular_ones(pool, patients_csv, tmp_path):
    catalog = {"patients": Dataset("patients", patients_csv, "csv", Policy(unsafe="log")),
               "patients_open": Dataset("patients_open", patients_csv, "csv", Policy(unsafe="log"))}
    assert workers.is_small_query(QUICK, catalog)
    assert not workers.is_small_query(SLOW, catalog)  # a join
    big = tmp_path / "big.csv"
    big.write_bytes(b"x\n" + b"1\n" * (workers.SMALL_QUERY_MAX_BYTES // 2 + 1))
    assert not workers.is_small_query(frame_op("select", input=scan("big"), exprs=[col("x")]),
                                      {"big": Dataset("big", big, "csv", Policy())})
    for hostile in ({"op": "scan", "dataset": ["a"]}, {"op": "nope"}, {"op": ["scan"]}, [1, {"op": "scan"}], "text"):
        workers.is_small_query(hostile, catalog)  # any JSON: an answer, never an exception

    pool.evaluate(QUICK, catalog, "alice")
    [small] = pool._idle["small"]
    assert is_small_worker(small.process.pid) and not pool._idle["regular"]
    joined = frame_op("group_by", input=frame_op("join", left=scan("patients"), right=scan("patients_open"),
                                                 how="inner", left_on=[col("patient_id")],
                                                 right_on=[col("patient_id")], suffix="_o"),
                      keys=[col("sex")], aggs=[alias(fn("mean", col("age")), "m")])
    pool.evaluate(joined, catalog, "alice")
    [regular] = pool._idle["regular"]
    assert not is_small_worker(regular.process.pid)  # polars' whole pool for anything that may grow
