"""An in-memory Session for the pure language tests (a seam, not one of our components).

It records what the interpreter asked for and answers with fixed dataset
descriptions; ``schema`` answers with the schema of the plan's first source
dataset unless a test set ``schemas`` for that plan's hash.
"""
from __future__ import annotations

from bastion_kernel.language.values import FetchedTable, RequestStatus
from bastion_kernel.plan import plan_hash

PATIENTS_SCHEMA = [["patient_id", "Int64"], ["name", "String"], ["age", "Int64"], ["sex", "String"],
                   ["zip", "String"], ["diagnosis", "String"], ["admission_date", "Date"],
                   ["length_of_stay", "Int64"], ["cost", "Float64"], ["smoker", "Boolean"]]
VISITS_SCHEMA = [["patient_id", "Int64"], ["visit_date", "Date"], ["ward", "String"]]


class FakeSession:
    def __init__(self) -> None:
        self.described = [
            {"name": "patients", "schema": PATIENTS_SCHEMA,
             "policy": {"min_group_size": 10, "unsafe": "review", "hidden": ["name"], "allow_save": True}},
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

    def fetch(self, plan: dict, text: str) -> FetchedTable:
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
