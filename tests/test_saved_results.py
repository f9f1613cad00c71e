"""``save(name)``: results kept on the owner's side, per scientist, under the inherited policy; ``collect()`` only fetches.

Everything runs against a real executor process on its own workspace (the
three patients datasets of ``make_workspace`` plus ``patients_nosave``, whose
owner forbids saving), with alice and bob registered.
"""
from __future__ import annotations

import io

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.language.values import FetchedTable
from bastion_kernel.contract.plan import alias, binary, col, fn, frame_op, length, lit, scan
from owner_console.audit import read_entries

from conftest import make_keys, make_workspace, start_executor


@pytest.fixture(scope="module")
def setup(tmp_path_factory, patients_csv):
    owner = make_workspace(tmp_path_factory.mktemp("owner") / "workspace", patients_csv)
    owner.workspace.add_dataset("patients_nosave", patients_csv, min_group_size=10, hidden=["name"],
                                allow_save=False)
    keys_dir = tmp_path_factory.mktemp("keys")
    keys = {name: make_keys(keys_dir / name, name) for name in ("alice", "bob")}
    for pair in keys.values():
        owner.workspace.add_scientist(pair.name, pair.public_file)
    return owner, keys


@pytest.fixture(scope="module")
def running(setup):
    owner, keys = setup
    process = start_executor(owner.path, keys)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv, try_parse_dates=True)


def _table(frames) -> pl.DataFrame:
    assert len(frames) == 1
    return pl.read_ipc(io.BytesIO(frames[0]))


def _save(client, plan, name):
    return client.request("save", {"plan": plan, "name": name, "text": f"save {name}"}, timeout=60)


def _fetch(client, plan):
    return client.request("fetch", {"plan": plan, "text": "cell"}, timeout=60)


ADULTS = frame_op("select", input=frame_op("filter", input=scan("patients"), predicate=binary("ge", col("age"), lit(18))),
                  exprs=[col("name"), col("age"), col("sex"), col("cost")])


def _by_sex(name):
    return frame_op("group_by", input=frame_op("saved", name=name), keys=[col("sex")],
                    aggs=[alias(fn("mean", col("cost")), "mean_cost"), alias(length(), "n")])


def test_save_then_read_back_aggregated(running, source):
    alice = running.client("alice")
    kind, body, _ = _save(alice, ADULTS, "adults")
    assert kind == "ok", body
    assert body["name"] == "adults"
    assert [c for c, _ in body["schema"]] == ["name", "age", "sex", "cost"]
    assert body["policy"]["hidden"] == ["name"] and body["policy"]["min_group_size"] == 10

    kind, body, frames = _fetch(alice, _by_sex("adults"))
    assert kind == "result", body
    expected = (source.filter(pl.col("age") >= 18).group_by("sex")
                .agg(pl.col("cost").mean().alias("mean_cost"), pl.len().alias("n")))
    assert_frame_equal(_table(frames).sort("sex"), expected.sort("sex"), check_dtypes=False)

    kind, body, _ = alice.request("datasets", {})
    described = {d["name"]: d for d in body["datasets"]}
    assert described["adults"]["saved"] is True and described["adults"]["sources"] == ["patients"]
    assert "saved" not in described["patients"]


def test_another_scientist_cannot_see_a_saved_result(running):
    alice, bob = running.client("alice"), running.client("bob")
    assert _save(alice, ADULTS, "alice_only")[0] == "ok"
    kind, theirs, _ = _fetch(bob, _by_sex("alice_only"))
    kind2, missing, _ = _fetch(bob, _by_sex("no_such_x1"))
    assert kind == kind2 == "error"
    assert theirs["ename"] == missing["ename"] == "SchemaError"
    # Word for word the answer for a name that does not exist.
    assert theirs["evalue"].replace("alice_only", "NAME") == missing["evalue"].replace("no_such_x1", "NAME")
    kind, body, _ = bob.request("schema", {"plan": frame_op("saved", name="alice_only")})
    assert kind == "error" and body["ename"] == "SchemaError"
    kind, body, _ = bob.request("datasets", {})
    assert "alice_only" not in {d["name"] for d in body["datasets"]}
    # bob may use the same name for a result of his own; alice's stays hers.
    bob_plan = frame_op("filter", input=scan("patients"), predicate=binary("lt", col("age"), lit(18)))
    assert _save(bob, bob_plan, "alice_only")[0] == "ok"
    kind, body, _ = alice.request("schema", {"plan": frame_op("saved", name="alice_only")})
    assert [c for c, _ in body["schema"]] == ["name", "age", "sex", "cost"]


def test_a_dataset_whose_owner_forbids_saving_refuses_save(running):
    alice = running.client("alice")
    plan = frame_op("select", input=scan("patients_nosave"), exprs=[col("age")])
    kind, body, _ = _save(alice, plan, "nosave_copy")
    assert kind == "error" and body["ename"] == "PolicyViolation", body
    assert "patients_nosave" in body["evalue"]
    kind, body, _ = alice.request("datasets", {})
    assert "nosave_copy" not in {d["name"] for d in body["datasets"]}
    # Derived through another saved result or a collect, the refusal is the same.
    derived = frame_op("group_by", input=scan("patients_nosave"), keys=[col("sex")], aggs=[alias(length(), "n")])
    assert _save(alice, derived, "nosave_agg")[1]["ename"] == "PolicyViolation"


@pytest.mark.parametrize("name,ename", [("patients", "SchemaError"), ("../etc", "SchemaError"),
                                         ("a" * 65, "SchemaError"), ("", "SchemaError")])
def test_bad_names_are_refused(running, name, ename):
    alice = running.client("alice")
    kind, body, _ = _save(alice, ADULTS, name)
    assert kind == "error" and body["ename"] == ename, body
    assert alice.request("hello", {})[0] == "ok"


def test_a_result_whose_rows_repeat_source_rows_is_not_saved(running):
    alice = running.client("alice")
    joined = frame_op("join", left=scan("patients"), right=scan("patients"), how="inner",
                      left_on=[col("sex")], right_on=[col("sex")], suffix="_r")
    kind, body, _ = _save(alice, joined, "self_join")
    assert kind == "error" and body["ename"] == "PolicyViolation", body


def test_a_saved_aggregate_counts_each_of_its_rows_as_one(running, source):
    """A saved result is a source of its own: its rows are never re-released as if each were K people."""
    alice = running.client("alice")
    aggregate = frame_op("group_by", input=scan("patients"), keys=[col("sex")],
                         aggs=[alias(fn("mean", col("cost")), "mean_cost"), alias(length(), "n")])
    assert _save(alice, aggregate, "by_sex")[0] == "ok"
    # Fetched straight away, the same table is released: each group passes K in the source...
    assert _fetch(alice, aggregate)[0] == "result"
    # ...but read back from the save, each row counts as one row of the saved result: below K, held.
    kind, body, _ = _fetch(alice, frame_op("saved", name="by_sex"))
    assert kind == "pending", body
    n_groups = source["sex"].n_unique()
    assert n_groups < 10  # precondition: fewer saved rows than K, so even a total over all of them is held
    total = frame_op("select", input=frame_op("saved", name="by_sex"), exprs=[alias(fn("sum", col("n")), "n")])
    assert _fetch(alice, total)[0] == "pending"


def test_hidden_columns_stay_hidden_under_their_new_names(running, source):
    alice = running.client("alice")
    upper = frame_op("select", input=scan("patients_open"),
                     exprs=[alias(fn("str.to_uppercase", col("name")), "shouting"), col("age")])
    kind, body, _ = _save(alice, upper, "shouting")
    assert kind == "error" and body["ename"] == "PolicyViolation", body  # a hidden column is never computed on
    copied = frame_op("select", input=scan("patients_open"), exprs=[alias(col("name"), "who"), col("age")])
    kind, body, _ = _save(alice, copied, "copied")
    assert kind == "ok" and body["policy"]["hidden"] == ["who"] and body["policy"]["unsafe"] == "log"
    kind, body, frames = _fetch(alice, frame_op("head", input=frame_op("saved", name="copied"), n=5))
    assert kind == "result", body  # unsafe "log": released, and logged
    table = _table(frames)
    assert table["who"].to_list() == ["*"] * 5
    assert table["age"].to_list() == source["age"].head(5).to_list()
    kind, body, _ = _fetch(alice, frame_op("group_by", input=frame_op("saved", name="copied"), keys=[col("who")],
                                           aggs=[length()]))
    assert kind == "error" and "column 'who' of 'copied' is hidden" in body["evalue"], body


def test_save_is_audited(running):
    alice = running.client("alice")
    assert _save(alice, ADULTS, "audited")[0] == "ok"
    entries = [e for e in read_entries(running.workspace / "audit.jsonl")
               if e["event"] == "save" and e.get("name") == "audited"]
    assert len(entries) == 1
    assert entries[0]["scientist"] == "alice" and entries[0]["sources"] == ["patients"]
    assert entries[0]["policy"]["hidden"] == ["name"]
    assert running.owner("audit", "verify").returncode == 0


def test_collect_in_the_language_fetches_and_keeps_nothing_remotely(running, source):
    interp = Interpreter(running.kernel_client("alice"))
    before = [d["name"] for d in interp.run_cell("datasets()").value.datasets]
    collected = interp.run_cell('p = dataset("patients")\n'
                                'p.filter(col("age") >= 60).group_by("sex").agg(col("cost").sum(), pl.len())'
                                '.collect()').value
    assert isinstance(collected, FetchedTable)
    expected = source.filter(pl.col("age") >= 60).group_by("sex").agg(pl.col("cost").sum(), pl.len())
    assert_frame_equal(collected.frame.sort("sex"), expected.sort("sex"), check_dtypes=False)
    assert [d["name"] for d in interp.run_cell("datasets()").value.datasets] == before
    # save() keeps a result on the owner's side, and SQL sees the saved name as a table.
    interp.run_cell('p.filter(col("age") < 40).save("young")')
    fetched = interp.run_cell('sql("SELECT sex, COUNT(*) AS n FROM young GROUP BY sex").fetch()').value
    expected = source.filter(pl.col("age") < 40).group_by("sex").agg(n=pl.len())
    assert_frame_equal(fetched.frame.sort("sex"), expected.sort("sex"), check_dtypes=False)
    assert interp.run_cell('sql("SELECT * FROM young")').value.plan["input"] == {"op": "saved", "name": "young"}
    assert interp.run_cell('dataset("young")').value.plan == {"op": "saved", "name": "young"}


def test_with_row_index_follows_the_release_rule(running, source):
    """A row index is a derived column: row-level results are reviewed, aggregates released, singling out held."""
    alice = running.client("alice")
    indexed = frame_op("with_row_index", input=scan("patients"), name="row")
    kind, body, _ = _fetch(alice, frame_op("head", input=frame_op("select", input=indexed,
                                                                   exprs=[col("row"), col("age")]), n=3))
    assert kind == "pending", body  # row-level anyway
    one = frame_op("select", input=frame_op("filter", input=indexed, predicate=binary("eq", col("row"), lit(17))),
                   exprs=[alias(fn("mean", col("cost")), "cost")])
    kind, body, _ = _fetch(alice, one)
    assert kind == "pending", body  # one person singled out by position: under K
    last = frame_op("group_by", input=indexed, keys=[col("sex")], aggs=[alias(fn("max", col("row")), "last_row")])
    kind, body, _ = _fetch(alice, last)
    assert kind == "pending", body  # the last row's position is one row's value (an order statistic)
    summary = frame_op("group_by", input=indexed, keys=[col("sex")],
                       aggs=[alias(fn("mean", col("row")), "mean_row"), alias(length(), "n")])
    kind, body, frames = _fetch(alice, summary)
    assert kind == "result", body
    expected = (source.with_row_index("row").group_by("sex")
                .agg(pl.col("row").mean().alias("mean_row"), pl.len().alias("n")))
    assert_frame_equal(_table(frames).sort("sex"), expected.sort("sex"), check_dtypes=False)


def test_saved_results_survive_an_executor_restart(setup, running, source):
    owner, keys = setup
    alice = running.client("alice")
    assert _save(alice, ADULTS, "durable")[0] == "ok"
    running.stop()
    restarted = start_executor(owner.path, keys)
    try:
        kind, body, frames = _fetch(restarted.client("alice"), _by_sex("durable"))
        assert kind == "result", body
        expected = (source.filter(pl.col("age") >= 18).group_by("sex")
                    .agg(pl.col("cost").mean().alias("mean_cost"), pl.len().alias("n")))
        assert_frame_equal(_table(frames).sort("sex"), expected.sort("sex"), check_dtypes=False)
        kind, body, _ = _fetch(restarted.client("bob"), _by_sex("durable"))
        assert kind == "error" and body["ename"] == "SchemaError"
    finally:
        restarted.stop()
