"""The executor's one SparkSession, made from the workspace's ``[spark]`` table on first use.

``config.toml``::

    [spark]
    master = "local[2]"                # default: a Spark started inside the executor process
    # remote = "sc://spark.example:15002"   # or a Spark Connect server (not with master)

    [spark.conf]                       # Spark settings, every value a string
    "spark.executor.memory" = "4g"

Only these three keys are read; any other key is refused, naming it.  A
process has one session: the executor creates it lazily, on the first query of
a Spark-backed dataset (about 5 s for a local master), and keeps it until it
exits.  The JVM of a local master is a child of the executor and ends with it.

Nothing here imports PySpark until a session is made, so the executor and the
owner's command line run without the ``spark`` extra as long as no dataset
uses the Spark engine.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from owner_console.workspace import Workspace, WorkspaceError

log = logging.getLogger("bastion.executor")

DEFAULT_MASTER = "local[2]"
SETTINGS = ("master", "remote", "conf")
# Every session: no web UI (it would show plans and data on a port), UTC so
# that timestamps read the same on every machine, Arrow for results, and
# ANSI mode off: the compiler gives polars' answers (no error on an overflow,
# a cast that does not fit or a division by zero), which need Spark's
# non-ANSI functions.
BASE_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.ansi.enabled": "false",
    "spark.ui.showConsoleProgress": "false",  # progress bars would fill the executor's log
}
# A local master only: two shuffle partitions suit a machine's cores better than
# Spark's 200 (measured in issue 18: 20 small queries in 17 s), and the driver's
# RPC and block manager listen on the loopback interface only: a local Spark
# has no cluster to reach it, and its ports take unauthenticated connections.
LOCAL_CONF = {
    "spark.sql.shuffle.partitions": "2",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.host": "127.0.0.1",
}
# Through Spark Connect only session settings can be set; static ones (the UI)
# are the server's.
REMOTE_CONF = {"spark.sql.session.timeZone": "UTC", "spark.sql.ansi.enabled": "false"}
# What the compiler's answers depend on: the owner's conf may not change these.
FIXED_CONF = {"spark.sql.session.timeZone": "UTC", "spark.sql.ansi.enabled": "false"}
INSTALL_HINT = "install it with: pip install -e '.[spark]' (PySpark 4.0 and a Java 17 or 21 runtime)"


@dataclass(frozen=True)
class SparkSettings:
    """Where the executor's Spark runs, as the workspace's ``[spark]`` table says.

    Parameters
    ----------
    master : str, optional
        A Spark master URL (``local[2]``, ``spark://host:7077``, ``yarn``...):
        the Spark driver runs inside the executor process.
    remote : str, optional
        A Spark Connect URL, ``sc://host:port``: the driver is that server's.
    conf : Mapping[str, str]
        Spark settings, applied over the defaults (:data:`BASE_CONF`, and
        :data:`LOCAL_CONF` for a local master).
    """

    master: str | None = None
    remote: str | None = None
    conf: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.master is not None and self.remote is not None:
            raise WorkspaceError("[spark]: set master or remote, not both")

    @property
    def is_remote(self) -> bool:
        """True when queries go to a Spark Connect server."""
        return self.remote is not None

    @property
    def effective_master(self) -> str:
        """The master URL a classic session starts with."""
        return self.master or DEFAULT_MASTER

    def spark_conf(self) -> dict[str, str]:
        """Every Spark setting the session is built with: the defaults, then the owner's."""
        if self.is_remote:
            defaults = dict(REMOTE_CONF)
        else:
            defaults = dict(BASE_CONF)
            if self.effective_master.startswith("local"):
                defaults.update(LOCAL_CONF)
        return {**defaults, **self.conf}

    def describe(self) -> str:
        """Where queries run, for the owner's messages (never the conf values: they may hold secrets)."""
        return f"Spark Connect at {self.remote}" if self.is_remote else f"Spark master {self.effective_master}"

    @classmethod
    def from_config(cls, table: Any, where: str = "config.toml") -> "SparkSettings":
        """Read a ``[spark]`` table (None or missing: the defaults).

        Raises
        ------
        WorkspaceError
            Naming the key: an unknown key, a value of the wrong type, a
            ``remote`` that is not ``sc://``, both ``master`` and ``remote``.
        """
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise WorkspaceError(f"{where}: [spark] must be a table")
        unknown = sorted(set(table) - set(SETTINGS))
        if unknown:
            raise WorkspaceError(f"{where}: unknown setting {unknown[0]!r} in [spark]; known: {', '.join(SETTINGS)}")
        master = table.get("master")
        if master is not None and (not isinstance(master, str) or not master.strip() or master != master.strip()):
            raise WorkspaceError(f"{where}: spark.master must be a Spark master URL such as \"local[2]\", "
                                 f"got {master!r}")
        remote = table.get("remote")
        if remote is not None and (not isinstance(remote, str) or not remote.startswith("sc://")
                                   or len(remote) <= len("sc://") or any(c.isspace() for c in remote)):
            raise WorkspaceError(f"{where}: spark.remote must be a Spark Connect URL sc://host:port, got {remote!r}")
        conf = _flat_conf(table.get("conf", {}), where)
        for key in ("spark.master", "spark.remote"):
            if key in conf:
                raise WorkspaceError(f"{where}: [spark.conf] may not set {key!r}: write {key.split('.')[1]} = ... "
                                     "in [spark]")
        for key, value in FIXED_CONF.items():
            if key in conf and conf[key].strip().lower() != value.lower():
                raise WorkspaceError(f"{where}: [spark.conf] {key!r} must stay {value!r}: Bastion's answers on "
                                     "Spark are polars' answers, which depend on it")
        try:
            return cls(master=master, remote=remote, conf=conf)
        except WorkspaceError as exc:
            raise WorkspaceError(f"{where}: {exc}") from None


def _flat_conf(conf: Any, where: str) -> dict[str, str]:
    """``[spark.conf]`` as ``{"spark.x.y": "value"}``.

    TOML reads an unquoted dotted key (``spark.sql.shuffle.partitions = "4"``)
    as nested tables; those are joined back into the dotted name Spark expects.
    """
    if not isinstance(conf, Mapping):
        raise WorkspaceError(f"{where}: [spark.conf] must be a table of Spark settings")
    flat: dict[str, str] = {}
    stack: list[tuple[str, Mapping]] = [("", conf)]
    while stack:
        prefix, table = stack.pop()
        for key, value in table.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                stack.append((f"{name}.", value))
            elif isinstance(value, str):
                flat[name] = value
            else:
                raise WorkspaceError(f"{where}: [spark.conf] {name!r} must be a string "
                                     f"(write it in quotes: \"{name}\" = \"{_toml_text(value)}\")")
    return flat


def _toml_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def settings_of(workspace: Workspace) -> SparkSettings:
    """The workspace's ``[spark]`` settings; raises WorkspaceError naming a bad key."""
    return SparkSettings.from_config(workspace.config.get("spark"), str(workspace.config_path))


# ---------------------------------------------------------------- the process's session
_lock = threading.Lock()
_settings: SparkSettings | None = None
_session: Any = None


def configure(settings: SparkSettings) -> None:
    """Set where this process's session runs; takes effect when the session is first made.

    Raises
    ------
    WorkspaceError
        When a session already runs with other settings (restart the executor to change them).
    """
    global _settings
    with _lock:
        if _session is not None and _settings is not None and settings != _settings:
            raise WorkspaceError(f"Spark already runs here ({_settings.describe()}); restart the executor "
                                 "to use new [spark] settings")
        _settings = settings


def session() -> Any:
    """This process's SparkSession, made on first use from :func:`configure`'s settings.

    Raises
    ------
    WorkspaceError
        PySpark is not installed, or Spark could not start (no Java, a
        master or server that cannot be reached): the message says which.
    """
    global _session
    with _lock:
        if _session is not None and not is_stopped(_session):
            return _session
        settings = _settings or SparkSettings()
        _session = _start(settings)
        return _session


def forget(spark: Any) -> None:
    """Drop ``spark`` as this process's session when it is (a lost driver: the next query makes a new one)."""
    global _session
    with _lock:
        if _session is spark:
            _session = None


def stop() -> None:
    """Stop this process's session (a local master's JVM ends); the next use makes a new one."""
    global _session
    with _lock:
        spark, _session = _session, None
    if spark is not None:
        try:
            spark.stop()
        except Exception:  # noqa: BLE001 - stopping a session that is already gone
            pass


def is_connect(spark: Any) -> bool:
    """True for a Spark Connect session (``pyspark.sql.connect``), False for a classic one."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _start(settings: SparkSettings) -> Any:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise WorkspaceError(f"a dataset uses the Spark engine but PySpark is not installed: {INSTALL_HINT}") \
            from None
    builder = SparkSession.builder.appName("bastion-executor")
    if settings.is_remote:
        builder = builder.remote(settings.remote)
    else:
        builder = builder.master(settings.effective_master)
    for key, value in settings.spark_conf().items():
        builder = builder.config(key, value)
    log.info("starting Spark (%s)", settings.describe())
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - PySpark raises many types; the owner gets the class and first line
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise WorkspaceError(f"Spark did not start ({settings.describe()}): {type(exc).__name__}: {first_line}"
                             f"{'' if _java_found() or settings.is_remote else '; no java found: ' + INSTALL_HINT}"
                             ) from None
    atexit.register(_stop_at_exit, spark)
    return spark


def _stop_at_exit(spark: Any) -> None:
    try:
        spark.stop()
    except Exception:  # noqa: BLE001 - the interpreter is ending
        pass


def is_stopped(spark: Any) -> bool:
    """True when a classic session's SparkContext has stopped (its JVM died or someone stopped it)."""
    if is_connect(spark):
        return False  # the client reconnects by itself
    try:
        return bool(spark.sparkContext._jsc.sc().isStopped())
    except Exception:  # noqa: BLE001 - the gateway to the JVM is gone
        return True


def _java_found() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return True
    import shutil
    return shutil.which("java") is not None
