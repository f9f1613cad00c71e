"""The kernel's other channels leak nothing: completion, inspection, magics, comms.

A real ``bastion`` kernel (installed kernelspec) connected to a real executor,
as in test_kernel.py.  Completion and inspection may offer dataset, column and
operation names, never a data value; shell escapes, magics other than
``%%sql`` and comm messages are refused, and the kernel keeps serving.
"""
from __future__ import annotations

import pytest
import polars as pl

from test_kernel import bastion_kernel, connect_scientist, execute, of_type, shell_reply

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def kc(executor, tmp_path_factory):
    with bastion_kernel(*connect_scientist(executor, tmp_path_factory.mktemp("dave"), "dave")) as (_, client):
        reply, _ = execute(client, 'df = dataset("patients")')
        assert reply["status"] == "ok", reply
        yield client


def _values(raw: pl.DataFrame) -> set[str]:
    """Every distinct data value of the table, as text (long enough to be recognisable)."""
    values = set()
    for column in raw.columns:
        if raw[column].dtype == pl.Boolean:
            continue  # True / False are words of the language, not data
        values |= {str(v) for v in raw[column].drop_nulls().unique().to_list()}
    return {v for v in values if len(v) >= 3 and v not in raw.columns}


@pytest.mark.parametrize("code", [
    'df.filter(col("name") == "',
    'df.filter(col("diagnosis") == "h',
    'df.filter(col("name").str.starts_with("A',
    'df.filter(col("zip") == 750',
    'df.filter(col("sex") == "',
    "df.select(col(\"diagnosis\")).",
    'col("name").',
    "",
])
def test_completion_offers_no_data_values(kc, raw, code):
    reply = shell_reply(kc, kc.complete(code, len(code)))
    assert reply["status"] == "ok"
    leaked = set(reply["matches"]) & _values(raw)
    assert not leaked, leaked
    for match in reply["matches"]:
        assert not any(value in match for value in ("Adams", "hypertension", "75001")), match


@pytest.mark.parametrize("code", ["df", 'col("name")', 'dataset("patients")', "df.group_by", "pl.col"])
def test_inspection_offers_no_data_values(kc, raw, code):
    reply = shell_reply(kc, kc.inspect(code, len(code), detail_level=1))
    assert reply["status"] == "ok"
    text = " ".join(str(v) for v in reply.get("data", {}).values())
    leaked = {value for value in _values(raw) if len(value) >= 5 and value in text}
    assert not leaked, sorted(leaked)[:5]


@pytest.mark.parametrize("code", ["!cat /etc/passwd", "%env", "%%bash\necho hi", "%load_ext x", "%run x.py",
                                  "%%javascript\nalert(1)", "%pip install x", "df = 1\n!ls"])
def test_shell_escapes_and_magics_other_than_sql_are_refused(kc, code):
    reply, outputs = execute(kc, code)
    assert reply["status"] == "error" and reply["ename"] == "UnsupportedOperation", reply
    reply, outputs = execute(kc, "6 * 7")
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "42"


def test_sql_cells_go_through_the_policy(kc):
    reply, _ = execute(kc, "%%sql\nSELECT age FROM patients_strict LIMIT 3")
    assert reply["status"] == "error" and reply["ename"] == "PolicyViolation", reply
    reply, outputs = execute(kc, "%%sql\nSELECT sex, COUNT(*) AS n FROM patients_strict GROUP BY sex")
    assert reply["status"] == "ok", reply


def test_comm_messages_are_not_served(kc):
    for msg_type, content in (("comm_open", {"comm_id": "c1", "target_name": "jupyter.widget", "data": {}}),
                              ("comm_msg", {"comm_id": "c1", "data": {"method": "update"}}),
                              ("comm_close", {"comm_id": "c1", "data": {}})):
        kc.shell_channel.send(kc.session.msg(msg_type, content))
    reply = shell_reply(kc, kc.comm_info())
    assert reply["status"] == "ok" and reply["comms"] == {}
    reply, outputs = execute(kc, "6 * 7")
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "42"
