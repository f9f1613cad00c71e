"""`bastion-kernel keygen | connect | install`, run as the real console script."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from bastion_kernel.config import ConfigError, load_config

BIN = Path(sys.executable).parent
CLI = str(BIN / "bastion-kernel")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def server_key(tmp_path) -> Path:
    (tmp_path / "server").mkdir()
    public, _ = zmq.auth.create_certificates(tmp_path / "server", "server")
    return Path(public)


def test_keygen_writes_a_key_pair_with_a_private_secret(tmp_path):
    keys = tmp_path / "keys"
    done = run_cli("keygen", "--dir", str(keys))
    assert done.returncode == 0, done.stderr
    public_file, secret_file = keys / "scientist.key", keys / "scientist.key_secret"
    public, no_secret = zmq.auth.load_certificate(public_file)
    pair_public, secret = zmq.auth.load_certificate(secret_file)
    assert no_secret is None and secret and pair_public == public
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert str(public_file) in done.stdout


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    keys = tmp_path / "keys"
    assert run_cli("keygen", "--dir", str(keys)).returncode == 0
    first, _ = zmq.auth.load_certificate(keys / "scientist.key")
    again = run_cli("keygen", "--dir", str(keys))
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "--force" in again.stderr
    assert zmq.auth.load_certificate(keys / "scientist.key")[0] == first
    forced = run_cli("keygen", "--dir", str(keys), "--force")
    assert forced.returncode == 0, forced.stderr
    assert zmq.auth.load_certificate(keys / "scientist.key")[0] != first


def test_connect_writes_a_config_the_kernel_loads(tmp_path, server_key):
    keys = tmp_path / "keys"
    run_cli("keygen", "--dir", str(keys))
    config = tmp_path / "conf" / "config.toml"
    done = run_cli("connect", "--endpoint", "tcp://127.0.0.1:5999", "--server-key", str(server_key),
                   "--key-dir", str(keys), "--config", str(config))
    assert done.returncode == 0, done.stderr
    loaded = load_config(config)
    assert loaded.endpoint == "tcp://127.0.0.1:5999"
    assert loaded.server_public_key == zmq.auth.load_certificate(server_key)[0]
    public, secret = zmq.auth.load_certificate(keys / "scientist.key_secret")
    assert (loaded.public_key, loaded.secret_key) == (public, secret)


def test_connect_default_path_follows_bastion_config(tmp_path, server_key):
    keys = tmp_path / "keys"
    run_cli("keygen", "--dir", str(keys))
    target = tmp_path / "elsewhere.toml"
    done = run_cli("connect", "--endpoint", "tcp://127.0.0.1:5999", "--server-key", str(server_key),
                   "--key-dir", str(keys), env={"BASTION_CONFIG": str(target)})
    assert done.returncode == 0, done.stderr
    assert load_config(target).endpoint == "tcp://127.0.0.1:5999"


@pytest.mark.parametrize("case", ["bad endpoint", "missing server key", "no keys in key dir",
                                  "own key as server key"])
def test_connect_validates_its_inputs(tmp_path, server_key, case):
    keys = tmp_path / "keys"
    run_cli("keygen", "--dir", str(keys))
    args = {"endpoint": "tcp://127.0.0.1:5999", "server": str(server_key), "keys": str(keys)}
    if case == "bad endpoint":
        args["endpoint"] = "http://example.org"
    elif case == "missing server key":
        args["server"] = str(tmp_path / "nope.key")
    elif case == "no keys in key dir":
        args["keys"] = str(tmp_path)
    else:
        args["server"] = str(keys / "scientist.key")
    config = tmp_path / "config.toml"
    done = run_cli("connect", "--endpoint", args["endpoint"], "--server-key", args["server"],
                   "--key-dir", args["keys"], "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert not config.exists()


def test_load_config_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="bastion-kernel connect"):
        load_config()
    broken = tmp_path / "broken.toml"
    broken.write_text("endpoint = [unterminated")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('endpoint = "tcp://127.0.0.1:1"\nsecret = "x"\n')
    with pytest.raises(ConfigError, match="unknown setting 'secret'"):
        load_config(unknown)
    missing = tmp_path / "missing.toml"
    missing.write_text('endpoint = "tcp://127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="missing setting 'server_public_key'"):
        load_config(missing)


def test_install_into_a_prefix_is_listed_by_jupyter(tmp_path):
    prefix = tmp_path / "prefix"
    done = run_cli("install", "--prefix", str(prefix))
    assert done.returncode == 0, done.stderr
    spec_dir = prefix / "share" / "jupyter" / "kernels" / "bastion"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    python, *rest = spec["argv"]
    assert rest == ["-m", "bastion_kernel", "-f", "{connection_file}"]
    # the Python that ran the installer (venv symlinks may name it python or python3)
    assert Path(python).is_absolute() and Path(python).resolve() == Path(sys.executable).resolve()
    assert spec["display_name"] == "Bastion" and spec["language"] == "bastion"
    assert (spec_dir / "logo-64x64.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    listed = subprocess.run([str(BIN / "jupyter"), "kernelspec", "list", "--json"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert listed.returncode == 0, listed.stderr
    specs = json.loads(listed.stdout)["kernelspecs"]
    assert specs["bastion"]["spec"]["display_name"] == "Bastion"
    assert Path(specs["bastion"]["resource_dir"]) == spec_dir


def test_install_options_are_exclusive(tmp_path):
    done = run_cli("install", "--user", "--prefix", str(tmp_path))
    assert done.returncode == 2


def test_repository_kernel_json_matches_the_one_written_from_code():
    from bastion_kernel.cli import REPO_KERNELSPEC, kernel_json

    template = json.loads((REPO_KERNELSPEC / "kernel.json").read_text())
    assert template == kernel_json("python")
