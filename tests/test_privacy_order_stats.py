"""Order statistics, dominance and non-finite aggregates, attacked over the wire.

Each attack is written as the attacker's arithmetic against a real executor:
a group padded with nine people whose values the attacker knows, plus one
person they want to learn about.  A minimum, maximum, median, quantile or
count of distinct values over those ten would be the tenth person's value (or
say whether it equals one of the nine); an amplified or shifted sum would
carry it out to nine digits; a sum that overflows says whether it crossed a
threshold.  Every such reply must be a refusal or a hold, and twin queries
whose tenth person differs must get the same reply, request ids aside.
Honest aggregates (counts, means and sums over groups of at least K, a
maximum that K people share) still come back with the values plain polars
gives.

Datasets of this module's workspace (over the synthetic patients table):

===================  ======================================================
``patients_strict``   K=10, reject, ``name`` hidden (conftest)
``patients``          K=10, review, ``name`` hidden (conftest)
``capped``            K=10, reject; ``age`` capped at 90, so at least K
                      patients share the oldest age
``visits``            one row per visit, ``person_id = patient_id``, K=10,
                      reject; the most expensive patient has 12 visits
``no_dominance``      K=10, reject, the owner turned dominance off
``strict_share``      K=10, reject, ``max_share = 0.05``
===================  ======================================================
"""
from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.language.sql import sql_to_plan
from owner_console.workspace import WorkspaceError

import wire
from conftest import make_workspace, run_owner
from wire import fetch, refused

pytestmark = pytest.mark.timeout(300)

col, lit, fn, binary, alias, length, when = P.col, P.lit, P.fn, P.binary, P.alias, P.length, P.when
op, scan = P.frame_op, P.scan
STRICT = scan("patients_strict")
AMPLIFIER = 1_000_000_000
OFFSET = 1e12


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def top_patient(raw) -> int:
    """The patient with the largest cost: the one whose value a maximum would release."""
    return raw.sort("cost", descending=True, nulls_last=True)["patient_id"][0]


@pytest.fixture(scope="module")
def bastion(executor, owner_workspace, raw, top_patient, tmp_path_factory):
    """The module's executor, with the datasets of the module docstring registered."""
    data = tmp_path_factory.mktemp("order_stats_data")
    raw.with_columns(pl.col("age").clip(upper_bound=90)).write_csv(data / "capped.csv")
    visits = raw.select("patient_id", "sex", "zip", "cost").join(pl.DataFrame({"visit": range(1, 13)}), how="cross")
    visits = visits.filter((pl.col("visit") <= pl.col("patient_id") % 3 + 1) | (pl.col("patient_id") == top_patient))
    visits.write_csv(data / "visits.csv")
    workspace, csv = owner_workspace.workspace, owner_workspace.data_file
    workspace.add_dataset("capped", data / "capped.csv", min_group_size=10, unsafe="reject")
    workspace.add_dataset("visits", data / "visits.csv", min_group_size=10, unsafe="reject", person_id="patient_id")
    workspace.add_dataset("no_dominance", csv, min_group_size=10, unsafe="reject", dominance=False)
    workspace.add_dataset("strict_share", csv, min_group_size=10, unsafe="reject", max_share=0.05)
    return executor


def released(reply) -> pl.DataFrame:
    """The table of a reply released at once, not after a review."""
    table, body = wire.released(reply)
    assert body["decision"]["action"] == "allow", body
    return table


def without_ids(reply) -> tuple:
    """A reply as the scientist can compare it with another: everything but the request id."""
    kind, body, frames = reply
    return kind, {k: v for k, v in body.items() if k != "request_id"}, len(frames)


def total(frame: dict, expr: dict) -> dict:
    return op("select", input=frame, exprs=[expr])


def members(frame: dict, ids: list[int]) -> dict:
    return op("filter", input=frame, predicate=fn("is_in", col("patient_id"), values=ids))


def is_patient(patient_id: int) -> dict:
    return binary("eq", col("patient_id"), lit(patient_id))


def sql(bastion, query: str) -> dict:
    """A ``%%sql`` cell's plan, translated as the kernel does with the schemas the executor lists."""
    kind, body, _ = bastion.client("alice").request("datasets", {})
    assert kind == "ok", body
    return sql_to_plan(query, {d["name"]: d["schema"] for d in body["datasets"]})


# ------------------------------------------------------------------ padding: nine known people and one target
@pytest.fixture(scope="module")
def known(raw) -> list[int]:
    """Nine patients whose values the attacker knows (none with a missing cost)."""
    return raw.filter(pl.col("cost").is_not_null() & (pl.col("patient_id") > 100))["patient_id"][:9].to_list()


# (the plan's aggregate, the same in plain polars)
ORDER_STATISTICS = {
    "max": (fn("max", col("cost")), pl.col("cost").max()),
    "min": (fn("min", col("cost")), pl.col("cost").min()),
    "median": (fn("median", col("cost")), pl.col("cost").median()),
    "median_age": (fn("median", col("age")), pl.col("age").median()),
    "quantile": (fn("quantile", col("cost"), quantile=0.9, interpolation="nearest"),
                 pl.col("cost").quantile(0.9, "nearest")),
    "quantile_linear": (fn("quantile", col("cost"), quantile=0.25, interpolation="linear"),
                        pl.col("cost").quantile(0.25, "linear")),
    "n_unique_zip": (fn("n_unique", col("zip")), pl.col("zip").n_unique()),
    "n_unique_age": (fn("n_unique", col("age")), pl.col("age").n_unique()),
}


def twins(raw: pl.DataFrame, known: list[int], answer: pl.Expr) -> tuple[int, int]:
    """Two tenth people for whom plain polars gives different answers over the padded group.

    The attacker knows the nine; a different answer is what they read the tenth person's value from.
    """
    answers: dict = {}
    for candidate in raw.filter(pl.col("cost").is_not_null() & (pl.col("patient_id") > 1000))["patient_id"][:200]:
        value = raw.filter(pl.col("patient_id").is_in(known + [candidate])).select(answer).item()
        for other, seen in answers.items():
            if seen != value:
                return other, candidate
        answers[candidate] = value
    raise AssertionError("no two candidates tell apart")  # the data always has some


@pytest.mark.parametrize("statistic", sorted(ORDER_STATISTICS))
def test_padded_group_does_not_release_the_tenth_value(bastion, raw, known, statistic):
    aggregate, answer = ORDER_STATISTICS[statistic]
    target, twin = twins(raw, known, answer)
    replies = [fetch(bastion, total(members(STRICT, known + [tenth]), aggregate)) for tenth in (target, twin)]
    for reply in replies:
        refused(reply)
    assert without_ids(replies[0]) == without_ids(replies[1])


@pytest.mark.parametrize("statistic", ["max", "median", "n_unique_zip"])
def test_padded_group_is_held_the_same_way_for_either_tenth_person(bastion, raw, known, statistic):
    aggregate, answer = ORDER_STATISTICS[statistic]
    target, twin = twins(raw, known, answer)
    replies = [fetch(bastion, total(members(scan("patients"), known + [tenth]), aggregate))
               for tenth in (target, twin)]
    assert [r[0] for r in replies] == ["pending", "pending"], replies
    assert replies[0][1]["request_id"] != replies[1][1]["request_id"]
    assert without_ids(replies[0]) == without_ids(replies[1])


@pytest.mark.parametrize("query", [
    "SELECT MAX(cost) AS top FROM patients_strict WHERE patient_id IN ({ids})",
    "SELECT MIN(cost) AS bottom FROM patients_strict WHERE patient_id IN ({ids})",
    "SELECT MEDIAN(cost) AS middle FROM patients_strict WHERE patient_id IN ({ids})",
    "SELECT COUNT(DISTINCT zip) AS zips FROM patients_strict WHERE patient_id IN ({ids})",
], ids=["max", "min", "median", "count_distinct"])
def test_padded_group_through_sql(bastion, raw, known, query):
    polars_query = query.replace("patients_strict", "self")
    answers = {}
    for tenth in raw.filter(pl.col("cost").is_not_null() & (pl.col("patient_id") > 1000))["patient_id"][:200]:
        ids = ", ".join(str(i) for i in known + [tenth])
        answers.setdefault(raw.sql(polars_query.format(ids=ids)).item(), tenth)
        if len(answers) == 2:
            break
    assert len(answers) == 2  # precondition: the answer tells two tenth people apart
    replies = []
    for tenth in answers.values():
        replies.append(fetch(bastion, sql(bastion, query.format(ids=", ".join(str(i) for i in known + [tenth])))))
        refused(replies[-1])
    assert without_ids(replies[0]) == without_ids(replies[1])


def test_the_largest_cost_of_each_group_is_one_persons_value(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("max", col("cost"))])))


def test_max_counts_people_not_visits(bastion, raw, top_patient):
    # The most expensive patient's cost is on 12 of their visits: 12 rows, one person.
    assert raw["cost"].max() == raw.filter(pl.col("patient_id") == top_patient)["cost"].item()
    refused(fetch(bastion, total(scan("visits"), fn("max", col("cost")))))


# ------------------------------------------------------------------ the same value through other paths
def test_max_of_per_person_totals(bastion):
    per_person = op("group_by", input=STRICT, keys=[col("patient_id")], aggs=[alias(fn("sum", col("cost")), "c")])
    refused(fetch(bastion, total(per_person, fn("max", col("c")))))


def test_max_broadcast_to_every_row_then_averaged(bastion):
    # mean(top) over a big group is the broadcast maximum: one person's cost.
    widened = op("with_columns", input=STRICT, exprs=[alias(fn("max", col("cost")), "top")])
    refused(fetch(bastion, op("group_by", input=widened, keys=[col("sex")], aggs=[fn("mean", col("top"))])))


def test_max_inside_an_aggregation_filter(bastion, known, raw):
    target, twin = twins(raw, known, pl.col("cost").max())
    replies = []
    for tenth in (target, twin):
        kept = fn("filter", col("cost"), predicate=fn("is_in", col("patient_id"), values=known + [tenth]))
        replies.append(fetch(bastion, total(STRICT, alias(fn("max", kept), "m"))))
        refused(replies[-1])
    assert without_ids(replies[0]) == without_ids(replies[1])


def test_n_unique_inside_an_aggregation_filter_counts_only_the_kept_rows(bastion, raw):
    # 200 non-smokers and the target, whose smoker flag is missing: n_unique says 2 because of the
    # target's null alone, while the rows the filter drops are no holders of that null.
    non_smokers = raw.filter(pl.col("smoker") == False)["patient_id"][:200].to_list()  # noqa: E712
    target = raw.filter(pl.col("smoker").is_null())["patient_id"][0]
    kept = fn("filter", col("smoker"), predicate=fn("is_in", col("patient_id"), values=non_smokers + [target]))
    assert raw.filter(pl.col("patient_id").is_in(non_smokers + [target]))["smoker"].n_unique() == 2
    refused(fetch(bastion, total(STRICT, alias(fn("n_unique", kept), "distinct"))))


def test_max_over_a_window_stays_row_level(bastion):
    windowed = op("with_columns", input=STRICT,
                  exprs=[alias(fn("over", fn("max", col("cost")), partition_by=[col("zip")]), "m")])
    refused(fetch(bastion, op("group_by", input=windowed, keys=[col("sex")], aggs=[fn("mean", col("m"))])))


# ------------------------------------------------------------------ dominance: amplified and shifted contributions
def amplified(patient_id: int, offset: float = 0.0) -> dict:
    factor = when([(is_patient(patient_id), lit(AMPLIFIER))], lit(1))
    value = binary("mul", col("cost"), factor)
    return binary("add", value, lit(offset)) if offset else value


@pytest.mark.parametrize("offset", [0.0, OFFSET], ids=["amplified", "amplified_and_shifted"])
def test_amplified_contribution_is_stopped_by_dominance(bastion, raw, offset):
    replies = [fetch(bastion, total(STRICT, fn("sum", amplified(p, offset)))) for p in (7, 8)]
    for reply in replies:
        refused(reply)
    assert without_ids(replies[0]) == without_ids(replies[1])


@pytest.mark.parametrize("function", ["mean", "std", "var"])
def test_amplified_contribution_in_other_aggregates(bastion, function):
    refused(fetch(bastion, total(STRICT, fn(function, amplified(7, OFFSET)))))


def test_without_dominance_the_amplified_sum_gives_the_value_away(bastion, raw):
    # The owner turned dominance off: the attacker's arithmetic recovers patient 7's cost to the cent.
    table = released(fetch(bastion, total(scan("no_dominance"), alias(fn("sum", amplified(7)), "s"))))
    others = raw.filter(pl.col("patient_id") != 7)["cost"].sum()
    recovered = (table["s"].item() - others) / AMPLIFIER
    assert recovered == pytest.approx(raw.filter(pl.col("patient_id") == 7)["cost"].item(), abs=0.01)


def test_a_stricter_max_share_applies_on_top_of_the_default(bastion, raw):
    plan = op("group_by", input=scan("strict_share"), keys=[col("diagnosis")], aggs=[fn("sum", col("cost"))])
    distance = (pl.col("cost") - pl.col("cost").median()).abs()
    largest = raw.group_by("diagnosis").agg((distance.max() / distance.sum()).alias("s"))["s"].max()
    assert largest > 0.05  # precondition: one group's largest distance exceeds the owner's share
    refused(fetch(bastion, plan))
    released(fetch(bastion, op("group_by", input=STRICT, keys=[col("diagnosis")], aggs=[fn("sum", col("cost"))])))


def test_equal_contributions_are_not_dominated(bastion, raw):
    constant = binary("add", binary("mul", col("age"), lit(0)), lit(5))
    table = released(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")],
                                       aggs=[alias(fn("sum", constant), "s")])))
    expected = raw.group_by("sex").agg((pl.len() * 5).alias("s"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"), check_dtypes=False)


# ------------------------------------------------------------------ non-finite aggregates
@pytest.mark.parametrize("aggregate", [
    fn("sum", binary("mul", col("cost"), lit(1e305))),
    fn("mean", fn("log", binary("sub", col("age"), lit(50)))),
    fn("std", binary("mul", col("cost"), lit(1e300))),
    fn("sum", binary("mul", col("patient_id"), lit(2 ** 50))),
], ids=["sum_to_inf", "mean_of_nan", "std_to_inf", "integer_sum_overflow"])
def test_non_finite_or_overflowing_aggregates_are_not_released(bastion, raw, aggregate):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[alias(aggregate, "x")])))


def test_non_finite_inner_aggregate_is_not_released_through_an_outer_one(bastion):
    inner = op("group_by", input=STRICT, keys=[col("zip")],
               aggs=[alias(fn("sum", binary("mul", col("cost"), lit(1e305))), "s")])
    refused(fetch(bastion, total(inner, fn("count", col("s")))))


# ------------------------------------------------------------------ honest aggregates still work
def test_honest_max_and_min_that_many_people_share(bastion, raw):
    capped = raw.with_columns(pl.col("age").clip(upper_bound=90))
    assert (capped["age"] == 90).sum() >= 10 and (capped["age"] == capped["age"].min()).sum() >= 10  # precondition
    table = released(fetch(bastion, op("group_by", input=scan("capped"), keys=[col("sex")],
                                       aggs=[alias(fn("max", col("age")), "oldest"),
                                             alias(fn("min", col("age")), "youngest")])))
    expected = capped.group_by("sex").agg(pl.col("age").max().alias("oldest"), pl.col("age").min().alias("youngest"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"))


def test_honest_median_and_distinct_counts(bastion, raw):
    table = released(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")],
                                       aggs=[alias(fn("median", col("age")), "median_age"),
                                             alias(fn("n_unique", col("zip")), "zips"),
                                             alias(fn("n_unique", col("diagnosis")), "diagnoses")])))
    expected = raw.group_by("sex").agg(pl.col("age").median().alias("median_age"),
                                       pl.col("zip").n_unique().alias("zips"),
                                       pl.col("diagnosis").n_unique().alias("diagnoses"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"), check_dtypes=False)


def test_honest_sums_means_and_spread_by_group(bastion, raw):
    plan = op("group_by", input=STRICT, keys=[col("diagnosis")],
              aggs=[alias(fn("sum", col("cost")), "total"), alias(fn("mean", col("cost")), "mean"),
                    alias(fn("std", col("cost")), "std"), alias(length(), "n")])
    expected = raw.group_by("diagnosis").agg(pl.col("cost").sum().alias("total"), pl.col("cost").mean().alias("mean"),
                                             pl.col("cost").std().alias("std"), pl.len().alias("n"))
    assert_frame_equal(released(fetch(bastion, plan)).sort("diagnosis"), expected.sort("diagnosis"),
                       check_dtypes=False)


def test_honest_shifted_sum_is_not_dominated(bastion, raw):
    # Adding a constant to every row moves no contribution away from the others.
    shifted = alias(fn("sum", binary("add", col("cost"), lit(OFFSET))), "s")
    table = released(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[shifted])))
    expected = raw.group_by("sex").agg((pl.col("cost") + OFFSET).sum().alias("s"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"))


def test_honest_max_of_large_group_means(bastion, raw):
    inner = op("group_by", input=STRICT, keys=[col("diagnosis"), col("sex")],
               aggs=[alias(fn("mean", col("cost")), "m")])
    table = released(fetch(bastion, op("group_by", input=inner, keys=[col("sex")], aggs=[fn("max", col("m"))])))
    expected = raw.group_by("diagnosis", "sex").agg(pl.col("cost").mean().alias("m")).group_by("sex").agg(
        pl.col("m").max())
    assert_frame_equal(table.sort("sex"), expected.sort("sex"))


def test_honest_people_counted_by_their_person_column(bastion, raw):
    table = released(fetch(bastion, op("group_by", input=scan("visits"), keys=[col("sex")],
                                       aggs=[alias(fn("n_unique", col("patient_id")), "people")])))
    expected = raw.group_by("sex").agg(pl.col("patient_id").n_unique().alias("people"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"), check_dtypes=False)


def test_honest_sql_aggregates(bastion, raw):
    query = ("SELECT sex, MAX(age) AS oldest, COUNT(DISTINCT zip) AS zips, MEDIAN(age) AS middle, "
             "AVG(cost) AS mean_cost FROM capped GROUP BY sex")
    table = released(fetch(bastion, sql(bastion, query)))
    capped = raw.with_columns(pl.col("age").clip(upper_bound=90))
    expected = capped.group_by("sex").agg(pl.col("age").max().alias("oldest"), pl.col("zip").n_unique().alias("zips"),
                                          pl.col("age").median().alias("middle"),
                                          pl.col("cost").mean().alias("mean_cost"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"), check_dtypes=False)


# ------------------------------------------------------------------ the owner's switch
def test_dominance_is_on_unless_the_policy_file_says_otherwise(tmp_path, patients_csv):
    owner = make_workspace(tmp_path / "workspace", patients_csv)
    path = owner.workspace.datasets_dir / "patients.toml"
    assert "dominance" not in path.read_text()  # a file written before the setting existed reads the same
    assert owner.workspace.catalog()["patients"].policy.dominance is True
    added = run_owner(owner.path, "dataset", "add", "loose", patients_csv, "--no-dominance")
    assert added.returncode == 0, added.stderr
    assert "dominance False" in added.stdout
    shown = run_owner(owner.path, "dataset", "show", "loose")
    assert "dominance = false" in shown.stdout
    assert owner.workspace.catalog()["loose"].policy.dominance is False
    path.write_text(path.read_text().replace("[policy]\n", "[policy]\ndominance = \"no\"\n"))
    with pytest.raises(WorkspaceError) as caught:
        owner.workspace.catalog()
    assert "dominance must be true or false" in str(caught.value)
