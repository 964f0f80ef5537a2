"""Settings: a TOML file and command-line flags, read into frozen dataclasses.

Every setting has a default, so an empty file (or none) is a valid config.
Unknown sections or keys, wrong types and bad values raise one `ConfigError`
that names the setting (``upstream.url``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL


class ConfigError(Exception):
    """A setting is missing its expected type or value; the message names it."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:8530"
    # Seconds an idle keep-alive connection stays open. aiohttp's keep-alive
    # timer also runs until a request's headers are complete, so this is the
    # deadline for a (slow) client to send its headers, too.
    idle_timeout: float = 60.0
    # Seconds a client may take to send the body of an async request.
    body_timeout: float = 60.0
    # Largest body accepted for an async job (413 beyond it).
    max_body_size: int = 64 * 1024 * 1024
    # Largest total size of a request's header fields (431 beyond it).
    max_header_size: int = 64 * 1024
    # PEM certificate (chain) and private key: both set, the proxy serves TLS
    # only; both empty, plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    # Seconds a graceful stop (SIGTERM/SIGINT) may take: requests under way and
    # their writes finish within it; submissions still running after it stay
    # in the store and are resumed on the next start.
    shutdown_grace: float = 10.0

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:8529"
    connect_timeout: float = 5.0
    # Longest wait for the next bytes from ArangoDB (504 beyond it). Not a
    # limit on a streamed pass-through exchange, which may take longer; the
    # proxy's own whole-body calls (proxy.http1) must be complete within it.
    request_timeout: float = 300.0
    pool_size: int = 100
    # ArangoDB's JWT secret (the file given to --server.jwt-secret-keyfile). When
    # set, the proxy stores no client credentials at all: it signs a short-lived
    # token for a job's user whenever it talks to ArangoDB about that job.
    jwt_secret_file: str = ""
    # PEM bundle of the CAs that may sign an https:// upstream's certificate;
    # empty: the system's trust store. Verification is never turned off.
    ca_file: str = ""


@dataclass(frozen=True)
class StorageConfig:
    data: str = "./proxy-data"
    # FULL: a 202 means fsync'd. NORMAL: survives a process crash, may lose
    # the last commits on power loss.
    synchronous: str = "FULL"
    # Largest size of the job database in bytes (0: no limit). New jobs get
    # 503/21003 before it is reached; the store's own transitions keep a reserve.
    max_db_size: int = 0


@dataclass(frozen=True)
class JobsConfig:
    # Most jobs at ArangoDB at once; keep it well below ArangoDB's queue size.
    max_inflight: int = 64
    # Most unfinished jobs held by the proxy; beyond it 503/21003 "queue is full".
    capacity: int = 100_000
    # What to do with a job ArangoDB lost (restart): "rerun", "rerun-safe"
    # (re-run GET/HEAD/OPTIONS only, end the rest with an error) or "fail".
    lost_job_policy: str = "rerun"
    # Seconds a successful credential check with ArangoDB is remembered.
    auth_cache_ttl: float = 30.0
    # Seconds a finished result nobody fetched is kept after it finished; 0:
    # until fetched or deleted (ArangoDB's rule).
    result_ttl: float = 0.0
    # Most bytes of stored results (headers and bodies); beyond it the oldest
    # finished results are deleted. 0: no cap.
    max_result_bytes: int = 0
    # Where the dispatcher and harvester run: "process", a child process with
    # its own interpreter (they do not take turns with the requests for
    # Python's one lock), or "inline", in the proxy's own process.
    workers: str = "process"


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    log: LogConfig = field(default_factory=LogConfig)


LOG_LEVELS = ("debug", "info", "warning", "error")
SYNCHRONOUS = ("FULL", "NORMAL")
LOST_JOB_POLICIES = ("rerun", "rerun-safe", "fail")
WORKERS = ("process", "inline")
MIN_HEADER_SIZE = 1024  # bytes: server.max_header_size
# A job is one SQLite row, at most 10**9 bytes (storage.core.RESULT_MOST): its body,
# header fields and target must fit, with room to spare.
MAX_HEADER_SIZE = 16 * 1024 * 1024
# Most header fields a request may have (431 beyond; aiohttp allows 128 by default):
# with server.max_header_size as the most one field may hold, what a connection's
# parser holds before it refuses is bounded (256 x 64 KiB by default).
MAX_HEADER_FIELDS = 256
MAX_BODY_SIZE = 512 * 1024 * 1024
MIN_DB_SIZE = 256 * 1024  # bytes: storage.max_db_size, unless 0


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read `path` (if given), apply `overrides` ({"section.key": value}), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text: {exc.reason}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    config: Config = _build(Config, raw, "")
    _validate(config)
    return config


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        kind = hints[name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _check_type(f"{prefix}{name}", kind, value)
    return cls(**values)


def _check_type(name: str, kind: Any, value: Any) -> Any:
    if isinstance(kind, types.UnionType):  # pragma: no cover - no optional settings yet
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{name}: expected a number, got an integer too large") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _validate(config: Config) -> None:
    _split_listen(config.server.listen)
    url = config.upstream.url
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise ConfigError(f"upstream.url: {url!r} is not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"upstream.url: expected http://HOST:PORT or https://..., got {url!r}")
    if parsed.path not in ("", "/") or "?" in url or "#" in url:
        raise ConfigError(f"upstream.url: expected no path, query or fragment, got {url!r}")
    if config.upstream.ca_file and parsed.scheme != "https":
        # (half the proxy would speak TLS to ArangoDB and half send credentials in clear)
        raise ConfigError(
            f"upstream.ca_file: set, but upstream.url is {url!r}: use https://, or no ca_file"
        )
    if parsed.user is not None or parsed.password is not None:
        # (they would be sent for every client that sends none, and logged)
        raise ConfigError(
            "upstream.url: expected no user or password in it: clients send their own "
            "credentials (see upstream.jwt_secret_file)"
        )
    positive = {
        "server.idle_timeout": config.server.idle_timeout,
        "server.body_timeout": config.server.body_timeout,
        "server.max_body_size": config.server.max_body_size,
        "server.max_header_size": config.server.max_header_size,
        "server.shutdown_grace": config.server.shutdown_grace,
        "upstream.connect_timeout": config.upstream.connect_timeout,
        "upstream.request_timeout": config.upstream.request_timeout,
        "upstream.pool_size": config.upstream.pool_size,
        "jobs.max_inflight": config.jobs.max_inflight,
        "jobs.capacity": config.jobs.capacity,
        "jobs.auth_cache_ttl": config.jobs.auth_cache_ttl,
    }
    for name, value in positive.items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name}: expected a positive number, got {value}")
    zero_or_more = {
        "jobs.result_ttl": config.jobs.result_ttl,
        "jobs.max_result_bytes": config.jobs.max_result_bytes,
    }
    for name, value in zero_or_more.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}: expected 0 (off) or a positive number, got {value}")
    _one_of("log.level", config.log.level, LOG_LEVELS)
    _one_of("storage.synchronous", config.storage.synchronous, SYNCHRONOUS)
    _one_of("jobs.lost_job_policy", config.jobs.lost_job_policy, LOST_JOB_POLICIES)
    _one_of("jobs.workers", config.jobs.workers, WORKERS)
    server = config.server
    if bool(server.tls_cert) != bool(server.tls_key):
        have, missing = ("tls_cert", "tls_key") if server.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(
            f"server.{missing}: expected a PEM file path, since server.{have} is set"
            " (TLS needs both or neither)"
        )
    _check_sizes(config)
    if not config.storage.data:
        raise ConfigError("storage.data: expected a folder path, got an empty string")
    _check_paths(config)


def _check_sizes(config: Config) -> None:
    """Sizes that leave the proxy able to take anything, and a job within a row."""
    server = config.server
    if not MIN_HEADER_SIZE <= server.max_header_size <= MAX_HEADER_SIZE:
        # (a client's ordinary header fields, a JWT among them, take several hundred)
        raise ConfigError(
            f"server.max_header_size: expected {MIN_HEADER_SIZE} to {MAX_HEADER_SIZE} "
            f"bytes (16 MiB), got {server.max_header_size}"
        )
    if server.max_body_size > MAX_BODY_SIZE:
        raise ConfigError(
            f"server.max_body_size: expected at most {MAX_BODY_SIZE} bytes (512 MiB: a "
            f"job is one SQLite row, at most 10^9 bytes), got {server.max_body_size}"
        )
    if config.storage.max_db_size < 0 or 0 < config.storage.max_db_size < MIN_DB_SIZE:
        # (below it the schema and SQLite's reserve leave room for next to no job)
        raise ConfigError(
            f"storage.max_db_size: expected 0 (no limit) or a size of at least "
            f"{MIN_DB_SIZE} bytes (256 KiB), got {config.storage.max_db_size}"
        )


def _check_paths(config: Config) -> None:
    """No path setting may hold a NUL (the system calls refuse it, with a traceback)."""
    paths = {
        "storage.data": config.storage.data,
        "server.tls_cert": config.server.tls_cert,
        "server.tls_key": config.server.tls_key,
        "upstream.ca_file": config.upstream.ca_file,
        "upstream.jwt_secret_file": config.upstream.jwt_secret_file,
    }
    for name, path in paths.items():
        if "\0" in path:
            raise ConfigError(f"{name}: expected a path, got one with a NUL character")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        # ("::1" would be host ":", port 1)
        raise ConfigError(
            f"server.listen: expected HOST:PORT with an IPv6 address in brackets "
            f"([::1]:8530), got {listen!r}"
        )
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"server.listen: expected HOST:PORT, got {listen!r}")
    return host, int(port)
