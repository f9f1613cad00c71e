"""Differential privacy: a budgeted release mode built on OpenDP.

A dataset whose ``datasets/NAME.toml`` has a ``[dp]`` table releases nothing
but differentially private aggregates.  Every plan that reads such a dataset
comes here instead of the K-anonymity path (``executor.evaluate`` routes it
with :func:`touches_dp`).  One job per module:

- :mod:`.policy`: the owner's ``[dp]`` table (:class:`DPPolicy`) and the
  command-line options that write it.
- :mod:`.translate`: which plans are DP, and plan -> :class:`DPQuery`, the
  subset OpenDP releases (anything else is refused before any budget is spent).
- :mod:`.mechanism`: the OpenDP measurement of a query, built from the
  policy only through OpenDP's public API and calibrated once.
- :mod:`.ledger`: the odometer (:class:`BudgetLedger`), a SQLite file of
  spends charged to the data's content, not its name.
- :mod:`.release`: the entry points: :func:`evaluate`, :func:`preview`,
  :func:`budget`, :func:`schema_of`.

Importing this package loads neither polars nor OpenDP (the owner's
workspace commands read policies without them); the modules that need them
import them when called.
"""
from __future__ import annotations

from .ledger import BudgetLedger, DataVersion, Spent, adopt_legacy_spends, data_version
from .policy import DPPolicy, check_columns, parse_bounds, policy_from_options
from .release import ALPHA, budget, evaluate, preview, schema_of
from .translate import DP_FUNCTIONS, DPQuery, dp_datasets, is_dp_aggregation, touches_dp, translate

__all__ = ["ALPHA", "DP_FUNCTIONS", "BudgetLedger", "DPPolicy", "DPQuery", "DataVersion", "Spent",
           "adopt_legacy_spends", "budget", "check_columns", "data_version", "dp_datasets", "evaluate",
           "is_dp_aggregation", "parse_bounds", "policy_from_options", "preview", "schema_of", "touches_dp",
           "translate"]
