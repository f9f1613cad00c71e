"""``request(N)`` after a kernel restart: a real kernel, a real executor, decisions made while no kernel ran.

The scientist's cells are interrupted while they wait for the owner, the
kernel is shut down, the owner decides, and a new kernel process (nothing of
the old one's memory survives) picks the requests up by number.
"""
from __future__ import annotations

import polars as pl
import pytest

from test_kernel import DATARESOURCE_MIME, bastion_kernel, connect_scientist, execute, of_type, waiting_display

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier


def held_and_interrupted(km, kc, code: str) -> int:
    """Run a cell that waits for the owner, interrupt it, and return its request number."""
    waiting: list[int] = []

    def interrupt_when_waiting(msg):
        found = waiting_display(msg)  # other displays (a progress line while the query runs) may come first
        if found and not waiting:
            waiting.append(int(found.group(1)))
            km.interrupt_kernel()

    reply, _ = execute(kc, code, on_output=interrupt_when_waiting)
    assert reply["status"] == "error" and reply["ename"] == "ReviewPending", reply
    return waiting[0]


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv)


def test_request_after_a_kernel_restart_shows_status_and_fetches(executor, tmp_path, source):
    setup = connect_scientist(executor, tmp_path, name="dave")
    with bastion_kernel(*setup) as (km, kc):
        approved = held_and_interrupted(km, kc, 'dataset("patients").select(col("age"), col("sex")).head(4).fetch()')
        later = held_and_interrupted(km, kc, 'dataset("patients").select(col("cost")).head(2).fetch()')
        rejected = held_and_interrupted(km, kc, 'dataset("patients").select(col("zip")).head(3).fetch()')
    # The kernel is gone; the owner decides two of the three.
    assert executor.owner("approve", str(approved)).returncode == 0
    assert executor.owner("reject", str(rejected), "--reason", "zip codes stay here").returncode == 0

    with bastion_kernel(*setup) as (km, kc):
        reply, outputs = execute(kc, f"request({later})")
        assert reply["status"] == "ok", reply
        plain = of_type(outputs, "execute_result")[0]["data"]["text/plain"]
        assert "pending" in plain and str(later) in plain

        reply, outputs = execute(kc, f"request({approved})")
        assert reply["status"] == "ok", reply
        rows = of_type(outputs, "execute_result")[0]["data"][DATARESOURCE_MIME]["data"]
        assert [(r["age"], r["sex"]) for r in rows] == list(source.select("age", "sex").head(4).iter_rows())

        reply, _ = execute(kc, f"request({rejected})")
        assert reply["status"] == "error" and reply["ename"] == "ReviewRejected"
        assert "zip codes stay here" in reply["evalue"]

        # Asked again while the approval lasts: the same approved rows (a re-release, audited as one).
        reply, outputs = execute(kc, f"request({approved})")
        assert reply["status"] == "ok", reply
        rows = of_type(outputs, "execute_result")[0]["data"][DATARESOURCE_MIME]["data"]
        assert [(r["age"], r["sex"]) for r in rows] == list(source.select("age", "sex").head(4).iter_rows())

        # Approved while this kernel runs: the same number fetches it.
        assert executor.owner("approve", str(later)).returncode == 0
        reply, outputs = execute(kc, f"request({later})")
        assert reply["status"] == "ok", reply
        rows = of_type(outputs, "execute_result")[0]["data"][DATARESOURCE_MIME]["data"]
        assert [r["cost"] for r in rows] == pytest.approx(source["cost"].head(2).to_list())
