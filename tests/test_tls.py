"""TLS on both sides: an https:// ArangoDB verified with a CA file, and a TLS listener.

A throwaway CA from trustme signs every certificate; nothing here touches the
system's trust store, which is exactly why "no CA file" must fail to verify.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from arango.client import ArangoClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import ConfigError, ServerConfig, UpstreamConfig, load_config
from proxy.tls import client_context, server_context
from tests.conftest import ProxyFactory
from tests.processes import ProxyProcess, StandInProcess, free_port
from tests.standin import StandIn
from tests.standin.client import ROOT, Client
from tests.test_passthrough import echo_app
from tests.test_python_arango import wait_for

ERROR_KEYS = ["error", "errorNum", "errorMessage", "code"]  # pre-handler order


@dataclass(frozen=True)
class Pki:
    """A CA and a certificate for 127.0.0.1/localhost, as PEM files."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path  # certificate chain
    key_file: Path
    combined_file: Path  # key and chain in one file (the stand-in's --tls)
    cert: trustme.LeafCert

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key", "combined")}
    ca.cert_pem.write_to_path(files["ca"])
    for pem in cert.cert_chain_pems:
        pem.write_to_path(files["cert"], append=True)
    cert.private_key_pem.write_to_path(files["key"])
    cert.private_key_and_cert_chain_pem.write_to_path(files["combined"])
    return Pki(ca, files["ca"], files["cert"], files["key"], files["combined"], cert)


@pytest.fixture
async def https_standin(standin_factory: Callable[..., Awaitable[StandIn]], pki: Pki) -> StandIn:
    return await standin_factory(auth=True, ssl_context=pki.server_context())


@pytest.fixture
async def tls_http(pki: Pki) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that trusts the test CA (and nothing else)."""
    connector = aiohttp.TCPConnector(ssl=pki.client_context())
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


def tls_server(pki: Pki) -> dict[str, str]:
    return {"tls_cert": str(pki.cert_file), "tls_key": str(pki.key_file)}


async def round_trip(client: Client) -> None:
    """Pass-through and an async job with its result, as a driver does them."""
    version = await client.call("GET", "/_api/version")
    assert version.status == 200, version
    assert version.json["server"] == "arango"
    job_id = await client.submit("GET", "/_api/version")
    result = await client.result(job_id)
    assert result.status == 200
    assert result.json == version.json
    assert (await client.call("GET", f"/_api/job/{job_id}")).status == 404  # fetched: gone


def assert_arango_503(answer: Any, *fragments: str) -> None:
    assert answer.status == 503
    assert answer.content_type == "application/json; charset=utf-8"
    body = answer.json
    assert list(body) == ERROR_KEYS
    assert (body["error"], body["errorNum"], body["code"]) == (True, 503, 503)
    for fragment in fragments:
        assert fragment in body["errorMessage"], body["errorMessage"]


# -- upstream: https:// ArangoDB ----------------------------------------------


async def test_https_upstream_with_ca_file(
    https_standin: StandIn, start_proxy: ProxyFactory, pki: Pki, http: aiohttp.ClientSession
) -> None:
    assert https_standin.url.startswith("https://")
    proxy = await start_proxy(https_standin.url, upstream={"ca_file": str(pki.ca_file)})
    await round_trip(Client(http, proxy))
    async with http.get(proxy + "/_proxy/ready") as ready:
        assert ready.status == 200


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed end-entity certificate for 127.0.0.1 (CA:FALSE): (key+cert, cert) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arangodb")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "self-signed-key+cert.pem").write_bytes(key_pem + cert_pem)
    (folder / "self-signed.pem").write_bytes(cert_pem)
    return folder / "self-signed-key+cert.pem", folder / "self-signed.pem"


async def test_self_signed_upstream_trusted_by_naming_it_as_ca_file(
    standin_factory: Callable[..., Awaitable[StandIn]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """What the README promises instead of a switch that turns verification off."""
    key_and_cert, cert = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(key_and_cert)
    standin = await standin_factory(ssl_context=context)
    proxy = await start_proxy(standin.url, upstream={"ca_file": str(cert)})
    await round_trip(Client(http, proxy))


async def test_unverified_upstream_certificate_is_503_naming_the_upstream(
    https_standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Without the CA file the system store is used, which does not know the test CA."""
    client = Client(http, await start_proxy(https_standin.url))
    message = (f"upstream ArangoDB at {https_standin.url}", "certificate could not be verified")
    assert_arango_503(await client.call("GET", "/_api/version"), *message)
    # the credential check of an async job meets the same wall: nothing is queued
    refused = await client.call("GET", "/_api/version", headers={"x-arango-async": "store"})
    assert_arango_503(refused, "cannot verify credentials", *message)
    assert_arango_503(await client.call("GET", "/_proxy/ready"), "not ready", *message)
    assert sum(https_standin.executed.values()) == 0  # no handler ran at the stand-in


async def test_certificate_for_another_host_is_refused(
    standin_factory: Callable[..., Awaitable[StandIn]],
    start_proxy: ProxyFactory,
    pki: Pki,
    http: aiohttp.ClientSession,
) -> None:
    """Signed by the trusted CA, but for db.example: the host name is checked too."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.ca.issue_cert("db.example").configure_cert(context)
    standin = await standin_factory(ssl_context=context)
    client = Client(http, await start_proxy(standin.url, upstream={"ca_file": str(pki.ca_file)}))
    answer = await client.call("GET", "/_api/version")
    assert_arango_503(answer, standin.url, "certificate could not be verified", "127.0.0.1")


async def test_https_url_to_a_plain_http_upstream_is_503(
    standin: StandIn, start_proxy: ProxyFactory, pki: Pki, http: aiohttp.ClientSession
) -> None:
    upstream = standin.url.replace("http://", "https://")
    client = Client(http, await start_proxy(upstream, upstream={"ca_file": str(pki.ca_file)}))
    answer = await client.call("GET", "/_api/version")
    assert_arango_503(answer, f"upstream ArangoDB at {upstream}", "TLS handshake failed")


# -- the listening side -------------------------------------------------------


async def test_tls_listener_pass_through_and_jobs(
    standin: StandIn, start_proxy: ProxyFactory, pki: Pki, tls_http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standin.url, server=tls_server(pki))
    assert proxy.startswith("https://")
    await round_trip(Client(tls_http, proxy))


async def test_tls_client_is_forwarded_as_https(
    serve_app: Callable[..., Awaitable[str]],
    start_proxy: ProxyFactory,
    pki: Pki,
    tls_http: aiohttp.ClientSession,
    http: aiohttp.ClientSession,
) -> None:
    echo = await serve_app(echo_app())
    tls_proxy = await start_proxy(echo, server=tls_server(pki))
    plain_proxy = await start_proxy(echo)

    async def proto(session: aiohttp.ClientSession, url: str, claim: str | None) -> str:
        headers = {} if claim is None else {"X-Forwarded-Proto": claim}
        async with session.get(url + "/h", headers=headers) as resp:
            seen = {k.lower(): v for k, v in json.loads(await resp.read())["headers"]}
            return str(seen["x-forwarded-proto"])

    assert await proto(tls_http, tls_proxy, None) == "https"
    assert await proto(tls_http, tls_proxy, "http") == "https"  # a TLS client cannot downgrade
    assert await proto(http, plain_proxy, None) == "http"
    # a plain hop keeps what a TLS-terminating balancer in front of it said
    assert await proto(http, plain_proxy, "https") == "https"


async def test_plain_http_to_the_tls_port_reaches_no_handler(
    standin: StandIn, start_proxy: ProxyFactory, pki: Pki, tls_http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standin.url, server=tls_server(pki))
    plain = proxy.replace("https://", "http://")
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"x-arango-async": "store"}):
            with pytest.raises(aiohttp.ClientError):
                async with session.get(plain + "/_api/version", headers={**ROOT, **headers}):
                    pass
    assert standin.executed[("GET", "/_api/version")] == 0
    over_tls = Client(tls_http, proxy)
    assert (await over_tls.call("GET", "/_api/job/pending")).json == []
    assert (await over_tls.call("GET", "/_api/job/done")).json == []
    assert standin.executed[("GET", "/_api/version")] == 0  # job lists come from SQLite


async def test_python_arango_over_tls(
    standin: StandIn, start_proxy: ProxyFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real driver, verifying the proxy's certificate with the CA file."""
    # requests lets these variables override a session's own `verify` (the CA
    # file python-arango sets); some machines export them for the system store
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    proxy = await start_proxy(standin.url, server=tls_server(pki))

    def body() -> None:
        client = ArangoClient(hosts=proxy, verify_override=str(pki.ca_file))
        try:
            db: Any = client.db("_system", username="root", password="", verify=True)
            assert db.version() == "3.12.4"
            job = db.begin_async_execution(return_result=True).version()
            wait_for(job)
            assert job.result() == "3.12.4"
            assert job.id not in db.async_jobs("done")  # fetched: gone
        finally:
            client.close()

    await asyncio.to_thread(body)


# -- the command, as a real process -------------------------------------------


@pytest.fixture
def https_standin_process(pki: Pki) -> Iterator[StandInProcess]:
    proc = StandInProcess.start("--users", "root:", "--tls", str(pki.combined_file))
    yield proc
    proc.kill()


async def test_command_with_tls_on_both_sides(
    https_standin_process: StandInProcess,
    proxy_process: Callable[..., ProxyProcess],
    pki: Pki,
    tmp_path: Path,
    tls_http: aiohttp.ClientSession,
) -> None:
    assert https_standin_process.url.startswith("https://")
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\ntls_cert = "{pki.cert_file}"\ntls_key = "{pki.key_file}"\n'
        f'[upstream]\nurl = "{https_standin_process.url}"\nca_file = "{pki.ca_file}"\n'
    )
    proc = proxy_process("--config", str(config), "--listen", f"127.0.0.1:{free_port()}")
    assert proc.url.startswith("https://127.0.0.1:")
    listening = next(line for line in proc.output if "listening on" in line)
    assert listening.count("https://") == 2  # the proxy, and the upstream it names
    await round_trip(Client(tls_http, proc.url))
    assert proc.stop() == 0


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--listen", f"127.0.0.1:{free_port()}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("only-cert", "server.tls_key: expected a PEM file path, since server.tls_cert is set"),
        ("only-key", "server.tls_cert: expected a PEM file path, since server.tls_key is set"),
        ("missing-cert", "server.tls_cert: cannot read {missing}: No such file or directory"),
        ("missing-ca", "upstream.ca_file: cannot read {missing}: No such file or directory"),
        ("wrong-key", "server.tls_key: {other} is not the private key of the certificate in"),
    ],
)
def test_command_tls_config_errors_exit_1_with_one_line(
    pki: Pki, tmp_path: Path, case: str, message: str
) -> None:
    missing = tmp_path / "absent.pem"
    other = tmp_path / "other-key.pem"
    pki.ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(other)
    settings = {
        "only-cert": [f"server.tls_cert={pki.cert_file}"],
        "only-key": [f"server.tls_key={pki.key_file}"],
        "missing-cert": [f"server.tls_cert={missing}", f"server.tls_key={pki.key_file}"],
        "missing-ca": [f"upstream.ca_file={missing}", "upstream.url=https://127.0.0.1:8529"],
        "wrong-key": [f"server.tls_cert={pki.cert_file}", f"server.tls_key={other}"],
    }[case]
    config = tmp_path / "proxy.toml"
    config.write_text(toml(settings))
    data = tmp_path / "data"
    result = run_command("--config", str(config), "--data", str(data))
    assert result.returncode == 1
    assert result.stdout == ""
    expected = message.format(missing=missing, other=other)
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"arango-async-proxy: config error: {expected}")
    assert not data.exists()  # stopped before the store was opened


def toml(settings: list[str]) -> str:
    """["server.tls_cert=/x", ...] -> a TOML text with [server] and [upstream] tables."""
    tables: dict[str, list[str]] = {}
    for setting in settings:
        dotted, value = setting.split("=", 1)
        section, key = dotted.split(".")
        tables.setdefault(section, []).append(f"{key} = {json.dumps(value)}")
    return "".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in tables.items())


# -- the contexts themselves: every way a file can be wrong --------------------


# PEM armour around three bytes that are no certificate
BROKEN_CERT = "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_only_one_of_cert_and_key_names_the_missing_setting() -> None:
    with pytest.raises(ConfigError, match=r"^server\.tls_key: expected a PEM file path"):
        load_config(None, {"server.tls_cert": "/x.pem"})
    with pytest.raises(ConfigError, match=r"^server\.tls_cert: expected a PEM file path"):
        load_config(None, {"server.tls_key": "/x.pem"})


def test_ca_file_errors_name_the_setting(tmp_path: Path, pki: Pki) -> None:
    url = "https://127.0.0.1:8529"
    cases = {
        str(tmp_path / "absent.pem"): "cannot read",
        str(tmp_path): "cannot read",  # a folder
        str(write(tmp_path / "junk.pem", "hello")): "holds no PEM certificate",
        str(write(tmp_path / "empty.pem", "")): "holds no PEM certificate",
        str(write(tmp_path / "bad.pem", BROKEN_CERT)): "cannot be used",
    }
    for path, fragment in cases.items():
        with pytest.raises(ConfigError) as info:
            client_context(UpstreamConfig(url=url, ca_file=path))
        assert str(info.value).startswith("upstream.ca_file: ")
        assert path in str(info.value)
        assert fragment in str(info.value)
    # checked for an http:// upstream too: a typo must not wait for the switch to https
    with pytest.raises(ConfigError, match=r"^upstream\.ca_file: cannot read"):
        client_context(UpstreamConfig(url="http://x:1", ca_file=str(tmp_path / "absent.pem")))


def test_client_context_verifies() -> None:
    assert client_context(UpstreamConfig(url="http://127.0.0.1:8529")) is None
    context = client_context(UpstreamConfig(url="https://db.example:8529"))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_server_file_errors_name_the_setting(tmp_path: Path, pki: Pki) -> None:
    cert, key = str(pki.cert_file), str(pki.key_file)
    junk = str(write(tmp_path / "junk.pem", "hello"))
    encrypted = write(
        tmp_path / "enc.pem",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nQUJD\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    broken_cert = write(tmp_path / "broken.pem", BROKEN_CERT)
    cases = [
        (str(tmp_path / "absent.pem"), key, "server.tls_cert: ", "cannot read"),
        (cert, str(tmp_path / "absent.pem"), "server.tls_key: ", "cannot read"),
        (junk, key, "server.tls_cert: ", "holds no PEM certificate"),
        (cert, junk, "server.tls_key: ", "holds no PEM private key"),
        (cert, str(encrypted), "server.tls_key: ", "is encrypted"),
        (str(broken_cert), key, "server.tls_cert, server.tls_key: ", "cannot use"),
    ]
    for cert_path, key_path, setting, fragment in cases:
        with pytest.raises(ConfigError) as info:
            server_context(ServerConfig(tls_cert=cert_path, tls_key=key_path))
        assert str(info.value).startswith(setting), info.value
        assert fragment in str(info.value)
    assert server_context(ServerConfig()) is None
    assert server_context(ServerConfig(tls_cert=cert, tls_key=key)) is not None
