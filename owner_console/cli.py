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
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from owner_console.approvals import ApprovalError, record_decision
from owner_console.audit import read_entries, verify
from owner_console.model import UNSAFE_MODES
from owner_console.workspace import Workspace, WorkspaceError, check_name

READY_LINE = "bastion executor listening on {endpoint}"


class UsageError(Exception):
    """A command-line mistake: printed as ``error: ...``, exit status 2."""


def _workspace(args: argparse.Namespace) -> Workspace:
    return Workspace(args.workspace).require()


# -- commands ---------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    workspace = Workspace(args.workspace)
    workspace.init(approval_ttl_seconds=args.approval_ttl_seconds)
    print(f"initialised a Bastion workspace in {workspace.path}")
    print(f"give scientists the executor's public key: {workspace.server_public_key_path}")
    return 0


def cmd_dataset_add(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    settings = {"person_id": args.person_id, "max_share": args.max_share,
                "suppress_small_groups": args.suppress_small_groups}
    dp_policy = _dp_policy(args)
    if dp_policy is None and args.bounds:
        settings["bounds"] = _public_bounds(args.bounds)
    dataset = workspace.add_dataset(args.name, args.file, min_group_size=args.min_group_size,
                                    hidden=args.hide, unsafe=args.unsafe, allow_save=not args.no_save,
                                    dp=dp_policy,
                                    **{k: v for k, v in settings.items() if v not in (None, False)})
    print(f"registered dataset {dataset.name!r} ({dataset.format}, {dataset.path}): {_policy_text(dataset.policy)}")
    if dataset.dp is not None:
        print(f"differential privacy: epsilon {dataset.dp.epsilon:g} per scientist, "
              f"{dataset.dp.epsilon_per_query:g} per query; only DP aggregates are released")
    return 0


def _dp_policy(args: argparse.Namespace):
    """The ``--privacy dp`` options as a DPPolicy (None for the default privacy mode)."""
    dp_options = (args.epsilon, args.epsilon_per_query, args.delta, args.privacy_unit_column,
                  args.max_contributions, args.max_rows, args.public_keys or None)
    if args.privacy != "dp":
        if any(option is not None for option in dp_options):
            raise UsageError("--epsilon, --delta, --public-keys and the other DP options need --privacy dp")
        return None
    from owner_console.dp import policy_from_options
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    try:
        return policy_from_options(args.file, epsilon=args.epsilon, epsilon_per_query=args.epsilon_per_query,
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
        print(f"{name}\t{dataset.format}\t{dataset.path}\t{_policy_text(dataset.policy)}")
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
    key = workspace.add_scientist(args.name, args.public_key_file)
    print(f"allowed scientist {args.name!r} with CURVE key {key.decode('ascii')}")
    return 0


def cmd_scientist_list(args: argparse.Namespace) -> int:
    for key, name in sorted(_workspace(args).scientists().items(), key=lambda item: item[1]):
        print(f"{name}\t{key.decode('ascii')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from owner_console.server import ExecutorServer  # the engine is loaded only to serve

    workspace = _workspace(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = ExecutorServer(workspace, bind=args.bind)
    try:
        endpoint = server.start()
    except OSError as exc:
        raise UsageError(str(exc)) from None

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
    request = record_decision(workspace.approvals(), workspace.audit_log(), args.id, approved, reason)
    print(f"request {request.id} from {request.scientist}: {request.status}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, True, args.reason or "approved by the owner")


def cmd_reject(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise UsageError("--reason must say why (the scientist sees it)")
    return _decide(args, False, args.reason)


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
                   help="how long an approved result waits for its scientist before it expires (default 7 days)")

    dataset = commands.add_parser("dataset", help="register and list datasets").add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION")
    p = command(dataset, "add", cmd_dataset_add, "register a CSV or Parquet file with its policy")
    p.add_argument("name", type=_name("dataset"), metavar="NAME")
    p.add_argument("file", type=Path, metavar="FILE")
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
    p.add_argument("--max-share", type=_share, default=None, metavar="SHARE",
                   help="dominance rule: no single row may make up more than SHARE (0-1] of a sum or mean")
    p.add_argument("--privacy", choices=("min-group-size", "dp"), default="min-group-size",
                   help="dp: release only differentially private aggregates (OpenDP), with a budget per scientist")
    p.add_argument("--epsilon", type=_positive_float, default=None, metavar="E",
                   help="with --privacy dp: each scientist's total privacy budget")
    p.add_argument("--epsilon-per-query", type=_positive_float, default=None, metavar="E",
                   help="with --privacy dp: what one released query costs (default epsilon/10)")
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
    p = command(dataset, "show", cmd_dataset_show, "print a dataset's policy file")
    p.add_argument("name", type=_name("dataset"), metavar="NAME")
    command(dataset, "list", cmd_dataset_list, "list registered datasets and their policies")

    scientist = commands.add_parser("scientist", help="allow-list scientists").add_subparsers(
        dest="scientist_command", required=True, metavar="ACTION")
    p = command(scientist, "add", cmd_scientist_add, "allow a scientist's CURVE public key under NAME")
    p.add_argument("name", type=_name("scientist"), metavar="NAME")
    p.add_argument("public_key_file", type=Path, metavar="PUBLIC_KEY_FILE")
    command(scientist, "list", cmd_scientist_list, "list allowed scientists")

    p = command(commands, "serve", cmd_serve, "run the executor until SIGINT or SIGTERM")
    p.add_argument("--bind", default=None, metavar="ENDPOINT",
                   help="ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555 (default from config.toml)")

    p = command(commands, "requests", cmd_requests, "list requests waiting for review")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = command(commands, "approve", cmd_approve, "release a held request to its scientist")
    p.add_argument("id", type=_positive_int, metavar="ID")
    p.add_argument("--reason", default=None, metavar="TEXT", help="a note kept with the decision")

    p = command(commands, "reject", cmd_reject, "refuse a held request")
    p.add_argument("id", type=_positive_int, metavar="ID")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (the scientist sees it)")

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
