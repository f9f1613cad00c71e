"""The scientist's connection settings: where the executor is and which keys to use.

The file is TOML, read from ``$BASTION_CONFIG`` when set, else
``~/.bastion/config.toml``; ``bastion-kernel connect`` writes it::

    endpoint = "tcp://127.0.0.1:5555"
    server_public_key = "<40 characters of Z85: the executor's CURVE public key>"
    public_key_file = "/home/me/.bastion/keys/scientist.key"
    secret_key_file = "/home/me/.bastion/keys/scientist.key_secret"
    # optional
    timeout_seconds = 30

The kernel loads it at the first cell that needs the executor, so a kernel
without a configuration still starts, completes and evaluates local cells.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import zmq.auth
from zmq.utils import z85

ENV_VAR = "BASTION_CONFIG"
DEFAULT_TIMEOUT_SECONDS = 30.0

REQUIRED_KEYS = ("endpoint", "server_public_key", "public_key_file", "secret_key_file")
OPTIONAL_KEYS = ("timeout_seconds",)

# tcp://host:port, with a host name, an IPv4 address or a bracketed IPv6 one.
_ENDPOINT = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")

CONNECT_HINT = ("run `bastion-kernel connect --endpoint tcp://HOST:PORT --server-key SERVER_KEY_FILE "
                "--key-dir KEY_DIR` with the details the data owner gave you")


class ConfigError(Exception):
    """The scientist's configuration is missing or wrong; the message says how to fix it."""

    ename = "ConfigError"

    def __init__(self, evalue: str):
        super().__init__(evalue)
        self.evalue = evalue
        self.details: dict = {}


@dataclass(frozen=True)
class ScientistConfig:
    """A loaded configuration with the keys read from their files."""

    endpoint: str
    server_public_key: bytes  # Z85, 40 bytes
    public_key: bytes         # Z85, 40 bytes
    secret_key: bytes         # Z85, 40 bytes
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    path: Path | None = None


def config_path() -> Path:
    """Where the configuration lives: ``$BASTION_CONFIG`` or ``~/.bastion/config.toml``."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".bastion" / "config.toml"


def check_endpoint(endpoint: object) -> str:
    """Return ``endpoint`` if it is a ``tcp://host:port`` address; raise ConfigError otherwise."""
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        raise ConfigError(f"endpoint must look like tcp://HOST:PORT, got {endpoint!r:.80}")
    port = int(_ENDPOINT.match(endpoint).group(2))
    if not 0 < port < 65536:
        raise ConfigError(f"endpoint port must be between 1 and 65535, got {port}")
    return endpoint


def check_z85_key(text: object, what: str) -> bytes:
    """Return a CURVE key given as Z85 text (40 characters) as bytes; raise ConfigError otherwise."""
    if not isinstance(text, str) or len(text) != 40:
        raise ConfigError(f"{what} must be a CURVE key: 40 characters of Z85 text")
    try:
        decoded = z85.decode(text.encode("ascii"))
    except (UnicodeEncodeError, ValueError, KeyError, IndexError):
        raise ConfigError(f"{what} is not valid Z85 text") from None
    if len(decoded) != 32:
        raise ConfigError(f"{what} must decode to 32 bytes")
    return text.encode("ascii")


def read_public_key(path: str | os.PathLike) -> bytes:
    """The public key (Z85 bytes) of a ZeroMQ certificate file; raise ConfigError if unreadable."""
    public, _ = _load_certificate(path)
    return public


def read_key_pair(secret_path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a ZeroMQ secret certificate file; raise ConfigError if it has no secret."""
    public, secret = _load_certificate(secret_path)
    if not secret:
        raise ConfigError(f"{secret_path} holds no secret key (is it the public .key file?)")
    return public, secret


def _load_certificate(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"key file {path} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"key file {path} is not a ZeroMQ certificate: {exc}") from None
    if not public:
        raise ConfigError(f"key file {path} holds no public key")
    check_z85_key(public.decode("ascii", "replace"), f"the public key in {path}")
    return public, secret


def load_config(path: str | os.PathLike | None = None) -> ScientistConfig:
    """Read and check the configuration and the key files it names.

    Parameters
    ----------
    path
        The TOML file; by default :func:`config_path`.

    Returns
    -------
    ScientistConfig

    Raises
    ------
    ConfigError
        With a message that names the problem and how to fix it.
    """
    from_environment = path is None and bool(os.environ.get(ENV_VAR))
    given = Path(path).expanduser() if path is not None else config_path()
    # Every message names the absolute path looked in: a relative $BASTION_CONFIG is read from the
    # kernel's working directory (the notebook's folder), which is rarely where it was written.
    path = given.absolute()
    if not path.is_file():
        origin = ""
        if not given.is_absolute():
            source = f"${ENV_VAR}={os.environ[ENV_VAR]!r}" if from_environment else repr(str(given))
            origin = (f" ({source} is a relative path, read from the kernel's working directory {Path.cwd()}; "
                      "give an absolute path)")
        raise ConfigError(f"no Bastion connection is configured: {path} does not exist{origin}; {CONNECT_HINT}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r}; known settings are "
                          f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ConfigError(f"{path}: missing setting {missing[0]!r}; {CONNECT_HINT}")
    try:
        endpoint = check_endpoint(data["endpoint"])
        server_key = check_z85_key(data["server_public_key"], "server_public_key")
        for key in ("public_key_file", "secret_key_file"):
            if not isinstance(data[key], str):
                raise ConfigError(f"{key} must be a file path")
        public = read_public_key(data["public_key_file"])
        pair_public, secret = read_key_pair(data["secret_key_file"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.evalue}") from None
    if pair_public != public:
        raise ConfigError(f"{path}: public_key_file and secret_key_file are not the same key pair")
    timeout = data.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise ConfigError(f"{path}: timeout_seconds must be a number of seconds between 0 and 3600")
    return ScientistConfig(endpoint=endpoint, server_public_key=server_key, public_key=public,
                           secret_key=secret, timeout_seconds=float(timeout), path=path)


def config_text(endpoint: str, server_public_key: bytes, public_key_file: Path,
                secret_key_file: Path) -> str:
    """The TOML text ``bastion-kernel connect`` writes."""
    import tomli_w

    return tomli_w.dumps({
        "endpoint": endpoint,
        "server_public_key": server_public_key.decode("ascii"),
        "public_key_file": str(public_key_file),
        "secret_key_file": str(secret_key_file),
    })
