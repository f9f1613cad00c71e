"""``bastion-kernel``: the scientist's command line (keys, connection, kernelspec).

::

    bastion-kernel keygen --dir DIR [--force]
    bastion-kernel connect --endpoint URL --server-key FILE --key-dir DIR [--config PATH]
    bastion-kernel install [--user | --sys-prefix | --prefix P]

Errors print ``error: ...`` on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import ConfigError, check_endpoint, config_path, config_text, read_key_pair, read_public_key

KERNEL_NAME = "bastion"
DISPLAY_NAME = "Bastion"
KEY_NAME = "scientist"
# The repository's kernelspec directory; absent in a non-editable install.
REPO_KERNELSPEC = Path(__file__).resolve().parent.parent / "kernelspec"


class CliError(Exception):
    """A user-facing failure: printed as ``error: ...``, exit status 2."""


def kernel_json(python: str = "python") -> dict:
    """The kernelspec's ``kernel.json`` with ``python`` as the interpreter."""
    return {
        "argv": [python, "-m", "bastion_kernel", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "bastion",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }


# -- keygen ---------------------------------------------------------------------

def keygen(directory: Path, force: bool = False) -> tuple[Path, Path]:
    """Create ``DIR/scientist.key`` (public) and ``DIR/scientist.key_secret`` (mode 0600).

    Raises
    ------
    CliError
        If a key exists and ``force`` is false.
    """
    import zmq.auth

    directory = directory.expanduser()
    public = directory / f"{KEY_NAME}.key"
    secret = directory / f"{KEY_NAME}.key_secret"
    existing = [p for p in (public, secret) if p.exists()]
    if existing and not force:
        raise CliError(f"{existing[0]} already exists; pass --force to replace the key pair "
                       "(the owner must then register the new public key)")
    directory.mkdir(parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    # Created under a restrictive umask so the secret is never readable by others, not even briefly.
    old_umask = os.umask(0o077)
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, KEY_NAME)
    finally:
        os.umask(old_umask)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    return Path(public_file), Path(secret_file)


# -- connect --------------------------------------------------------------------

def connect(endpoint: str, server_key_file: Path, key_dir: Path, config: Path | None = None) -> Path:
    """Check the endpoint and key files, then write the scientist's configuration.

    Returns
    -------
    Path
        The configuration file written.
    """
    try:
        check_endpoint(endpoint)
        server_public = read_public_key(server_key_file)
        public_file = (key_dir.expanduser() / f"{KEY_NAME}.key").resolve()
        secret_file = (key_dir.expanduser() / f"{KEY_NAME}.key_secret").resolve()
        public = read_public_key(public_file)
        pair_public, _ = read_key_pair(secret_file)
    except ConfigError as exc:
        raise CliError(exc.evalue) from None
    if pair_public != public:
        raise CliError(f"{public_file} and {secret_file} are not the same key pair")
    if server_public == public:
        raise CliError(f"{server_key_file} is your own key; --server-key takes the executor's public key")
    target = (config or config_path()).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(config_text(endpoint, server_public, public_file, secret_file), encoding="utf-8")
    return target


# -- install --------------------------------------------------------------------

def install(user: bool = False, prefix: str | None = None) -> str:
    """Install the ``bastion`` kernelspec for this Python; returns the directory it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / KERNEL_NAME
        if (REPO_KERNELSPEC / "kernel.json").is_file():
            shutil.copytree(REPO_KERNELSPEC, source)
        else:
            source.mkdir()
        spec = kernel_json(sys.executable)
        (source / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        try:
            return KernelSpecManager().install_kernel_spec(str(source), kernel_name=KERNEL_NAME,
                                                           user=user, prefix=prefix)
        except OSError as exc:
            raise CliError(f"cannot install the kernelspec: {exc}; try --user") from None


# -- the command line ----------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion-kernel",
                                     description="The Bastion kernel: keys, connection and kernelspec.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("keygen", help="create your CURVE key pair")
    p.add_argument("--dir", required=True, type=Path, help="directory for scientist.key and scientist.key_secret")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")

    p = commands.add_parser("connect", help="write the connection configuration")
    p.add_argument("--endpoint", required=True, help="the executor's address, tcp://HOST:PORT")
    p.add_argument("--server-key", required=True, type=Path, help="the executor's public key file")
    p.add_argument("--key-dir", required=True, type=Path, help="the directory keygen wrote your keys to")
    p.add_argument("--config", type=Path, help="where to write (default: $BASTION_CONFIG or ~/.bastion/config.toml)")

    p = commands.add_parser("install", help="install the Bastion kernelspec for Jupyter")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix (this environment)")
    where.add_argument("--prefix", help="install into this prefix")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bastion-kernel``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "keygen":
            public, secret = keygen(args.dir, force=args.force)
            print(f"public key (give this file to the data owner): {public}")
            print(f"secret key (keep it private): {secret}")
        elif args.command == "connect":
            written = connect(args.endpoint, args.server_key, args.key_dir, args.config)
            print(f"wrote {written}")
        elif args.command == "install":
            prefix = sys.prefix if args.sys_prefix else args.prefix
            destination = install(user=args.user, prefix=prefix)
            print(f"installed kernelspec {KERNEL_NAME!r} in {destination}")
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
