"""An in-memory Session for the pure language tests (a seam, not one of our components).

It records what the interpreter asked for and answers with fixed dataset
descriptions; ``schema`` answers with the schema of the plan's first source
dataset unless a test set ``schemas`` for that plan's hash.  ``plan_of`` and
``refusal`` read what a cell gives.
"""
from __future__ import annotations

import pytest

from bastion_kernel.contract.protocol import BastionError
from bastion_kernel.language.frame import RemoteFrame
from bastion_kernel.language.values import FetchedTable, RequestStatus
from bastion_kernel.contract.plan import plan_hash

PATIENTS_SCHEMA = [["patient_id", "Int64"], ["name", "String"], ["age", "Int64"], ["sex", "String"],
                   ["zip", "String"], ["diagnosis", "String"], ["admission_date", "Date"],
                   ["length_of_stay", "Int64"], ["cost", "Float64"], ["smoker", "Boolean"]]
VISITS_SCHEMA = [["patient_id", "Int64"], ["visit_date", "Date"], ["ward", "String"]]


def plan_of(interp, code: str) -> dict:
    """The plan of the remote frame that the cell ``code`` evaluates to."""
    value = interp.run_cell(code).value
    assert isinstance(value, RemoteFrame), value
    return value.plan


def refusal(interp, code: str) -> BastionError:
    """The error that the cell ``code`` is refused with (the test fails if the cell runs)."""
    with pytest.raises(BastionError) as info:
        interp.run_cell(code)
    return info.value


class FakeSession:
    def __init__(self) -> None:
        self.described = [
            {"name": "patients", "schema": PATIENTS_SCHEMA,
             "policy": {"min_group_size": 10, "unsafe": "review", "hidden": ["name"], "allow_save": True,
                        "bounds": {"age": [0, 100], "length_of_stay": [0, 60], "cost": [0, 200000]}}},
            {"name": "visits", "schema": VISITS_SCHEMA,
             "policy": {"min_group_size": 5, "unsafe": "reject", "hidden": [], "allow_save": False}},
        ]
        self.schemas: dict[str, list[list[str]]] = {}
        self.calls: list[tuple] = []
        self.fetched: list[tuple[dict, str]] = []
        self.saved: list[tuple[dict, str, str]] = []

    def datasets(self) -> list[dict]:
        self.calls.append(("datasets",))
        return self.described

    def schema(self, plan: dict) -> list[list[str]]:
        self.calls.append(("schema", plan))
        if plan_hash(plan) in self.schemas:
            return self.schemas[plan_hash(plan)]
        node = plan
        while node.get("op") != "scan":
            node = node.get("input") or node.get("left") or node["inputs"][0]
        return next(d["schema"] for d in self.described if d["name"] == node["dataset"])

    def fetch(self, plan: dict, text: str, wait: bool = True) -> FetchedTable:
        self.calls.append(("fetch", plan))
        self.fetched.append((plan, text))
        return FetchedTable(frame=None, notes=["fake"], request_id=None)

    def dp_preview(self, plan: dict) -> FetchedTable:
        self.calls.append(("dp_preview", plan))
        return FetchedTable(frame=None, notes=["fake"], request_id=None)

    def budget(self) -> FetchedTable:
        self.calls.append(("budget",))
        return FetchedTable(frame=None, notes=["fake"], request_id=None)

    def request(self, request_id: int):
        self.calls.append(("request", request_id))
        return RequestStatus(request_id, "pending", "waiting for the owner")

    def save(self, plan: dict, name: str, text: str) -> None:
        self.calls.append(("save", plan, name))
        self.saved.append((plan, name, text))


class LocalTablesSession(FakeSession):
    """A FakeSession whose fetches return real tables: the plan run in the kernel on small fixed tables.

    For language tests of fetched results (their operations need a table);
    the tables are made up here, and no executor is involved.
    """

    def __init__(self) -> None:
        super().__init__()
        import datetime

        import polars as pl

        self.tables = {
            "patients": pl.DataFrame({
                "patient_id": list(range(1, 9)), "name": ["*"] * 8, "age": [34, 71, 52, 18, 45, 66, 29, 80],
                "sex": ["F", "M", "F", "M", "F", "F", "M", "M"], "zip": ["75011", "75012", "75011", "69001",
                                                                        "69002", "75011", "13001", "69001"],
                "diagnosis": ["asthma", "influenza", "asthma", "fracture", "influenza", "asthma", "fracture",
                              "influenza"],
                "admission_date": [datetime.date(2023, month, 1) for month in range(1, 9)],
                "length_of_stay": [2, 5, 1, 7, 3, 4, 2, 6],
                "cost": [1200.0, 5300.0, 900.0, 7100.0, 2500.0, 3300.0, 1800.0, 6400.0],
                "smoker": [False, True, False, False, True, False, True, True]}),
            "visits": pl.DataFrame({"patient_id": [1, 2, 2, 5], "visit_date": [datetime.date(2023, 3, d)
                                                                               for d in (1, 2, 3, 4)],
                                    "ward": ["A", "B", "B", "C"]}),
        }

    def fetch(self, plan: dict, text: str, wait: bool = True) -> FetchedTable:
        from bastion_kernel.contract import local

        self.calls.append(("fetch", plan))
        self.fetched.append((plan, text))
        return FetchedTable(frame=local.run(plan, self.tables), notes=[], request_id=None)
