"""``bastion-owner``: the data owner's command line.

Every command takes ``--workspace DIR``.  A mistake the owner can fix prints
``error: <message>`` on stderr and exits with status 2 (no traceback);
``audit verify`` exits 1 when the log does not verify.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from owner_console.approvals import REUSE_MODES, ApprovalError, expires_at, record_decision, withdraw_requests
from owner_console.audit import read_entries, verify
from owner_console.model import UNSAFE_MODES
from owner_console.workspace import Workspace, WorkspaceError, check_name, read_public_key

READY_LINE = "bastion executor listening on {endpoint}"


class UsageError(Exception):
    """A command-line mistake: printed as ``error: ...``, exit status 2."""


def _workspace(args: argparse.Namespace) -> Workspace:
    return Workspace(args.workspace).require()


# -- commands ---------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    workspace = Workspace(args.workspace)
    workspace.init(approval_ttl_seconds=args.approval_ttl_seconds, approval_reuse=args.approval_reuse)
    print(f"initialised a Bastion workspace in {workspace.path}")
    print(f"give scientists the executor's public key: {workspace.server_public_key_path}")
    return 0


def cmd_dataset_add(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    if args.engine == "spark" and args.privacy == "dp" and not Path(args.file).is_file():
        raise UsageError(f"{args.file}: --privacy dp with --engine spark needs one CSV or Parquet file (privacy "
                         "spending is charged to a file's content; a directory or a table has none to hash)")
    settings = {"person_id": args.person_id, "max_share": args.max_share,
                "suppress_small_groups": args.suppress_small_groups}
    dp_policy = _dp_policy(args)
    if dp_policy is None and args.bounds:
        settings["bounds"] = _public_bounds(args.bounds)
    dataset = workspace.add_dataset(args.name, args.file, min_group_size=args.min_group_size,
                                    hidden=args.hide, unsafe=args.unsafe, allow_save=not args.no_save,
                                    dp=dp_policy, dominance=not args.no_dominance, engine=args.engine,
                                    **{k: v for k, v in settings.items() if v not in (None, False)})
    print(f"registered dataset {dataset.name!r} ({dataset.format}, {dataset.source}): {_policy_text(dataset.policy)}")
    if dataset.engine == "spark":
        from owner_console.engine.spark.session import settings_of
        print(f"its queries run on Spark ({settings_of(workspace).describe()}, the workspace's [spark] settings)")
    if dataset.dp is not None:
        total = "" if dataset.dp.epsilon_total is None else \
            f", {dataset.dp.epsilon_total:g} for all scientists together"
        print(f"differential privacy: epsilon {dataset.dp.epsilon:g} per scientist{total}, "
              f"{dataset.dp.epsilon_per_query:g} per query; only DP aggregates are released")
        # Hash the file now, so that no query has to; a file already known shares its spending.
        from owner_console.dp import BudgetLedger
        ledger = BudgetLedger(workspace.dp_ledger_path)
        version = ledger.version(dataset.path)
        print(f"privacy spending is charged to the data (SHA-256 {version.content_hash[:16]}...), "
              "under every name it is registered with")
        bounds = ("epsilon", "epsilon_per_query", "epsilon_total", "delta")
        sharing = {name: other for name, other in workspace.catalog_with_errors()[0].items()
                   if name != dataset.name and other.dp is not None
                   and _account_or_none(ledger, other) == version.account}
        if sharing:
            print(f"the same data is registered as: {', '.join(sorted(sharing))} (one budget for all)")
        differing = sorted(name for name, other in sharing.items()
                           if any(getattr(other.dp, b) != getattr(dataset.dp, b) for b in bounds))
        if differing:
            print(f"warning: {', '.join(differing)} over the same data has other budget settings; a query is "
                  "checked against the bounds of the name it uses", file=sys.stderr)
    return 0


def _dp_policy(args: argparse.Namespace):
    """The ``--privacy dp`` options as a DPPolicy (None for the default privacy mode)."""
    dp_options = (args.epsilon, args.epsilon_per_query, args.epsilon_total, args.delta,
                  args.privacy_unit_column, args.max_contributions, args.max_rows, args.public_keys or None)
    if args.privacy != "dp":
        if any(option is not None for option in dp_options):
            raise UsageError("--epsilon, --delta, --public-keys and the other DP options need --privacy dp")
        return None
    from owner_console.dp import policy_from_options
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    try:
        return policy_from_options(args.file, epsilon=args.epsilon, epsilon_per_query=args.epsilon_per_query,
                                   epsilon_total=args.epsilon_total,
                                   delta=args.delta or 0.0, max_rows=args.max_rows,
                                   privacy_unit_column=args.privacy_unit_column,
                                   max_contributions=args.max_contributions or 1, bounds=args.bounds,
                                   public_keys=args.public_keys)
    except Exception as exc:  # a bad option or an unreadable file: say which
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _public_bounds(items: list[str]) -> dict:
    """``--bounds COL=LO:HI`` options of a non-DP dataset as the policy's public bounds."""
    from owner_console.dp import parse_bounds
    try:
        return parse_bounds(items)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_dataset_mock(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    record = workspace.add_mock(args.name, rows=args.rows, from_file=args.from_file, categories=args.categories,
                                seed=args.seed)
    how = f"from {record['from']}" if record["origin"] == "file" else \
        "generated from the schema and the declared bounds and categories (no row was read)"
    print(f"published a mock of {args.name!r}: {record['rows']} rows, {how}, in {record['path']}")
    print(f"scientists read it with dataset({args.name!r}, mock=True): answered at once, marked as mock")
    return 0


def cmd_dataset_show(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    toml_path = workspace.datasets_dir / f"{args.name}.toml"
    if not toml_path.is_file():
        raise UsageError(f"no dataset {args.name!r} in {workspace.path}")
    dataset = workspace.load_dataset(toml_path)  # validates: a malformed file is an error naming file and key
    print(f"# {toml_path}")
    print(f"# {_policy_text(dataset.policy)}")
    print(toml_path.read_text().rstrip("\n"))
    return 0


def cmd_dataset_list(args: argparse.Namespace) -> int:
    catalog, errors = _workspace(args).catalog_with_errors()
    for name in sorted(catalog):
        dataset = catalog[name]
        print(f"{name}\t{dataset.format}\t{dataset.source}\t{dataset.engine}\t{_policy_text(dataset.policy)}")
    for error in errors:
        print(f"warning: {error}", file=sys.stderr)
    return 0


def _policy_text(policy) -> str:
    hidden = ", ".join(sorted(policy.hidden)) or "none"
    text = (f"min group size {policy.min_group_size}, unsafe results: {policy.unsafe}, "
            f"hidden columns: {hidden}, saving {'allowed' if policy.allow_save else 'not allowed'}")
    optional = policy.to_dict()
    for key in ("min_group_size", "unsafe", "hidden", "allow_save", "scientists"):
        optional.pop(key, None)
    extras = [f"{key.replace('_', ' ')} {value}" for key, value in optional.items()]
    if policy.scientists:
        extras.append(f"overrides for {', '.join(sorted(policy.scientists))}")
    return ", ".join([text, *extras])


def cmd_scientist_add(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    key = read_public_key(args.public_key_file)
    other = workspace.scientists().get(key)
    if other is not None and other != args.name:
        raise UsageError(f"this key is already registered for scientist {other!r}")
    if other == args.name:
        print(f"scientist {args.name!r} is already allowed with CURVE key {key.decode('ascii')}")
        return 0
    registered = (workspace.scientists_dir / f"{args.name}.toml").is_file()
    previous = workspace.scientist_key(args.name)
    # Audited before the key is allowed: a grant the log cannot record does not happen.
    workspace.audit_log().append("access", args.name, action="rotated" if registered else "granted",
                                 key=key.decode("ascii"),
                                 **({"previous_key": previous.decode("ascii")} if previous else {}))
    workspace.add_scientist(args.name, args.public_key_file, replace=True)
    if not registered:
        print(f"allowed scientist {args.name!r} with CURVE key {key.decode('ascii')}")
        return 0
    withdrawn = _withdraw(workspace, args.name, "the scientist's key was replaced", "scientist add (rotation)",
                          keep_key=key.decode("ascii"))
    print(f"replaced the CURVE key of scientist {args.name!r} with {key.decode('ascii')}; the old key is refused "
          f"from its next message on{withdrawn}")
    return 0


def cmd_scientist_remove(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    # Removed first, audited after: a revocation must not wait on the log.
    key = workspace.remove_scientist(args.name)
    workspace.audit_log().append("access", args.name, action="revoked",
                                 **({"key": key.decode("ascii")} if key else {}))
    withdrawn = _withdraw(workspace, args.name, "the scientist's key was removed", "scientist remove")
    print(f"removed scientist {args.name!r}: their key is refused from its next message on, open connections "
          f"included{withdrawn}")
    return 0


def _withdraw(workspace: Workspace, name: str, reason: str, by: str, keep_key: str | None = None) -> str:
    """Withdraw a scientist's open requests (see approvals.withdraw_requests); a note for the owner."""
    store = workspace.approvals()
    try:
        withdrawn = withdraw_requests(store, workspace.audit_log(), name, reason, by, workspace.result_path,
                                      keep_key=keep_key)
    finally:
        store.close()
    if not withdrawn:
        return ""
    return f"; withdrew their open request{'s' if len(withdrawn) > 1 else ''} " + \
        ", ".join(f"#{r.id} ({r.status})" for r in withdrawn)


def cmd_scientist_list(args: argparse.Namespace) -> int:
    for key, name in sorted(_workspace(args).scientists().items(), key=lambda item: item[1]):
        print(f"{name}\t{key.decode('ascii')}")
    return 0


def _start_spark_early(workspace: Workspace) -> None:
    """Start Spark and read the Spark datasets' schemas in the background, when the workspace has any.

    Starting a JVM and inferring a CSV's schema take many seconds; done
    while the executor already serves, the scientist's first question about
    a Spark dataset does not wait for them (nor run into the kernel's timeout).
    """
    catalog, _ = workspace.catalog_with_errors()
    on_spark = [dataset for dataset in catalog.values() if dataset.engine == "spark"]
    if not on_spark:
        return

    def start() -> None:
        from owner_console.engine import engine_for

        log = logging.getLogger("bastion.executor")
        started = time.monotonic()
        for dataset in on_spark:
            try:
                engine_for([dataset]).schema(dataset)
            except Exception as exc:  # noqa: BLE001 - the first query reports it to the scientist, typed
                log.warning("Spark dataset %r not read ahead (%s)", dataset.name, type(exc).__name__)
        log.info("Spark started and %d Spark dataset(s) read ahead in %.1f s", len(on_spark),
                 time.monotonic() - started)

    threading.Thread(target=start, name="spark-start", daemon=True).start()


def cmd_serve(args: argparse.Namespace) -> int:
    from owner_console.server import ExecutorServer  # the engine is loaded only to serve

    from owner_console.engine.spark import session as spark_session

    workspace = _workspace(args)
    # Where Spark datasets run ([spark]); a bad table stops here, naming the key.  Spark itself starts on the
    # first query of a Spark dataset.
    spark_session.configure(spark_session.settings_of(workspace))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = ExecutorServer(workspace, bind=args.bind)
    try:
        endpoint = server.start()
    except OSError as exc:
        raise UsageError(str(exc)) from None

    _start_spark_early(workspace)

    def request_stop(signum, _frame) -> None:
        server.stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(READY_LINE.format(endpoint=endpoint), flush=True)
    server.serve_forever()
    print("bastion executor stopped", file=sys.stderr, flush=True)
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    pending = _workspace(args).approvals().list("pending")
    if args.json:
        print(json.dumps([{"id": r.id, "scientist": r.scientist, "reason": r.reason, "detail": r.detail,
                           "asked_at": r.asked_at,
                           "status": r.status, "columns": r.columns, "rows": r.rows,
                           "plan_text": r.plan_text, "plan_tree": r.plan_tree, "plan_hash": r.plan_hash, "query_text": r.query_text}
                          for r in pending], indent=2))
        return 0
    if not pending:
        print("no pending requests")
    for r in pending:
        columns = ", ".join(name for name, _ in r.columns)
        print(f"#{r.id}  {r.asked_at}  {r.scientist}  {r.rows} rows [{columns}]\n"
              f"    why held: {r.detail or r.reason}\n"
              f"    the scientist was told: {r.reason}\n"
              + "".join(f"    {line}\n" for line in r.plan_text.splitlines()))
    return 0


def _decide(args: argparse.Namespace, approved: bool, reason: str) -> int:
    workspace = _workspace(args)
    once = bool(getattr(args, "once", False))
    request = record_decision(workspace.approvals(), workspace.audit_log(), args.id, approved, reason, once=once)
    print(f"request {request.id} from {request.scientist}: {request.status}")
    if approved:
        served = "one release" if once or workspace.approval_reuse == "once" else \
            "re-runs of the same query on the same data"
        print(f"the approval serves {served} until "
              f"{expires_at(request, workspace.approval_ttl_seconds).isoformat(timespec='seconds')}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, True, args.reason or "approved by the owner")


def cmd_reject(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise UsageError("--reason must say why (the scientist sees it)")
    return _decide(args, False, args.reason)


def _dp_dataset(workspace: Workspace, name: str):
    toml_path = workspace.datasets_dir / f"{name}.toml"
    if not toml_path.is_file():
        raise UsageError(f"no dataset {name!r} in {workspace.path}")
    dataset = workspace.load_dataset(toml_path)
    if dataset.dp is None:
        raise UsageError(f"dataset {name!r} is not differentially private: it has no privacy budget")
    return dataset


def _dp_ledger(workspace: Workspace, catalog: dict):
    """The workspace's privacy odometer, with spends recorded by dataset name moved onto their data."""
    from bastion_kernel.contract.protocol import BastionError
    from owner_console import dp

    ledger = dp.BudgetLedger(workspace.dp_ledger_path)
    try:
        dp.adopt_legacy_spends(ledger, catalog)
    except BastionError as exc:  # a registered file that cannot be read
        raise UsageError(exc.evalue) from None
    return ledger


def cmd_dp_show(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    catalog, _ = workspace.catalog_with_errors()
    names = [args.name] if args.name else sorted(n for n, d in catalog.items() if d.dp is not None)
    ledger = _dp_ledger(workspace, catalog)
    for name in names:
        dataset = _dp_dataset(workspace, name)
        version = ledger.version(dataset.path)
        spending = ledger.spending(version)
        total = math.fsum(e for e, _ in spending.values())
        bound = "no total" if dataset.dp.epsilon_total is None else f"total {dataset.dp.epsilon_total:g}"
        print(f"{name}\tdata {version.account[:16]}\tepsilon {total:g} spent by all scientists "
              f"({bound}; {dataset.dp.epsilon:g} per scientist)")
        for scientist, (epsilon, delta) in spending.items():
            print(f"    {scientist}\tepsilon {epsilon:g}\tdelta {delta:g}")
    return 0


def cmd_dp_reset(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    dataset = _dp_dataset(workspace, args.name)
    catalog = workspace.catalog_with_errors()[0]
    ledger = _dp_ledger(workspace, catalog)
    version = ledger.version(dataset.path)
    sharing = sorted(name for name, other in catalog.items()
                     if other.dp is not None and _account_or_none(ledger, other) == version.account)
    audit = workspace.audit_log()

    def record(summary: dict) -> None:
        audit.append("budget_reset", args.scientist, dataset=dataset.name, datasets=sharing or [dataset.name],
                     data=summary["account"], content_hash=version.content_hash, path=version.path,
                     queries=summary["queries"], cleared=summary["epsilon"], reason=args.reason)

    summary = ledger.reset(version, args.scientist, record=record)
    whose = f"scientist {args.scientist!r}" if args.scientist else "every scientist"
    print(f"reset the privacy budget of {whose} on the data of {dataset.name!r} "
          f"({summary['queries']} charged queries cleared; recorded in the audit log)")
    if len(sharing) > 1:
        print(f"the same data is registered as: {', '.join(sharing)}; their spending was reset too")
    return 0


def _account_or_none(ledger, dataset) -> str | None:
    try:
        return ledger.version(dataset.path).account
    except OSError:  # an unreadable file shares no account that can be named here
        return None


def cmd_audit_verify(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    report = verify(workspace.audit_path, workspace.audit_public_key_path)
    if report.ok:
        print(f"audit log verifies: {report.entries} entries, last hash {report.last_hash}")
        return 0
    print(f"audit log does NOT verify: line {report.first_bad}: {report.problem}", file=sys.stderr)
    return 1


def cmd_audit_show(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    since = _parse_time(args.since) if args.since else None
    for entry in read_entries(workspace.audit_path):
        if args.scientist is not None and entry.get("scientist") != args.scientist:
            continue
        if since is not None:
            try:
                if _parse_time(str(entry.get("time"))) < since:
                    continue
            except UsageError:
                continue
        if args.json:
            print(json.dumps(entry, ensure_ascii=False))
            continue
        fields = {k: v for k, v in entry.items()
                  if k not in ("seq", "time", "event", "scientist", "prev", "hash", "sig")}
        detail = "  ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(fields.items()))
        print(f"{entry.get('seq')}\t{entry.get('time')}\t{entry.get('event')}\t"
              f"{entry.get('scientist') or '-'}\t{detail}")
    return 0


def _parse_time(text: str) -> _dt.datetime:
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"not an ISO 8601 time: {text!r} (for example 2026-01-31 or 2026-01-31T12:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


# -- argument parsing ---------------------------------------------------------

def _name(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_name(text, what)
        except WorkspaceError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1: {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``bastion-owner`` argument parser (each sub-command's ``func`` runs it)."""
    parser = argparse.ArgumentParser(prog="bastion-owner",
                                     description="Open a sensitive dataset to outside scientists without handing over rows.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(sub, name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--workspace", required=True, type=Path, metavar="DIR", help="the owner's workspace directory")
        p.set_defaults(func=func)
        return p

    p = command(commands, "init", cmd_init, "create a workspace: config, keys and empty stores")
    p.add_argument("--approval-ttl-seconds", type=_positive_int, default=7 * 24 * 3600, metavar="SECONDS",
                   help="how long an approval serves its scientist: the approved result waits that long, and "
                        "re-runs of the same query on the same data get it again until then (default 7 days)")
    p.add_argument("--approval-reuse", choices=REUSE_MODES, default="until_expiry",
                   help="once: every approval serves one release, a re-run goes to review again "
                        "(default until_expiry)")

    dataset = commands.add_parser("dataset", help="register and list datasets").add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION")
    p = command(dataset, "add", cmd_dataset_add, "register a CSV or Parquet file (on Spark also a directory, a "
                "Delta table or a catalog table) with its policy")
    p.add_argument("name", type=_name("dataset"), metavar="NAME")
    p.add_argument("file", type=Path, metavar="SOURCE",
                   help="a .csv or .parquet file; with --engine spark also a directory of them, a Delta table's "
                        "directory, or table:NAME for a table of the Spark catalog (e.g. table:sales.orders)")
    p.add_argument("--engine", choices=("polars", "spark"), default="polars",
                   help="spark: queries run on the workspace's Spark ([spark] in config.toml; needs the spark "
                        "extra and Java 17 or 21); default polars, in the executor")
    p.add_argument("--min-group-size", type=_positive_int, default=10, metavar="K",
                   help="a released row must come from at least K rows (default 10)")
    p.add_argument("--hide", action="append", default=[], metavar="COL", help="a column whose values are never released")
    p.add_argument("--unsafe", choices=UNSAFE_MODES, default="review",
                   help="what to do with a result the policy does not allow (default review)")
    p.add_argument("--no-save", action="store_true", help="do not let scientists save derived results")
    p.add_argument("--person-id", default=None, metavar="COL",
                   help="a column identifying a person (one person may have many rows): K counts people")
    p.add_argument("--suppress-small-groups", action="store_true",
                   help="drop groups under K from aggregates (and say how many) instead of holding the result")
    p.add_argument("--no-dominance", action="store_true",
                   help="turn off the dominance rule (on by default: in a sum, mean, std or var, the two "
                        "contributions farthest from the group's median may make up at most 90%% of the total "
                        "distance; recorded as dominance = false)")
    p.add_argument("--max-share", type=_share, default=None, metavar="SHARE",
                   help="a stricter dominance rule: no single contribution's distance from the group's median "
                        "may make up more than SHARE (0-1] of the total distance")
    p.add_argument("--privacy", choices=("min-group-size", "dp"), default="min-group-size",
                   help="dp: release only differentially private aggregates (OpenDP), with a budget per scientist")
    p.add_argument("--epsilon", type=_positive_float, default=None, metavar="E",
                   help="with --privacy dp: each scientist's total privacy budget")
    p.add_argument("--epsilon-per-query", type=_positive_float, default=None, metavar="E",
                   help="with --privacy dp: what one released query costs (default epsilon/10)")
    p.add_argument("--epsilon-total", type=_positive_float, default=None, metavar="E",
                   help="with --privacy dp: what all scientists together may spend on this data "
                        "(bounds collusion; default: no total)")
    p.add_argument("--delta", type=_positive_float, default=None, metavar="D",
                   help="with --privacy dp: total delta (default 0, pure DP)")
    p.add_argument("--privacy-unit-column", default=None, metavar="COL",
                   help="with --privacy dp: rows of one person share this identifier")
    p.add_argument("--max-contributions", type=_positive_int, default=None, metavar="N",
                   help="with --privacy dp: rows one person may contribute (default 1)")
    p.add_argument("--max-rows", type=_positive_int, default=None, metavar="N",
                   help="with --privacy dp: a public upper bound on the row count (default: loose, from the file)")
    p.add_argument("--bounds", action="append", default=[], metavar="COL=LO:HI",
                   help="public bounds of a numeric column (charts take their ranges from them; "
                        "with --privacy dp also the clipping bounds)")
    p.add_argument("--public-keys", action="append", default=[], metavar="COL=v1,v2,...",
                   help="with --privacy dp: a column scientists may group by, and its public values")
    p = command(dataset, "mock", cmd_dataset_mock, "publish a mock of a dataset, made from its schema and your "
                "declared public facts only (or from your own file): scientists query it at once with "
                "dataset(NAME, mock=True)")
    p.add_argument("name", type=_name("dataset"), metavar="NAME")
    p.add_argument("--rows", type=_positive_int, default=None, metavar="N", help="rows to generate (default 500)")
    p.add_argument("--categories", action="append", default=[], metavar="COL=a,b,c",
                   help="the public values of a column (kept in the mock's description); other string columns "
                        "get made-up values, numeric columns values inside their --bounds")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the generator (default 0)")
    p.add_argument("--from", dest="from_file", type=Path, default=None, metavar="FILE",
                   help="publish this CSV or Parquet file as the mock instead (it must have the dataset's schema)")
    p = command(dataset, "show", cmd_dataset_show, "print a dataset's policy file")
    p.add_argument("name", type=_name("dataset"), metavar="NAME")
    command(dataset, "list", cmd_dataset_list, "list registered datasets and their policies")

    scientist = commands.add_parser("scientist", help="allow-list scientists").add_subparsers(
        dest="scientist_command", required=True, metavar="ACTION")
    p = command(scientist, "add", cmd_scientist_add, "allow a scientist's CURVE public key under NAME "
                "(again with a new key: rotation, the old key is refused from then on)")
    p.add_argument("name", type=_name("scientist"), metavar="NAME")
    p.add_argument("public_key_file", type=Path, metavar="PUBLIC_KEY_FILE")
    p = command(scientist, "remove", cmd_scientist_remove, "take NAME off the allow-list (open connections "
                "included) and withdraw their open requests")
    p.add_argument("name", type=_name("scientist"), metavar="NAME")
    command(scientist, "list", cmd_scientist_list, "list allowed scientists")

    p = command(commands, "serve", cmd_serve, "run the executor until SIGINT or SIGTERM")
    p.add_argument("--bind", default=None, metavar="ENDPOINT",
                   help="ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555 (default from config.toml)")

    p = command(commands, "requests", cmd_requests, "list requests waiting for review")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = command(commands, "approve", cmd_approve, "release a held request to its scientist")
    p.add_argument("id", type=_positive_int, metavar="ID")
    p.add_argument("--reason", default=None, metavar="TEXT", help="a note kept with the decision")
    p.add_argument("--once", action="store_true",
                   help="the approval serves one release: a re-run of the same query goes to review again")

    p = command(commands, "reject", cmd_reject, "refuse a held request")
    p.add_argument("id", type=_positive_int, metavar="ID")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (the scientist sees it)")

    dp_commands = commands.add_parser("dp", help="differential privacy budgets").add_subparsers(
        dest="dp_command", required=True, metavar="ACTION")
    p = command(dp_commands, "show", cmd_dp_show, "print what each scientist spent on each DP dataset's data")
    p.add_argument("name", type=_name("dataset"), metavar="DATASET", nargs="?", default=None)
    p = command(dp_commands, "reset", cmd_dp_reset,
                "clear the privacy spending on a DP dataset's data (of one scientist, or all); audited")
    p.add_argument("name", type=_name("dataset"), metavar="DATASET")
    p.add_argument("--scientist", type=_name("scientist"), default=None, metavar="NAME",
                   help="reset only this scientist's spending (default: every scientist's)")
    p.add_argument("--reason", default=None, metavar="TEXT", help="why (kept in the audit entry)")

    audit = commands.add_parser("audit", help="check and read the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION")
    command(audit, "verify", cmd_audit_verify, "check the hash chain and signatures (exit 0 only if intact)")
    p = command(audit, "show", cmd_audit_show, "print audit entries")
    p.add_argument("--scientist", default=None, metavar="NAME")
    p.add_argument("--since", default=None, metavar="ISO_TIME")
    p.add_argument("--json", action="store_true", help="print each entry as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bastion-owner``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, WorkspaceError, ApprovalError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unreadable or unwritable path the owner named
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
