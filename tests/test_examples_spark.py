"""The example notebook, the README's cells and the language reference's examples on a Spark-backed dataset
give the answers they give on polars.

Two demo workspaces are built as ``python -m owner_console.demo`` builds one
(``bastion-owner init``, ``dataset add``, ``scientist add``, the scientist's
``bastion-kernel keygen``/``connect``/``install``) and each is served by the
demo's own executor (``--no-lab``): one as the demo makes it (every dataset on
polars), one whose ``patients`` is registered first with ``bastion-owner
dataset add patients SOURCE --engine spark`` over the same CSV file with the
demo's policy options, and a ``[spark]`` table (``local[2]``, two shuffle
partitions, no UI) in its ``config.toml``.  ``patients_dp`` stays on polars in
both: differentially private datasets cannot be on Spark (docs/scale-out.md);
the notebook only lists it.

``examples/scientist.ipynb`` with the README's example cells, and every ``>>>``
example of the language reference (a remote frame fetched), run cell by cell
on a real Bastion kernel (nbclient on jupyter_client), one kernel per
workspace and test, as a batch run: a held cell ends at once with ``ReviewPending``.
After each cell the owner approves whatever it left pending (as ``bastion-owner
approve`` does) and the cell runs again, so both the held replies and the
approved answers are compared.  Every output of every cell must be the same on
both engines: errors and notes word for word, released values equal (floats to
1e-9 relative; numbers printed as text, rounded for display, to their printed
precision), column names and dtypes identical, rows in the same order wherever
the language defines one (see :func:`rows`).  The examples the Spark engine
refuses by design (:data:`REFUSED_ON_SPARK`) must be refused, naming the function.
"""
from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

from bastion_kernel.contract.protocol import BastionError
from conftest import run_owner, spark_unavailable
from owner_console import demo
from owner_console.approvals import record_decision
from owner_console.sample_data import write_patients
from owner_console.workspace import Workspace
from test_demo import DATARESOURCE, EXAMPLES, ROOT, DemoProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.spark]

ENGINES = ("polars", "spark")
SPARK_SETTINGS = """
[spark]
master = "local[2]"

[spark.conf]
"spark.sql.shuffle.partitions" = "2"
"spark.ui.enabled" = "false"
"""
STARTUP_SECONDS = 180
VEGALITE = "application/vnd.vegalite.v5+json"
FLOAT_TOLERANCE = 1e-9
# A number printed for a person (polars' table repr, a chart's text) keeps about six significant digits.
PRINTED_TOLERANCE = 1e-5
# What the kernel shows while a reply is slow, then replaces: when it appears is a matter of timing.
PROGRESS = re.compile(r"(running on the owner's executor — \d+ s"
                      r"|query .* after \d+ s on the owner's executor)")
# What leaves the order of a result's rows open, and of the values in a list (polars' mode() and unique()).
ROWS_UNORDERED = re.compile(r"group_by\(|GROUP BY|\.unique\(")
LISTS_UNORDERED = re.compile(r"\.(mode|unique)\(\)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@dataclass
class Demo:
    """One demo directory and its running executor."""

    engine: str
    directory: Path
    process: DemoProcess

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.directory / "workspace")

    @property
    def config(self) -> Path:
        return self.directory / "scientist" / "config.toml"


def register_patients_on_spark(directory: Path) -> None:
    """A workspace with the demo's ``patients`` on Spark, before the demo's set-up (which then reuses it)."""
    data_file = directory / "data" / "patients.csv"
    data_file.parent.mkdir(parents=True)
    write_patients(data_file)
    workspace = directory / "workspace"
    for args in (["init"], ["dataset", "add", demo.DATASET, data_file, "--engine", "spark",
                            "--min-group-size", demo.MIN_GROUP_SIZE,
                            *[arg for column in demo.HIDDEN_COLUMNS for arg in ("--hide", column)],
                            *demo.PUBLIC_BOUNDS]):
        done = run_owner(workspace, *args)
        assert done.returncode == 0, done.stdout + done.stderr
        if args == ["init"]:
            with open(workspace / "config.toml", "a", encoding="utf-8") as config:
                config.write(SPARK_SETTINGS)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    reason = spark_unavailable()
    if reason is not None:
        pytest.skip(reason)
    running: dict[str, Demo] = {}
    try:
        # One after the other: each set-up installs the same kernelspec.
        for engine in ENGINES:
            directory = tmp_path_factory.mktemp(engine) / "demo"
            if engine == "spark":
                register_patients_on_spark(directory)
            process = DemoProcess(directory, "--no-lab", "--port", str(free_port()))
            running[engine] = Demo(engine, directory, process)
            process.wait_for("Bastion demo is running")
            # The same patience on both: a first describe() on Spark takes 10-30 s on a busy two-core machine
            # (the kernel's default wait is 30 s); what is compared is the answers, not the time to them.
            with open(running[engine].config, "a", encoding="utf-8") as config:
                config.write(f"timeout_seconds = {STARTUP_SECONDS}\n")
            start_the_engine(running[engine])
        catalog = running["spark"].workspace.catalog()
        assert catalog["patients"].engine == "spark" and catalog["patients_dp"].engine == "polars"
        assert running["polars"].workspace.catalog()["patients"].engine == "polars"
        yield running
    finally:
        statuses = {engine: each.process.interrupt() for engine, each in running.items()}
    assert all(status == 0 for status in statuses.values()), {e: d.process.output() for e, d in running.items()}


def start_the_engine(running: Demo) -> None:
    """Ask once what the datasets are: the executor starts its Spark on the first question about a Spark
    dataset (5-25 s), before any cell's progress display starts counting."""
    from bastion_kernel.client import ExecutorClient
    from bastion_kernel.config import load_config

    client = ExecutorClient.from_config(load_config(running.config))
    try:
        assert {entry["name"] for entry in client.datasets()} == {demo.DATASET, demo.DP_DATASET}
    finally:
        client.close()


# -- running cells -------------------------------------------------------------------------

def approve_pending(workspace: Workspace) -> list[int]:
    """The owner approves every pending request (``bastion-owner approve``'s own function); their ids."""
    store, audit = workspace.approvals(), workspace.audit_log()
    try:
        pending = [request.id for request in store.list("pending")]
        for request_id in pending:
            record_decision(store, audit, request_id, True, "approved by the owner")
        return pending
    finally:
        store.close()


def run_cells(running: Demo, sources: list[str], workdir: Path) -> list[dict]:
    """Run each source as a code cell on one Bastion kernel; a cell that left requests pending runs again
    once the owner approved them.  One record per cell: its source, outputs, and outputs after approval."""
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "bastion", "display_name": "Bastion",
                                                                 "language": "bastion"}},
                                        cells=[nbformat.v4.new_code_cell(source) for source in sources])
    client = NotebookClient(notebook, timeout=180, kernel_name="bastion", allow_errors=True,
                            resources={"metadata": {"path": str(workdir)}})
    records = []
    with client.setup_kernel(env=dict(os.environ, BASTION_CONFIG=str(running.config))):
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
            record = {"source": cell.source, "outputs": list(cell.outputs), "approved": None, "after": None}
            approved = approve_pending(running.workspace)
            if approved:
                client.execute_cell(cell, index)
                record.update(approved=approved, after=list(cell.outputs))
            records.append(record)
    return records


def on_both(demos: dict[str, Demo], sources: list[str], workdirs: dict[str, Path]) -> dict[str, list[dict]]:
    """:func:`run_cells` on both engines at once (each its own kernel, executor and workspace)."""
    with ThreadPoolExecutor(len(demos)) as pool:
        running = {engine: pool.submit(run_cells, each, sources, workdirs[engine]) for engine, each in demos.items()}
        return {engine: future.result() for engine, future in running.items()}


def notebook_sources(path: Path) -> list[str]:
    return [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def readme_sources() -> list[str]:
    """The README's example cells: each line of its language block, and its ``%%sql`` block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    [language] = re.findall(r"## The language\n\n```python\n(.*?)```", text, flags=re.S)
    [sql] = re.findall(r"```sql\n(%%sql\n.*?)```", text, flags=re.S)
    return [line for line in language.splitlines() if line.strip()] + [sql.strip()]


# -- comparing outputs -----------------------------------------------------------------------

class Printed(float):
    """A number as text shows it, rounded for a person: compared to :data:`PRINTED_TOLERANCE`."""


def differences(want: Any, got: Any, where: str) -> list[str]:
    """Where two JSON values differ: floats to :data:`FLOAT_TOLERANCE` (relative), all else exactly."""
    if isinstance(want, float) or isinstance(got, float):
        tolerance = PRINTED_TOLERANCE if isinstance(want, Printed) else FLOAT_TOLERANCE
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (want, got))
        if numbers and math.isclose(want, got, rel_tol=tolerance, abs_tol=tolerance):
            return []
        return [] if want == got else [f"{where}: {want!r} != {got!r}"]
    if isinstance(want, dict) and isinstance(got, dict):
        if want.keys() != got.keys():
            return [f"{where}: keys {sorted(want)} != {sorted(got)}"]
        return [d for key in want for d in differences(want[key], got[key], f"{where}.{key}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: {len(want)} items != {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if want == got else [f"{where}: {want!r} != {got!r}"]


def printed(text: str) -> list:
    """Text as its words and its numbers (whole numbers exactly, others as :class:`Printed`)."""
    parts: list = []
    position = 0
    for found in NUMBER.finditer(text):
        parts.append(text[position:found.start()])
        number = found.group()
        parts.append(Printed(number) if "." in number or "e" in number else int(number))
        position = found.end()
    parts.append(text[position:])
    return parts


def table_outline(bundle: dict) -> dict:
    """A released table's output without its rows (compared through the data resource): its shape line,
    column names and dtypes, and the notes under it, as text and as HTML."""
    html = bundle.get("text/html", "")
    lines = bundle.get("text/plain", "").splitlines()
    box_end = max((i for i, line in enumerate(lines) if line.startswith("└")), default=-1)
    return {"shape": lines[0] if lines else "",
            "columns": re.findall(r"<th>(.*?)<br><span[^>]*>(.*?)</span></th>", html),
            "text notes": printed("\n".join(lines[box_end + 1:])),
            "html notes": printed(html.split("</table>", 1)[-1])}


def canonical(found: list[dict]) -> list[dict]:
    return sorted(found, key=lambda row: json.dumps(row, sort_keys=True, default=str))


def rows(resource: dict, source: str) -> list[dict] | dict:
    """The data resource's rows, as far as the cell defines them (see :func:`unordered`, :func:`sorted_by`)."""
    found = resource["data"]
    if LISTS_UNORDERED.search(source):
        found = [{name: sorted(value, key=json.dumps) if isinstance(value, list) else value
                  for name, value in row.items()} for row in found]
    if unordered(source):
        return canonical(found)
    keys, cut = sorted_by(source)
    if not keys or not all(key in row for row in found for key in keys):
        return found
    # A sort the kernel computes on a fetched result is plain polars', which is not stable: rows tied on the keys
    # come in an order of its choosing, and a cut after the sort (head, limit, slice, tail) keeps any of them.
    # The keys, in their order, are the answer; without a cut, the rows too, as a set.
    ordered_keys = [[row[key] for key in keys] for row in found]
    return {"sort keys": ordered_keys} if cut else {"sort keys": ordered_keys, "rows": canonical(found)}


def sorted_by(source: str) -> tuple[list[str], bool]:
    """The column names of a cell's last sort by names (none: []), and whether rows are cut after it."""
    found = list(re.finditer(r'\.sort\(((?:"[^"]*"(?:,\s*)?)+)', source))
    if not found:
        return [], False
    last = found[-1]
    return re.findall(r'"([^"]*)"', last.group(1)), bool(re.search(r"\.(limit|head|slice|tail)\(",
                                                                   source[last.end():]))


def unordered(source: str) -> bool:
    """Whether the language leaves the order of a cell's result rows open: a group_by (or SQL GROUP BY)
    or a unique() that nothing sorts after.  polars returns groups and unique rows in an order of its
    choosing (the Spark engine sorts groups by their keys): the same rows in another order are the same
    answer."""
    grouped = max((m.end() for m in ROWS_UNORDERED.finditer(source)), default=-1)
    if grouped < 0:
        return False
    return not re.search(r"\.sort\(|ORDER BY", source[grouped:])


def comparable(output: dict, source: str) -> dict | None:
    """What must be the same on both engines in one output (None: a progress display, a matter of timing)."""
    kind = output["output_type"]
    if kind == "error":
        return {"error": [output["ename"], output["evalue"]]}
    if kind == "stream":
        return {"stream": [output["name"], printed(output["text"])]}
    data = dict(output.get("data", {}))
    if set(data) == {"text/plain"} and PROGRESS.fullmatch(data["text/plain"]):
        return None
    shown: dict[str, Any] = {"kind": kind}
    if DATARESOURCE in data:
        resource = data.pop(DATARESOURCE)
        shown["schema"] = resource["schema"]
        shown["rows"] = rows(resource, source)
        shown.update(table_outline(data))
        data.pop("text/plain", None)
        data.pop("text/html", None)
    if VEGALITE in data:
        shown["chart"] = data.pop(VEGALITE)
    shown.update({mime: printed(value) if isinstance(value, str) else value for mime, value in data.items()})
    return shown


def cell_differences(polars_record: dict, spark_record: dict) -> list[str]:
    source = polars_record["source"]
    found = []
    for stage in ("outputs", "after"):
        want, got = polars_record[stage], spark_record[stage]
        if (want is None) != (got is None):
            found.append(f"{stage}: polars {'left nothing pending' if want is None else 'left a request pending'}, "
                         f"Spark {'did not' if got is None else 'did'}")
            continue
        if want is None:
            continue
        want = [c for c in (comparable(o, source) for o in want) if c is not None]
        got = [c for c in (comparable(o, source) for o in got) if c is not None]
        found += differences(want, got, stage)
    found += [] if polars_record["approved"] == spark_record["approved"] else \
        [f"approved requests: polars {polars_record['approved']}, Spark {spark_record['approved']}"]
    return [f"cell {source!r}: {problem}" for problem in found]


def assert_same_answers(records: dict[str, list[dict]]) -> None:
    polars_records, spark_records = records["polars"], records["spark"]
    assert [r["source"] for r in polars_records] == [r["source"] for r in spark_records]
    found = [problem for want, got in zip(polars_records, spark_records) for problem in cell_differences(want, got)]
    assert not found, "the Spark engine answered differently:\n" + "\n".join(found)


# -- the tests ---------------------------------------------------------------------------------

def test_the_scientist_notebook_and_the_readme_cells_answer_the_same_on_spark(demos):
    sources = notebook_sources(EXAMPLES / "scientist.ipynb") + readme_sources()
    records = on_both(demos, sources, {engine: EXAMPLES for engine in demos})
    assert_same_answers(records)

    # The comparison compared answers: released tables, charts, held requests and refusals on both engines.
    outputs = [o for record in records["spark"] for o in (record["after"] or record["outputs"])]
    assert sum(DATARESOURCE in o.get("data", {}) for o in outputs) >= 10
    assert sum(VEGALITE in o.get("data", {}) for o in outputs) == 5
    held = [o for record in records["spark"] for o in record["outputs"]
            if o["output_type"] == "error" and o["ename"] == "ReviewPending"]
    assert len(held) >= 3
    assert any(o["output_type"] == "error" and o["ename"] == "UnsupportedOperation" and "import" in o["evalue"]
               for o in outputs)
    assert not [o for o in outputs if o["output_type"] == "error"
                and o["ename"] not in ("UnsupportedOperation", "ReviewPending")]


# Examples the Spark engine refuses by design (docs/scale-out.md, "Not supported"), and the function named.
REFUSED_ON_SPARK = {
    # polars answers mode() outside an aggregation with one row per most frequent value.
    'col("diagnosis").mode()': "mode",
}


def documented_examples() -> list[str]:
    """Every ``>>>`` example of the language's reference (its operations' docstrings, from which
    docs/language.md's reference is generated), once each; a remote frame's fetched, so that its answer
    is compared and not only its plan."""
    from bastion_kernel.language.frame import RemoteFrame
    from bastion_kernel.language.interpreter import Interpreter
    from bastion_kernel.language.operations import documented_operations
    from language_fake_session import FakeSession

    local = Interpreter(FakeSession())
    local.run_cell('patients = dataset("patients")')
    cells: list[str] = []
    for op in documented_operations():
        for line in op.doc.splitlines():
            if not line.strip().startswith(">>> "):
                continue
            example = line.strip()[4:]
            try:
                value = local.run_cell(example).value
            except BastionError:
                value = None  # needs a real answer (a fetched table): run as it is
            cell = f"({example}).fetch()" if isinstance(value, RemoteFrame) else example
            if cell not in cells:
                cells.append(cell)
    return cells


def test_the_language_references_examples_answer_the_same_on_spark(demos, tmp_path):
    examples = documented_examples()
    refused = [cell for cell in examples if any(refusal in cell for refusal in REFUSED_ON_SPARK)]
    assert len(refused) == len(REFUSED_ON_SPARK)
    # The refused ones last: a request polars files for them would shift the numbers of later requests.
    sources = ['patients = dataset("patients")'] + [cell for cell in examples if cell not in refused] + refused
    workdirs = {engine: tmp_path / engine for engine in demos}  # examples that write files write them here
    for workdir in workdirs.values():
        workdir.mkdir()
    records = on_both(demos, sources, workdirs)
    assert_same_answers({engine: found[:-len(refused)] for engine, found in records.items()})
    for cell in records["spark"][-len(refused):]:
        [function] = [name for example, name in REFUSED_ON_SPARK.items() if example in cell["source"]]
        [error] = [o for o in cell["outputs"] if o["output_type"] == "error"]
        assert error["ename"] == "UnsupportedOperation"
        assert error["evalue"].startswith(f"{function} is not supported on the Spark engine")
    for cell in records["polars"][-len(refused):]:
        assert not [o for o in cell["after"] or cell["outputs"] if o["output_type"] == "error"]

    outputs = [o for record in records["spark"] for o in (record["after"] or record["outputs"])]
    assert sum(DATARESOURCE in o.get("data", {}) for o in outputs) >= 80
