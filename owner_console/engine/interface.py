"""What the executor needs from an engine: the one interface every engine (polars, Spark) implements.

The validator, the policy, the decision, the DP ledger, approvals and the
audit log never branch on the engine: they read datasets' columns, types and
key uniqueness, and the tables a plan produces, through these methods only.
Which engine runs a plan is chosen by :func:`owner_console.engine.engine_for`
from its datasets' ``engine`` field.

Nothing an engine answers here is released as data: column names and types
are the schema the scientist may see; key uniqueness, data versions and join
sizes only choose how the policy counts, what an approval covers, and
whether a plan is refused by a limit stated in the policy.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Mapping

import polars as pl

from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset


class Engine(ABC):
    """Reads datasets and runs checked, accounted plans.

    Attributes
    ----------
    name : str
        The engine's name as datasets give it (``"polars"``, ``"spark"``):
        recorded in the audit log's details only.
    """

    name: str
    # True when OpenDP's polars measurement can run end to end over the dataset's LazyFrame (the polars engine):
    # the DP path then releases with ``context(measurement).collect()``; otherwise it asks :meth:`dp_exact` for
    # the exact values and adds OpenDP's noise to them (:mod:`owner_console.dp.release`).
    opendp_lazyframe: bool = False

    # ------------------------------------------------------------ datasets
    @abstractmethod
    def columns(self, dataset: Dataset) -> tuple[str, ...]:
        """The column names of a dataset, in order.

        Raises
        ------
        BastionError
            ``ExecutionError`` when the dataset cannot be read (no path or
            value in the message).
        """

    @abstractmethod
    def schema(self, dataset: Dataset) -> list[tuple[str, str]]:
        """``[(column, dtype name), ...]`` of a dataset, in the plan's vocabulary (``Int64``, ``String``, ``Date``...).

        Raises
        ------
        BastionError
            ``ExecutionError`` when the dataset cannot be read.
        """

    @abstractmethod
    def unique_keys(self, dataset: Dataset, columns: tuple[str, ...]) -> bool:
        """True when no two rows of ``dataset`` share a value of ``columns``.

        The answer only chooses how the policy counts (a join's side with a
        unique key does not repeat the other side's rows); it is held against
        the data the query reads when it runs (``acct_unique``).  False when
        unknown or too costly to tell.
        """

    @abstractmethod
    def data_version(self, dataset: Dataset) -> str:
        """A string that changes whenever the data this engine would read for ``dataset`` changes."""

    # ------------------------------------------------------------ planning checks
    @abstractmethod
    def output_schema(self, plan: dict, catalog: Mapping[str, Dataset]) -> list[tuple[str, str]]:
        """``[(column, dtype name), ...]`` a checked plan would produce, without running it.

        Raises
        ------
        BastionError
            ``SchemaError`` naming the operation whose types do not fit.
        """

    @abstractmethod
    def join_sizes(self, plan: dict, catalog: Mapping[str, Dataset]) -> list[int]:
        """How many rows each inner, left, full or cross join of a checked plan produces, without the join.

        Semi and anti joins never produce more rows than their left side and
        are left out.  Used to enforce a policy's ``max_join_rows`` before a
        join can exhaust the executor's memory; the sizes go to no reply.
        """

    # ------------------------------------------------------------ running
    @abstractmethod
    def run(self, plan: dict, catalog: Mapping[str, Dataset], *,
            cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
        """Compile and run an accounted plan (``policy.account(...).plan``, with its ``acct_*`` nodes).

        Parameters
        ----------
        plan : dict
            The accounted plan.
        catalog : Mapping[str, Dataset]
            The datasets and saved results the plan reads, by name.
        cancel : threading.Event, optional
            Set by another thread to stop the query (a scientist's ``cancel``).
        timeout : float, optional
            Seconds the query may run before it is cancelled.

        Returns
        -------
        polars.DataFrame
            The scientist's columns and the accounting columns.

        Raises
        ------
        BastionError
            ``SchemaError`` while compiling; ``ExecutionError`` while running,
            with the same fixed message for every data failure (never a data
            value); ``LimitExceeded`` after ``timeout``; ``ExecutionError``
            with ``details["cancelled"]`` when ``cancel`` was set.
        """

    @abstractmethod
    def empty_result(self, plan: dict, catalog: Mapping[str, Dataset]) -> pl.DataFrame:
        """A table with no rows and the columns (and polars types) a checked plan would produce.

        What a save whose query failed keeps: it must read no rows, so that
        it cannot fail where the query did.

        Raises
        ------
        BastionError
            ``SchemaError`` as :meth:`output_schema`.
        """

    # ------------------------------------------------------------ differential privacy
    def dp_exact(self, query: Any, catalog: Mapping[str, Dataset], *,
                 cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
        """The exact values OpenDP's polars measurement of a DP query would add noise to, per public key.

        What to compute is the query's (:class:`owner_console.dp.translate.DPQuery`):
        over the dataset's rows, each privacy unit's rows truncated to
        ``max_contributions`` (a uniform random choice, as OpenDP's
        ``truncate_per_group``) when the policy names a privacy unit column,
        then the query's filters, then per combination of the keys' public
        values (:meth:`~owner_console.dp.translate.DPQuery.key_frame`, missing
        groups included with zeros) each part of
        :meth:`~owner_console.dp.translate.DPQuery.exact_parts`: a row count,
        or the sum of a column clamped to its bounds with nulls (and NaN)
        counted as the bounds' midpoint.  Nothing here is released: the DP
        path adds OpenDP's noise to it.

        Returns
        -------
        polars.DataFrame
            The key columns (in their types), then one column per exact part,
            named as the part: one row per key combination.

        Raises
        ------
        BastionError
            ``UnsupportedOperation`` on an engine without it (the default);
            otherwise as :meth:`run`.
        """
        raise BastionError("UnsupportedOperation", f"differentially private queries do not run on the "
                                                   f"{self.name} engine", engine=self.name)
