"""HTTPS: the self-signed certificate (`--https`) and serving over it."""

from __future__ import annotations

import ssl

import httpx
import pytest

from app.access import Accounts
from app.tls import cert_names, fingerprint, self_signed
from app_helpers import free_port


def test_self_signed_certificate_names_this_machine_and_is_reused(tmp_path):
    cert, key = self_signed(tmp_path / "tls", host="annotate.test")
    names = cert_names(cert)
    assert {"localhost", "127.0.0.1", "annotate.test"} <= set(names)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    fp = fingerprint(cert)
    assert len(fp.split(":")) == 32
    assert self_signed(tmp_path / "tls", host="annotate.test") == (cert, key) and fingerprint(cert) == fp  # reused
    self_signed(tmp_path / "tls", host="other.test")  # a name the kept one lacks: replaced
    assert "other.test" in cert_names(cert) and fingerprint(cert) != fp
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.load_cert_chain(cert, key)  # the pair matches


def test_https_server_with_login(tmp_path, capsys):
    import launch

    acc = Accounts(tmp_path / ".studio" / "users.json", scrypt_n=2**12)
    acc.add("ann", "annotator", "ann-password-1")
    port = free_port()
    demo = launch.main(model=None, port=port, block=False, data_root=str(tmp_path), https=True)
    try:
        out = capsys.readouterr().out
        cert = tmp_path / ".studio" / "tls" / "cert.pem"
        assert fingerprint(cert) in out and f"https://127.0.0.1:{port}" in out
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=30) as s:
            assert s.get(f"https://127.0.0.1:{port}/config").status_code == 401
            assert s.post(f"https://127.0.0.1:{port}/login",
                          data={"username": "ann", "password": "ann-password-1"}).status_code == 200
            assert s.get(f"https://127.0.0.1:{port}/config").status_code == 200
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(f"https://127.0.0.1:{port}/config", timeout=10)
    finally:
        demo.close()


def test_plain_http_beyond_loopback_says_remote_browsers_cannot_record(tmp_path, capsys):
    import launch

    Accounts(tmp_path / ".studio" / "users.json", scrypt_n=2**12).add("ad", "admin", "ad-password-1")
    demo = launch.main(model=None, host="0.0.0.0", port=free_port(), block=False, data_root=str(tmp_path))
    try:
        err = capsys.readouterr().err
        assert "cannot record" in err and "--https" in err
    finally:
        demo.close()


def test_cert_and_key_go_together(tmp_path):
    import launch

    with pytest.raises(SystemExit, match="go together"):
        launch.tls_files(tmp_path, "127.0.0.1", False, str(tmp_path / "c.pem"), None)
