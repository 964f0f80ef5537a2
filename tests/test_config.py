"""Config: TOML + flags into frozen dataclasses; one clear error per bad setting."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from proxy.cli import config_from_args, main, parse_args
from proxy.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_a_file() -> None:
    config = load_config()
    assert config == Config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8530


def test_example_file_lists_every_setting_with_its_default() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    defaults = Config()
    expected = {
        section.name: {
            f.name: getattr(getattr(defaults, section.name), f.name)
            for f in dataclasses.fields(getattr(defaults, section.name))
        }
        for section in dataclasses.fields(defaults)
    }
    assert example == expected
    assert load_config(ROOT / "config.example.toml") == defaults


def test_file_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nlisten = "0.0.0.0:9000"\nidle_timeout = 5\n'
        '[upstream]\nurl = "https://db.example:8529"\n'
        '[log]\nlevel = "debug"\n'
    )
    args = parse_args(["--config", str(path), "--listen", "[::1]:9100", "--data", "/srv/d"])
    config = config_from_args(args)
    assert config.server.listen == "[::1]:9100"
    assert (config.server.host, config.server.port) == ("::1", 9100)
    assert config.server.idle_timeout == 5.0  # int accepted where a float is expected
    assert isinstance(config.server.idle_timeout, float)
    assert config.upstream.url == "https://db.example:8529"
    assert config.storage.data == "/srv/d"
    assert config.log.level == "debug"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nlisten_on = 'x'\n", "unknown setting server.listen_on"),
        ("[nope]\nx = 1\n", "unknown setting nope"),
        ("server = 3\n", "server: expected a table"),
        ("[server]\nidle_timeout = 'soon'\n", "server.idle_timeout: expected float, got str"),
        ("[upstream]\npool_size = true\n", "upstream.pool_size: expected int, got bool"),
        ("[upstream]\npool_size = 0\n", "upstream.pool_size: expected a positive number"),
        ("[server]\nlisten = '127.0.0.1'\n", "server.listen: expected HOST:PORT"),
        ("[server]\nlisten = 'h:99999'\n", "server.listen: expected HOST:PORT"),
        ("[upstream]\nurl = 'ftp://x'\n", "upstream.url: expected http://HOST:PORT"),
        ("[upstream]\nurl = 'http://x:8529/db'\n", "upstream.url: expected no path"),
        ("[upstream]\nurl = 'http://[x'\n", "upstream.url: 'http://[x' is not a URL"),
        ("[log]\nlevel = 'loud'\n", "log.level: expected one of debug, info"),
        ("[storage]\nsynchronous = 'OFF'\n", "storage.synchronous: expected one of FULL, NORMAL"),
        ("[storage]\ndata = ''\n", "storage.data: expected a folder path"),
        ("[storage]\nmax_db_size = -1\n", "storage.max_db_size: expected 0 (no limit) or a size"),
        ("[storage]\nmax_db_size = 1\n", "storage.max_db_size: expected 0 (no limit) or a size"),
        ("[storage]\nmax_db_size = 262143\n", "of at least 262144 bytes (256 KiB), got 262143"),
        ("[server]\nmax_header_size = 1023\n", "server.max_header_size: expected 1024 to 16777216"),
        ("[server]\nmax_header_size = 16777217\n", "server.max_header_size: expected 1024 to"),
        (
            "[server]\nmax_body_size = 536870913\n",
            "server.max_body_size: expected at most 536870912",
        ),
        ("[server]\nshutdown_grace = 0\n", "server.shutdown_grace: expected a positive number"),
        ("[jobs]\nlost_job_policy = 'maybe'\n", "jobs.lost_job_policy: expected one of rerun"),
        ("[jobs]\nresult_ttl = -1\n", "jobs.result_ttl: expected 0 (off) or a positive"),
        ("[jobs]\nresult_ttl = nan\n", "jobs.result_ttl: expected 0 (off) or a positive"),
        ("[jobs]\nresult_ttl = inf\n", "jobs.result_ttl: expected 0 (off) or a positive"),
        ("[jobs]\nmax_result_bytes = -5\n", "jobs.max_result_bytes: expected 0 (off) or a"),
        ("[jobs]\nmax_result_bytes = 1.5\n", "jobs.max_result_bytes: expected int, got float"),
        ("[server\n", "is not valid TOML"),
        ("[server]\nidle_timeout = nan\n", "server.idle_timeout: expected a positive number"),
        ("[server]\nshutdown_grace = nan\n", "server.shutdown_grace: expected a positive"),
        ("[upstream]\nconnect_timeout = inf\n", "upstream.connect_timeout: expected a positive"),
        ("[server]\nlisten = 'h:\u00b2'\n", "server.listen: expected HOST:PORT"),
        ("[upstream]\nurl = 'http://x:8529?'\n", "upstream.url: expected no path, query"),
        ("[upstream]\nurl = 'http://x:8529#'\n", "upstream.url: expected no path, query"),
        ("[upstream]\nurl = 'http://root:@x:8529'\n", "upstream.url: expected no user"),
        ("[upstream]\nurl = 'http://u:secret@x'\n", "upstream.url: expected no user"),
        (b"[log]\nlevel = '\xff'\n", "is not UTF-8 text"),
        ("[upstream]\nca_file = 'ca.pem'\n", "upstream.ca_file: set, but upstream.url is"),
        ("[server]\nlisten = '::1'\n", "server.listen: expected HOST:PORT with an IPv6 address"),
        ("[server]\nlisten = '::1:8530'\n", "server.listen: expected HOST:PORT"),
        ("[server]\nidle_timeout = 1" + "0" * 400 + "\n", "server.idle_timeout: expected a"),
        ('[storage]\ndata = "a\\u0000b"\n', "storage.data: expected a path, got one with a NUL"),
        ('[server]\ntls_cert = "c"\ntls_key = "k\\u0000"\n', "server.tls_key: expected a path"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path: Path, toml: str | bytes, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(toml if isinstance(toml, bytes) else toml.encode())
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert message in str(info.value)


def test_retention_is_off_by_default_and_takes_zero_or_more(tmp_path: Path) -> None:
    assert (Config().jobs.result_ttl, Config().jobs.max_result_bytes) == (0, 0)
    path = tmp_path / "c.toml"
    path.write_text("[jobs]\nresult_ttl = 90\nmax_result_bytes = 1048576\n")
    jobs = load_config(path).jobs
    assert (jobs.result_ttl, jobs.max_result_bytes) == (90.0, 1048576)
    path.write_text("[jobs]\nresult_ttl = 0\nmax_result_bytes = 0\n")
    assert load_config(path) == Config()


def test_the_least_and_largest_sizes_allowed_are_taken(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nmax_header_size = 1024\n[storage]\nmax_db_size = 262144\n")
    config = load_config(path)
    assert (config.server.max_header_size, config.storage.max_db_size) == (1024, 262144)
    path.write_text("[server]\nmax_header_size = 16777216\nmax_body_size = 536870912\n")
    config = load_config(path)
    assert (config.server.max_header_size, config.server.max_body_size) == (2**24, 2**29)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.listen = "x"  # type: ignore[misc]


def test_cli_config_error_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--upstream", "nonsense", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("arango-async-proxy: config error: upstream.url:")
