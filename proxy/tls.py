"""TLS contexts: one for the shared upstream session, one for the listening socket.

Both are built once, at start-up, from the files the config names. A file that
cannot be read or used raises `ConfigError` naming the setting, so the command
stops with one line and exit status 1 before it opens anything else.

Upstream certificates are always verified (chain and host name): against the
system's trust store, or, when `upstream.ca_file` is set, against that bundle
instead. There is deliberately no switch to turn verification off: a
self-signed ArangoDB is trusted by naming its certificate (or its CA) in
`upstream.ca_file`, which keeps the protection that a switch would throw away.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from yarl import URL

from proxy.config import ConfigError, ServerConfig, UpstreamConfig

_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


def client_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The context for talking to an https:// upstream; None when there is nothing to do.

    A CA file is checked even for an http:// upstream, so a typo in it never
    waits for the day the URL changes to https.
    """
    if not config.ca_file and URL(config.url).scheme != "https":
        return None
    if not config.ca_file:
        return ssl.create_default_context()
    pem = _read("upstream.ca_file", config.ca_file)
    if _CERTIFICATE not in pem:
        raise ConfigError(f"upstream.ca_file: {config.ca_file} holds no PEM certificate")
    try:
        return ssl.create_default_context(cadata=pem)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"upstream.ca_file: {config.ca_file} holds a certificate that cannot be used: {exc}"
        ) from exc


def server_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The context for serving TLS, or None to serve plain HTTP."""
    if not config.tls_cert:
        return None  # config validation guarantees tls_key is empty too
    cert, key = config.tls_cert, config.tls_key
    if _CERTIFICATE not in _read("server.tls_cert", cert):
        raise ConfigError(f"server.tls_cert: {cert} holds no PEM certificate")
    key_pem = _read("server.tls_key", key)
    if "PRIVATE KEY-----" not in key_pem:
        raise ConfigError(f"server.tls_key: {key} holds no PEM private key")
    if "ENCRYPTED" in key_pem:
        raise ConfigError(f"server.tls_key: {key} is encrypted; give an unencrypted key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # the password callback only guards against a prompt on the terminal
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"server.tls_key: {key} is not the private key of the certificate in {cert}"
            ) from exc
        raise ConfigError(
            f"server.tls_cert, server.tls_key: cannot use {cert} with {key}: {exc}"
        ) from exc
    return context


def _read(setting: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc
