"""The polars compilers of the accounting nodes (``acct_*``) that :mod:`owner_console.policy` adds to a plan.

The policy rewrites a checked plan so that, next to the scientist's columns,
the query computes per-source counts (row ids, contribution counts, the
dominance and finiteness flags :mod:`owner_console.decide` reads).  Those
nodes are only reachable from a plan the policy built: the validator
refuses any name outside the public tables.  :class:`AccountingCompiler` is
the part of the polars compiler (:class:`owner_console.engine.compile.Compiler`)
that compiles them; the compiler dispatches to it through
:meth:`AccountingCompiler.accounting_ops` and
:meth:`AccountingCompiler.accounting_exprs`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import polars as pl

from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .cache import DatasetCache

# Accounting columns' names start with this; frame-wide operations never touch them.
RESERVED_PREFIX = "__bastion"
# Row ids given to at most this many source rows are also written as bit words (id i: bit i % 64 of word
# i // 64), so that distinct ids per group are counted by OR-ing words instead of hashing ids (n_unique):
# see AccountingCompiler._acct_row_id and AccountingCompiler._distinct_ids.
BITSET_MAX_ROWS = 256
_BITS = pl.Series("bits", [1 << i for i in range(64)], dtype=pl.UInt64)
# Frame operations that never add rows (the row-count bound of AccountingCompiler._row_bound passes through them).
_ROW_KEEPING_OPS = frozenset({"filter", "sort", "head", "slice", "drop_nulls", "unique", "drop", "rename",
                              "with_columns", "fill_null", "acct_unique"})
ACCOUNT_DTYPE = pl.Int64  # every accounting column has this dtype, so frames line up in concat


def _account_distinct(node: dict) -> pl.Expr:
    """Distinct source rows in a group, from a row-id column (null: not fed, 0: unmatched join side)."""
    c = pl.col(node["column"])
    count = c.filter(c > 0).n_unique() if node["taintable"] or node["nullable"] else c.n_unique()
    return _guarded(node, c, count)


def _account_sum(node: dict) -> pl.Expr:
    """Source rows in a group, from per-row counts; ``exact`` is False when rows may share source rows."""
    c = pl.col(node["column"])
    total = c.sum() if node["exact"] else pl.lit(1, dtype=ACCOUNT_DTYPE)
    return _guarded(node, c, total)


def _guarded(node: dict, c: pl.Expr, count: pl.Expr) -> pl.Expr:
    # Order matters: an empty group is fed by 0 rows; a group with an unmatched
    # join row is marked 0 (fails the rule); a group with no row from this
    # source is null (not fed by it).
    if not (node["taintable"] or node["nullable"] or node["global"]):
        return count.alias(node["name"])
    expr = pl.when(pl.len() == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
    if node["nullable"]:
        expr = expr.when(c.is_null().all()).then(pl.lit(None, dtype=ACCOUNT_DTYPE))
    if node["taintable"]:
        expr = expr.when((c == 0).any()).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
    return expr.otherwise(count).alias(node["name"])


def _account_one_row(node: dict) -> pl.Expr:
    """Each row now holds individual values: it counts as fed by one source row."""
    c = pl.col(node["column"])
    return (pl.when(c.is_null()).then(pl.lit(None, dtype=ACCOUNT_DTYPE))
            .when(c == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            .otherwise(pl.lit(1, dtype=ACCOUNT_DTYPE)).alias(node["name"]))


def _account_unmatched(node: dict) -> pl.Expr:
    """After an outer join: 0 where the row had no partner on this source's side."""
    side = [pl.col(c).is_null() for c in node["side"]]
    return (pl.when(pl.all_horizontal(side)).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            .otherwise(pl.col(node["column"])).alias(node["column"]))


# Accounting expressions that yield polars' own count dtype (UInt32, or Float64
# for a share): the compiler casts their columns to ACCOUNT_DTYPE in a
# with_columns after the operation, because a cast inside ``agg`` takes
# polars off its fast group-by path (3.4x slower, benchmarks/RESULTS.md).
_UNCAST_ACCOUNTING = frozenset({"acct_len", "acct_distinct", "acct_sum", "acct_contrib", "acct_share",
                                "acct_held"})


def cast_accounting(frame: pl.LazyFrame, exprs: list[dict]) -> pl.LazyFrame:
    """``frame`` with the columns of the accounting expressions among ``exprs`` cast to :data:`ACCOUNT_DTYPE`."""
    names = [e["name"] for e in exprs if e["expr"] in _UNCAST_ACCOUNTING]
    return frame.with_columns(pl.col(names).cast(ACCOUNT_DTYPE)) if names else frame


_ACCOUNT_EXPRS: dict[str, Callable[[dict], pl.Expr]] = {
    "acct_col": lambda n: pl.col(n["name"]),
    "acct_const": lambda n: pl.lit(n["value"], dtype=ACCOUNT_DTYPE).alias(n["name"]),
    "acct_len": lambda n: pl.len().alias(n["name"]),
    "acct_distinct": _account_distinct,
    "acct_sum": _account_sum,
    "acct_one_row": _account_one_row,
    "acct_unmatched": _account_unmatched,
}


def _fewest_holders(values: pl.Expr) -> pl.Expr:
    """The fewest times one distinct value (null included) occurs in ``values`` (null when empty)."""
    return values.value_counts(name="count").struct.field("count").min()


class AccountingCompiler:
    """The compilers of the ``acct_*`` frame operations and expressions (a mixin of the polars compiler).

    They read and extend the compiler's state: ``catalog``, ``cache``,
    ``scope`` (the input of the expressions being compiled), ``tables`` (the
    table each dataset's scan read), ``row_words`` and, while an aggregation
    is compiled, ``extra_aggs``, ``post_aggs`` and ``helper_columns``; and
    they compile their inputs with its ``frame``, ``expr``, ``_exprs``,
    ``_on`` and ``_dtype``.
    """

    catalog: Mapping[str, Dataset]
    cache: DatasetCache
    scope: pl.LazyFrame | None
    tables: dict[str, pl.DataFrame]
    row_words: dict[str, list[str]]
    extra_aggs: list[pl.Expr] | None
    post_aggs: list[pl.Expr]
    helper_columns: list[str]

    def accounting_ops(self) -> dict[str, Callable[[dict], pl.LazyFrame]]:
        """The internal frame operations, by name, as the compiler dispatches them."""
        return {"acct_row_id": self._acct_row_id, "acct_columns": self._acct_columns,
                "acct_person_id": self._acct_person_id, "acct_unique": self._acct_unique}

    def accounting_exprs(self) -> dict[str, Callable[[dict], pl.Expr]]:
        """The internal expression kinds, by name, as the compiler dispatches them."""
        return {
            **_ACCOUNT_EXPRS,
            "acct_distinct": self._acct_distinct,
            "acct_contrib": self._acct_contrib, "acct_share": self._acct_share,
            "acct_held": self._acct_held, "acct_finite": self._acct_finite,
            "acct_min": lambda n: pl.col(n["column"]).min().alias(n["name"]),
            "acct_max": lambda n: pl.col(n["column"]).max().alias(n["name"]),
        }

    def _with_distances(self, frame: pl.LazyFrame, keys: list[pl.Expr] | None,
                        nodes: list[dict]) -> tuple[pl.LazyFrame, list[pl.Expr] | None]:
        """Give ``frame`` the columns the dominance checks of an aggregation read (:meth:`_acct_share`).

        ``keys``: the group_by's keys (None: one group, a global select).  Per
        check, a first aggregation finds each group's median, max and min of
        the aggregated values; joined back (row order kept), they give each
        row its distance from the median and mark the values that are not the
        max (min), whose max (min) is the second largest (smallest).  The
        aggregation itself then only sums, takes maxima and first values of
        plain columns, which keeps polars on its fast path.  Returns the frame
        and the keys to group it by (the key columns it now carries, under
        their output names).
        """
        shares = [n for n in nodes if n["expr"] == "acct_share" and n["exact"]]
        if not shares:
            return frame, keys
        self._on(frame)
        values = {n["name"]: self.expr(n["input"]).cast(pl.Float64, strict=False) for n in shares}
        centres = [agg for name, value in values.items()
                   for agg in (value.median().alias(f"{name}__median"), value.max().alias(f"{name}__max"),
                               value.min().alias(f"{name}__min"))]
        if keys is None:
            frame = frame.with_columns(centres)
        else:
            key_columns = [f"{RESERVED_PREFIX}_key{i}" for i in range(len(keys))]
            frame = frame.with_columns([k.alias(c) for k, c in zip(keys, key_columns)])
            found = frame.group_by(key_columns).agg(centres)
            frame = frame.join(found, on=key_columns, how="left", nulls_equal=True, maintain_order="left")
            keys = [pl.col(c).alias(k.meta.output_name()) for k, c in zip(keys, key_columns)]
        columns = []
        for name, value in values.items():
            largest, smallest = pl.col(f"{name}__max"), pl.col(f"{name}__min")
            columns += [(value - pl.col(f"{name}__median")).abs().alias(f"{name}__distance"),
                        pl.when(value < largest).then(value).alias(f"{name}__below_max"),
                        pl.when(value > smallest).then(value).alias(f"{name}__above_min"),
                        (value == largest).alias(f"{name}__at_max"), (value == smallest).alias(f"{name}__at_min")]
        frame = frame.with_columns(columns)
        self._on(frame)
        return frame, keys

    def _acct_row_id(self, node: dict) -> pl.LazyFrame:
        # Row ids start at 1: 0 marks "no partner in an outer join", null "not from this source".
        frame = self.frame(node["input"])
        name = node["name"]
        frame = frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=ACCOUNT_DTYPE).alias(name))
        bound = self._row_bound(node["input"])
        if bound is None or bound > BITSET_MAX_ROWS or name in self.row_words:
            self.row_words[name] = []  # unknown, too many, or a second branch: ids are counted by hashing
            return frame
        # At most BITSET_MAX_ROWS rows here: the words cost nothing to make, and then travel with the ids.
        ids = pl.col(name)
        words = [f"{name}__bits{w}" for w in range(bound // 64 + 1)]
        self.row_words[name] = words
        return frame.with_columns(
            pl.when(ids // 64 == w).then(pl.lit(_BITS).gather(ids % 64)).otherwise(pl.lit(0, dtype=pl.UInt64))
            .alias(word) for w, word in enumerate(words))

    def _row_bound(self, node: dict) -> int | None:
        """An upper bound of a frame's row count known without running it, or None.

        Only a dataset's table as the scan read it and operations that never
        add rows are followed; anything else (a join, explode, concat, select,
        group_by, a streamed or saved source) is unknown.
        """
        bound: int | None = None
        while node["op"] in _ROW_KEEPING_OPS:  # each has one input, its "input" (acct_unique too)
            limit = node["n"] if node["op"] == "head" else node["length"] if node["op"] == "slice" else None
            if limit is not None:
                bound = max(limit, 0) if bound is None else min(bound, max(limit, 0))
            node = node["input"]
        table = self.tables.get(node["dataset"]) if node["op"] == "scan" else None
        if table is None:
            return None
        return table.height if bound is None else min(bound, table.height)

    def _distinct_ids(self, node: dict, mask: pl.Expr | None) -> pl.Expr | None:
        """The number of distinct row ids of ``node["column"]`` in a group (where ``mask``), from bit words.

        Registers one ``bitwise_or`` aggregation per word and returns the
        expression that counts their bits after the aggregation; None (hash
        the ids) outside an aggregation or when the words are not in its
        input (a select, concat or saved result in between dropped them).
        Exact: distinct ids >= 1 set distinct bits, rows of other sources
        (null ids) have null words, and 0 ids (no partner) are never set.
        """
        words = self.row_words.get(node["column"], [])
        if self.extra_aggs is None or not words or \
                not set(words) <= set(self.scope.collect_schema().names()):
            return None
        zero = pl.lit(0, dtype=pl.UInt64)
        parts = []
        for index, word in enumerate(words):
            part = f"{node['name']}__or{index}"
            value = pl.col(word) if mask is None else pl.when(mask).then(pl.col(word)).otherwise(zero)
            self.extra_aggs.append(value.bitwise_or().alias(part))
            self.helper_columns.append(part)
            parts.append(pl.col(part).bitwise_count_ones().fill_null(0).cast(ACCOUNT_DTYPE))
        return pl.sum_horizontal(parts)

    def _helper_agg(self, node: dict, label: str, expr: pl.Expr) -> pl.Expr:
        """Compute ``expr`` in the aggregation as a helper column; the column, for an expression after it."""
        name = f"{node['name']}__{label}"
        self.extra_aggs.append(expr.alias(name))
        self.helper_columns.append(name)
        return pl.col(name)

    def _acct_distinct(self, node: dict) -> pl.Expr:
        count = self._distinct_ids(node, None)
        if count is None:
            return _account_distinct(node)
        c = pl.col(node["column"])
        if node["taintable"] or node["nullable"] or node["global"]:
            # _guarded's conditions, aggregated apart and combined after the aggregation.
            expr = pl.when(self._helper_agg(node, "len", pl.len()) == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            if node["nullable"]:
                expr = expr.when(self._helper_agg(node, "unfed", c.is_null().all())).then(
                    pl.lit(None, dtype=ACCOUNT_DTYPE))
            if node["taintable"]:
                expr = expr.when(self._helper_agg(node, "tainted", (c == 0).any())).then(
                    pl.lit(0, dtype=ACCOUNT_DTYPE))
            count = expr.otherwise(count)
        self.post_aggs.append(count.alias(node["name"]))
        return self._placeholder(node)

    def _placeholder(self, node: dict) -> pl.Expr:
        # Stands in the aggregation for a count computed after it (dropped then).
        name = f"{node['name']}__placeholder"
        self.helper_columns.append(name)
        return pl.lit(0, dtype=pl.UInt32).alias(name)

    def _acct_columns(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return cast_accounting(frame.with_columns(self._on(frame)._exprs(node["exprs"])), node["exprs"])

    def _acct_unique(self, node: dict) -> pl.LazyFrame:
        # The policy counted the join's left side as not repeated because this
        # side's key is unique: hold that against the very table the query
        # reads, so a file replaced since the policy asked fails closed.
        frame = self.frame(node["input"])
        dataset = self.catalog[node["dataset"]]
        table = self.tables.get(node["dataset"])
        if table is None or not self.cache.unique_keys(dataset, tuple(node["columns"]), table):
            raise BastionError("ExecutionError", f"dataset {node['dataset']!r} changed while this query was "
                                                 "being prepared; run it again", changed=True)
        return frame

    def _acct_person_id(self, node: dict) -> pl.LazyFrame:
        # One id per person (1, 2, ...), so counting distinct ids counts people;
        # rows without a person id count as one more person together.
        frame = self.frame(node["input"])
        rank = pl.col(node["column"]).rank("dense").cast(ACCOUNT_DTYPE)
        return frame.with_columns(rank.fill_null(rank.max().fill_null(0) + 1).alias(node["name"]))

    def _acct_contrib(self, node: dict) -> pl.Expr:
        """How many source rows (or people) made a real contribution to an aggregate.

        A row contributes when its input value is not null, not zero (a
        false boolean is zero), and, when the policy marks the input as
        possibly ``padded``, not the value most rows of the group share (an
        indicator padded with a constant other than zero).  Counting
        functions (``count``, ``n_unique``, ``null_count``) count every non-null value.
        """
        value = self.expr(node["input"])
        dtype = self._dtype(value, "aggregation")
        present = value.is_not_null()
        if node["function"] in ("count", "n_unique", "null_count"):
            mask = present
        else:
            if dtype == pl.Boolean:
                mask = present & value
            elif dtype.is_numeric():
                mask = present & (value != 0)
            else:
                mask = present
        if node["padded"]:
            mode = value.drop_nulls().mode().first()
            mask = mask & ((value != mode).fill_null(True) | ((value == mode).sum() <= 1))
        return self._contributors(node, mask)

    def _contributors(self, node: dict, mask: pl.Expr) -> pl.Expr:
        """The source rows (people) of ``node["column"]`` among the rows where ``mask`` holds, per group.

        ``implicit``: the rows; ``rid``: distinct row (person) ids; ``count``:
        the summed counts of aggregated rows when they are fed by disjoint
        source rows, else the rows.  Null when no row of the group comes from
        the source (after a concat).
        """
        column = node["column"]
        if node["kind"] == "implicit":
            return mask.sum().alias(node["name"])
        if node["kind"] == "rid":
            counted = self._distinct_ids(node, mask)
            if counted is not None:
                fed = self._helper_agg(node, "fed", pl.col(column).is_not_null().any())
                self.post_aggs.append(pl.when(fed).then(counted).alias(node["name"]))
                return self._placeholder(node)
            rid = pl.col(column)
            count = rid.filter(mask & (rid > 0)).n_unique()
        else:
            counts = pl.col(column)
            fed = mask & (counts > 0)
            count = counts.filter(fed).sum() if node["exact"] else fed.sum()
        # A group with no row of this source (after a concat) was not fed by it.
        return pl.when(pl.col(column).is_not_null().any()).then(count).alias(node["name"])

    def _acct_held(self, node: dict) -> pl.Expr:
        """How many source rows (people) hold the value an order statistic releases, per group.

        For ``min``, ``max``, ``median`` and ``quantile``: the contributors
        whose input equals the aggregate (a median between two values is held
        by nobody).  For ``n_unique``: the fewest rows (people) holding one of
        the distinct values it counts (null is a value for ``n_unique``), among
        the rows the aggregation keeps (``kept``: its inner filters); values
        no row of this source holds are not this source's.  On aggregated
        rows (``count``), each row's count of source rows is a lower bound of
        the people behind its value.
        """
        call = node["call"]
        value = self.expr(call["input"])
        column = node["column"]
        if call["name"] != "n_unique":
            held = (value == self.expr(call)).fill_null(False)
            return self._contributors(node, held)
        kept = pl.lit(True) if node["kept"] is None else self.expr(node["kept"]).fill_null(False)
        # value_counts, not unique_counts: polars' streaming engine fails on a
        # filtered unique_counts in a select.
        if node["kind"] == "implicit":
            return _fewest_holders(value.alias("value").filter(kept)).alias(node["name"])
        if node["kind"] == "rid":
            rid = pl.col(column)
            pairs = pl.struct(value.alias("value"), rid.alias("id")).filter(kept & (rid > 0)).unique()
            fewest = _fewest_holders(pairs.struct.field("value"))
        else:
            counts = pl.col(column)
            fewest = counts.filter(kept & (counts > 0)).min()
        return pl.when(pl.col(column).is_not_null().any()).then(fewest).alias(node["name"])

    def _acct_share(self, node: dict) -> pl.Expr:
        """Whether a contribution dominates an aggregate: 0 no, 1 yes, 2 unsure (measure exactly).

        Each contribution's distance is taken from its group's median, so
        adding a constant to every row changes nothing and amplified
        contributions cannot move the centre.  With ``top_two`` (millionths),
        the N-K rule: the two largest distances make up more than that share
        of the total; with ``p_ratio``, the p-ratio rule: the total minus the
        two largest is less than that share of the largest; with ``largest``,
        the largest alone makes up more than that share.

        Without ``exact``, a bound from plain aggregates (count, variance,
        max, min) clears a group whatever its median: every distance is at
        most the range R = max - min, and their total is at least n * var / R
        (the squared distances from the median add up to at least n * var,
        and each is at most R times the distance), so no rule can fire when
        n * var >= F * R**2 (:func:`_clearing_factor`).  Large groups of
        ordinary values are cleared this way; a group that is not is 2, and
        the executor measures the plan again with ``exact``.  A variance or
        range that is not a finite number is 1 (fail closed).
        """
        name = node["name"]
        value = self.expr(node["input"]).cast(pl.Float64, strict=False)
        inside = self.extra_aggs is not None
        if not node["exact"]:
            parts = {"n": value.count(), "var": value.var(ddof=0), "max": value.max(), "min": value.min()}
            if inside:
                parts = {label: self._helper_agg(node, label, expr) for label, expr in parts.items()}
            spread = parts["max"] - parts["min"]
            spread_total = parts["n"].cast(pl.Float64) * parts["var"]
            flag = (pl.when(~spread_total.is_finite() | ~spread.is_finite()).then(1)
                    .when((spread == 0) | (spread_total >= _clearing_factor(node) * spread ** 2)).then(0)
                    .otherwise(2))
            return self._finish_share(node, flag, inside)
        if inside and f"{name}__distance" in self.scope.collect_schema().names():
            def part(label: str, expr: pl.Expr) -> pl.Expr:
                return self._helper_agg(node, label, expr)
            median = part("median", pl.col(f"{name}__median").first())
            largest_value = part("max", pl.col(f"{name}__max").first())
            smallest_value = part("min", pl.col(f"{name}__min").first())
            second_largest = pl.when(part("maxes", pl.col(f"{name}__at_max").sum()) > 1).then(largest_value) \
                .otherwise(part("below", pl.col(f"{name}__below_max").max()))
            second_smallest = pl.when(part("mins", pl.col(f"{name}__at_min").sum()) > 1).then(smallest_value) \
                .otherwise(part("above", pl.col(f"{name}__above_min").min()))
            total = part("total", pl.col(f"{name}__distance").sum())
            # The two largest distances on each side of the median (a side may have one value, or none: 0).
            high1 = (largest_value - median).clip(0)
            high2 = (second_largest - median).fill_null(median).clip(0)
            low1 = (median - smallest_value).clip(0)
            low2 = (median - second_smallest).fill_null(median).clip(0)
            top_one = pl.max_horizontal(high1, low1)
            top_two = pl.max_horizontal(high1 + high2, high1 + low1, low1 + low2)
        else:
            inside = False
            distance = (value - value.median()).abs()
            total, top_one, top_two = distance.sum(), distance.max(), distance.top_k(2).sum()
        dominated = ~total.is_finite()
        if node.get("top_two") is not None:
            dominated = dominated | ((total > 0) & (top_two > total * node["top_two"] / 1_000_000))
        if node.get("p_ratio") is not None:
            dominated = dominated | ((top_one > 0) & (total - top_two < top_one * node["p_ratio"] / 1_000_000))
        if node.get("largest") is not None:
            dominated = dominated | ((total > 0) & (top_one > total * node["largest"] / 1_000_000))
        return self._finish_share(node, dominated.fill_null(False).cast(ACCOUNT_DTYPE), inside)

    def _finish_share(self, node: dict, flag: pl.Expr, inside: bool) -> pl.Expr:
        # Inside an aggregation the flag combines helper aggregations: it is computed after it.
        if not inside:
            return flag.alias(node["name"])
        self.post_aggs.append(flag.alias(node["name"]))
        return self._placeholder(node)

    def _acct_finite(self, node: dict) -> pl.Expr:
        """1 when an aggregate is finite and did not overflow, else 0 (inf, -inf, NaN, a wrapped integer sum)."""
        call = node["call"]
        aggregate = self.expr(call)
        dtype = self._dtype(aggregate, "aggregation")
        if dtype.is_float():
            finite = aggregate.is_finite().fill_null(True)
        elif dtype.is_integer() and call["name"] == "sum":
            # polars wraps an integer sum around on overflow: the same sum in
            # floating point says whether it left the type's range (with a
            # margin for the float's rounding).
            low, high = _INTEGER_RANGE[str(dtype)]
            approximate = self.expr(call["input"]).cast(pl.Float64, strict=False).sum()
            finite = approximate.is_between(low * _RANGE_MARGIN, high * _RANGE_MARGIN).fill_null(True)
        else:
            finite = pl.lit(True)
        return finite.cast(ACCOUNT_DTYPE).alias(node["name"])



def _clearing_factor(node: dict) -> float:
    """F such that n * var >= F * range**2 proves no dominance rule of ``node`` can fire.

    With T >= n * var / R the total distance and every distance <= R: the
    N-K rule needs 2R > k T, cleared when T >= (2 / k) R; the p-ratio rule
    needs T - 2R < p R, cleared when T >= (2 + p) R; the largest-share rule
    needs R > s T, cleared when T >= R / s.
    """
    factors = [1.0]
    if node.get("top_two") is not None:
        factors.append(2 / (node["top_two"] / 1_000_000))
    if node.get("p_ratio") is not None:
        factors.append(2 + node["p_ratio"] / 1_000_000)
    if node.get("largest") is not None:
        factors.append(1 / (node["largest"] / 1_000_000))
    return max(factors)


# The range of each integer type an integer sum can have, and the share of it
# within which a sum computed in floating point is surely not wrapped around.
_INTEGER_RANGE = {f"{sign}Int{bits}": (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if sign == "" else
                  (0.0, 2.0 ** bits - 1) for sign in ("", "U") for bits in (8, 16, 32, 64, 128)}
_RANGE_MARGIN = 0.999_999
