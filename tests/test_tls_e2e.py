"""TLS and proxies as a site behind a TLS-inspecting proxy meets them: the simulator
serves HTTPS on loopback with a certificate signed by a throw-away CA made here, and
`syncer` trusts it only through the usual variables (REQUESTS_CA_BUNDLE,
CURL_CA_BUNDLE, SSL_CERT_FILE, GLOBUS_SDK_VERIFY_SSL), for every request to Globus:
the login's code exchange, token renewal, the listing and every group read. Requests
go through HTTPS_PROXY when it is set."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import select
import socket
import ssl
import threading
import typing as t
import urllib.request
from pathlib import Path

import pytest
from conftest import ISSUED_TOKENS, Env, make_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import current_state, expected_state
from test_simulate_cli import simulate

from syncer.globus.token_store import TokenStore
from syncer.simulator import Simulator, TLSFiles, World

CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "GLOBUS_SDK_VERIFY_SSL")


class Pki(t.NamedTuple):
    ca: Path  # the throw-away CA's certificate: what a site would hand its users
    server: TLSFiles  # the simulator's certificate for 127.0.0.1, signed by the CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(folder: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1 signed by it, valid for a day."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("syncer test CA")).issuer_name(_name("syncer test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "site-ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return Pki(ca_path, TLSFiles(str(cert_path), str(key_path)))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    (tmp_path / "pki").mkdir()
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_env(tmp_path: Path, pki: Pki) -> t.Iterator[Env]:
    """A user setup pointed at an HTTPS simulator whose CA nothing trusts by default."""
    world = World.generate(groups=5, members=6, seed=5)
    sim = Simulator(world, port=0, tls=pki.server).start()
    try:
        env = make_env(tmp_path, sim, world)
        for name in (*CA_VARIABLES, "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                     "all_proxy", "NO_PROXY", "no_proxy"):
            env.vars.pop(name, None)
        yield env
    finally:
        ISSUED_TOKENS.update(sim.issued_tokens)
        sim.stop()


def log_in_trusting(env: Env, ca: Path) -> None:
    env.vars["REQUESTS_CA_BUNDLE"] = str(ca)
    result = env.login()
    assert result.returncode == 0, result.output
    del env.vars["REQUESTS_CA_BUNDLE"]


def test_the_simulator_serves_https_with_the_sites_certificate(tls_env: Env, pki: Pki) -> None:
    assert tls_env.sim.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(pki.ca))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    with opener.open(f"{tls_env.sim.url}/health", timeout=30) as answer:
        assert answer.status == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{tls_env.sim.url}/health", timeout=30)


def test_without_the_sites_ca_a_sync_fails_with_one_line_naming_the_variables(tls_env: Env, pki: Pki) -> None:
    env = tls_env
    log_in_trusting(env, pki.ca)
    result = env.run("sync")
    assert result.returncode == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("syncer: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "TLS certificate of 127.0.0.1 not trusted" in errors[0]
    assert "REQUESTS_CA_BUNDLE" in errors[0] and "SSL_CERT_FILE" in errors[0]
    assert not env.query("SELECT 1 FROM memberships")


def test_without_the_sites_ca_login_fails_with_one_line_and_stores_nothing(tls_env: Env) -> None:
    result = tls_env.login()
    assert result.returncode == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("syncer: error: Globus Auth could not be reached: TLS")
    assert "REQUESTS_CA_BUNDLE" in result.stderr
    with TokenStore(tls_env.tokens) as store:
        assert store.groups_tokens() is None


@pytest.mark.parametrize("variable", CA_VARIABLES)
def test_a_sync_works_with_the_sites_ca_in_any_of_the_variables(tls_env: Env, pki: Pki, variable: str) -> None:
    env = tls_env
    log_in_trusting(env, pki.ca)
    env.sim.expire_access_tokens()  # the renewal at Globus Auth goes over TLS too
    env.vars[variable] = str(pki.ca)
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert env.sim.stats["refresh_grants"] == 1
    assert current_state(env) == expected_state(env.world)


def test_a_ca_variable_naming_no_file_is_a_78(tls_env: Env, pki: Pki) -> None:
    env = tls_env
    log_in_trusting(env, pki.ca)
    env.vars["REQUESTS_CA_BUNDLE"] = str(pki.ca.with_name("missing.pem"))
    result = env.run("sync")
    assert result.returncode == 78, result.output
    assert "environment variable REQUESTS_CA_BUNDLE" in result.stderr.strip().splitlines()[-1]


class ConnectProxy:
    """An HTTPS proxy (HTTP CONNECT tunnels) on loopback that counts the tunnels it opens."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.tunnels.append(target)
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pair = {client: upstream, upstream: client}
                while True:
                    ready, _, _ = select.select(list(pair), [], [], 60)
                    if not ready:
                        return
                    for sock in ready:
                        data = sock.recv(65536)
                        if not data:
                            return
                        pair[sock].sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting in its thread
        self._server.close()


def test_requests_to_globus_go_through_https_proxy(tls_env: Env, pki: Pki) -> None:
    env = tls_env
    log_in_trusting(env, pki.ca)
    env.sim.expire_access_tokens()
    proxy = ConnectProxy()
    try:
        env.vars.update(HTTPS_PROXY=proxy.url, REQUESTS_CA_BUNDLE=str(pki.ca))
        result = env.run("sync")
        assert result.returncode == 0, result.output
        assert f"127.0.0.1:{env.sim.port}" in proxy.tunnels  # Auth (the renewal) and Groups both
        assert len(proxy.tunnels) >= 2
        assert current_state(env) == expected_state(env.world)
    finally:
        proxy.close()
    # a proxy that cannot be reached (a port nothing listens on): one line, exit 1
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        env.vars["HTTPS_PROXY"] = f"http://127.0.0.1:{unused.getsockname()[1]}"
    result = env.run("sync")
    assert result.returncode == 1
    assert "proxy" in result.stderr.strip().splitlines()[-1]


def test_syncer_simulate_serves_https_with_a_given_certificate(tmp_path: Path, pki: Pki) -> None:
    world = World.generate(groups=1, members=1)
    env = make_env(tmp_path, Simulator(world), world)
    with simulate(env, "--tls-cert", pki.server.cert, "--tls-key", pki.server.key) as served:
        assert served.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(pki.ca))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        with opener.open(f"{served.url}/health", timeout=30) as answer:
            assert answer.status == 200
