"""The kernel's ExecutorClient against a real executor process (tests/conftest.py)."""
from __future__ import annotations

import polars as pl
import signal

import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.client import ConfiguredSession, ExecutorClient
from bastion_kernel.config import ConfigError
from bastion_kernel.language.values import FetchedTable, RequestStatus
from bastion_kernel.contract.protocol import BastionError, encode


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    """The owner's data, read with plain polars: the expected values come from it."""
    return pl.read_csv(patients_csv, try_parse_dates=True)


def mean_cost_by_sex(dataset: str) -> dict:
    return P.frame_op("group_by", input=P.scan(dataset), keys=[P.col("sex")],
                      aggs=[P.fn("mean", P.col("cost"))])


def rows_of(dataset: str, n: int = 5) -> dict:
    return P.frame_op("head", input=P.frame_op("select", input=P.scan(dataset),
                                                exprs=[P.col("name"), P.col("age")]), n=n)


def test_datasets_lists_the_registered_datasets(executor, source):
    datasets = {d["name"]: d for d in executor.kernel_client("alice").datasets()}
    assert set(datasets) == {"patients", "patients_strict", "patients_open"}
    patients = datasets["patients"]
    assert [name for name, _ in patients["schema"]] == source.columns
    assert patients["policy"]["min_group_size"] == 10
    assert patients["policy"]["hidden"] == ["name"]


def test_schema_is_computed_by_the_executor(executor, source):
    expected = source.lazy().group_by("sex").agg(pl.col("cost").mean()).collect_schema()
    schema = executor.kernel_client("alice").schema(mean_cost_by_sex("patients"))
    assert schema == [[name, str(dtype)] for name, dtype in expected.items()]


def test_an_aggregate_is_released_at_once_and_decoded(executor, source):
    client = executor.kernel_client("alice")
    waits = []
    client.on_wait = lambda *args: waits.append(args)
    table = client.fetch(mean_cost_by_sex("patients"), "mean cost by sex")
    assert isinstance(table, FetchedTable) and isinstance(table.frame, pl.DataFrame)
    expected = source.group_by("sex").agg(pl.col("cost").mean()).sort("sex")
    assert_frame_equal(table.frame.sort("sex"), expected, check_exact=False, rel_tol=1e-12)
    assert table.request_id is None
    assert waits == []


def test_a_row_level_fetch_waits_for_the_owner_then_arrives(executor, source):
    client = executor.kernel_client("alice")
    waits = []

    def approve_once(request_id, status, reason, elapsed):
        waits.append((request_id, status, reason, elapsed))
        if len(waits) == 1:
            done = executor.owner("approve", str(request_id))
            assert done.returncode == 0, done.stderr

    client.on_wait = approve_once
    table = client.fetch(rows_of("patients"), "five names and ages")
    request_id = waits[0][0]
    assert isinstance(request_id, int) and waits[0][1] == "pending" and waits[0][2]
    assert table.request_id == request_id
    assert table.frame["name"].to_list() == ["*"] * 5  # hidden column wiped
    assert table.frame["age"].to_list() == source["age"].head(5).to_list()
    # asked again while the approval lasts: the same approved table, nothing waits
    again = client.request(request_id)
    assert again.request_id == request_id and again.frame.equals(table.frame)


def test_a_rejected_review_raises_review_rejected(executor):
    client = executor.kernel_client("alice")

    def reject(request_id, status, reason, elapsed):
        done = executor.owner("reject", str(request_id), "--reason", "names are off limits")
        assert done.returncode == 0, done.stderr

    client.on_wait = reject
    with pytest.raises(BastionError) as caught:
        client.fetch(rows_of("patients", 3), "three rows")
    assert caught.value.ename == "ReviewRejected"
    assert "names are off limits" in caught.value.evalue


def test_an_interrupted_wait_leaves_the_request_pending(executor, source):
    client = executor.kernel_client("alice")
    seen = []

    def interrupt(request_id, status, reason, elapsed):
        seen.append(request_id)
        raise KeyboardInterrupt

    client.on_wait = interrupt
    with pytest.raises(KeyboardInterrupt):
        client.fetch(rows_of("patients", 4), "four rows")
    request_id = seen[0]
    status = client.request(request_id)
    assert isinstance(status, RequestStatus)
    assert (status.request_id, status.status) == (request_id, "pending")
    assert executor.owner("approve", str(request_id)).returncode == 0
    table = client.request(request_id)
    assert isinstance(table, FetchedTable) and table.request_id == request_id
    assert table.frame["age"].to_list() == source["age"].head(4).to_list()


def test_executor_refusals_surface_as_typed_errors(executor):
    client = executor.kernel_client("alice")
    with pytest.raises(BastionError) as caught:
        client.fetch(rows_of("patients_strict"), "rows of a reject-policy dataset")
    assert caught.value.ename == "PolicyViolation"
    with pytest.raises(BastionError) as caught:
        client.schema(P.scan("no_such_dataset"))
    assert caught.value.ename == "SchemaError"
    with pytest.raises(BastionError) as caught:
        client.request(987654)
    assert caught.value.ename == "NotFound"
    # the client stays usable after refusals
    assert client.datasets()


def test_a_reply_to_an_earlier_request_is_not_taken_as_the_answer(executor):
    client = executor.kernel_client("alice")
    # An earlier request whose caller stopped waiting: its reply arrives first.
    client._connected_socket().send_multipart([encode("hello", {}, "abandoned-request")])
    datasets = client.datasets()
    assert {d["name"] for d in datasets} >= {"patients"}
    assert client.hello()["scientist"] == "alice"


def test_a_timeout_names_the_endpoint_and_the_client_recovers(executor):
    client = executor.kernel_client("alice", timeout=60)
    client.timeout = 1.0
    # A stopped (not dead) executor: the request is sent but no answer can come.
    executor.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(BastionError) as caught:
            client.datasets()
    finally:
        executor.process.send_signal(signal.SIGCONT)
    assert caught.value.ename == "ExecutionError"
    assert executor.endpoint in caught.value.evalue and "did not answer" in caught.value.evalue
    client.timeout = 60
    assert client.hello()["scientist"] == "alice"


def test_an_unregistered_key_gets_no_answer(executor, scientist_keys):
    mallory = scientist_keys["mallory"]
    client = ExecutorClient(executor.endpoint, executor.server_public_key, mallory.public, mallory.secret,
                            timeout=2)
    try:
        with pytest.raises(BastionError) as caught:
            client.datasets()
        assert caught.value.ename == "ExecutionError"
        assert "check" in caught.value.evalue
    finally:
        client.close()


def test_configured_session_reports_a_missing_config_on_use(tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_CONFIG", str(tmp_path / "absent.toml"))
    session = ConfiguredSession()  # creating it needs no configuration
    with pytest.raises(ConfigError, match="bastion-kernel connect"):
        session.datasets()
