"""The `arango-async-proxy` command: read the config, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from proxy.app import create_app
from proxy.config import Config, ConfigError, load_config
from proxy.listener import Listener, ListenError
from proxy.tls import server_context
from storage import StoreError

log = logging.getLogger("arango_async_proxy")

GC_THRESHOLD = (10_000, 10, 10)  # gc.set_threshold: see tune_gc
EXIT_QUIT = 1  # a second SIGTERM/SIGINT cut the stop short (_Stop)
QUIT_AFTER = 1.0  # seconds after the first signal before another one counts (_Stop)

_FLAGS = {
    "listen": "server.listen",
    "upstream": "upstream.url",
    "data": "storage.data",
    "log_level": "log.level",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="arango-async-proxy",
        description="Durable front door for ArangoDB's asynchronous jobs.",
    )
    parser.add_argument("--config", type=Path, help="TOML file with the settings")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
    parser.add_argument(
        "--upstream", metavar="URL", help="ArangoDB URL, e.g. http://127.0.0.1:8529"
    )
    parser.add_argument("--data", metavar="DIR", help="folder that holds the job database")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        setting: getattr(args, flag)
        for flag, setting in _FLAGS.items()
        if getattr(args, flag) is not None
    }
    return load_config(args.config, overrides)


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then shut down in order.

    TLS files are read first: a `ConfigError` from them stops the command
    before the store is opened or the port taken.
    """
    ssl_context = server_context(config.server)
    listener = Listener(create_app(config), ssl_context)
    # Before the start: a stop asked for while it is under way (the store opening,
    # the worker process starting) is one in order once it is done, not a kill.
    stop = _Stop()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.signalled, signum)
    await listener.start()
    try:
        scheme = "http" if ssl_context is None else "https"
        shown = ", ".join(
            f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
            for host, port in listener.addresses
        )
        _listening.info("listening on %s, upstream %s", shown, config.upstream.url)
        await stop.wait()
        log.info("stopping")
    finally:
        await listener.stop()


# The one line that says where the proxy listens, whatever log.level hides (records
# of a logger with a level of its own reach the root's handlers all the same).
_listening = logging.getLogger(f"{log.name}.listening")
_listening.setLevel(logging.INFO)


class _Stop(asyncio.Event):
    """Set by the first SIGTERM/SIGINT: `serve` stops in order. One more, QUIT_AFTER
    seconds or later after it, exits at once, as a kill would: every job answered
    202 is on disk and resumes at the next start, requests not yet answered get no
    answer (the worker process exits when the proxy is gone). Sooner, it is the same
    stop asked for twice: GNU timeout, for one, signals the process and then its
    process group, and Ctrl-C reaches every process of the terminal's group."""

    def __init__(self) -> None:
        super().__init__()
        self._first = 0.0

    def signalled(self, signum: int) -> None:
        now = time.monotonic()
        if not self.is_set():
            self._first = now
            self.set()
            return
        if now - self._first < QUIT_AFTER:
            return
        log.warning(
            "%s during the stop: exiting at once; jobs resume at the next start",
            signal.Signals(signum).name,
        )
        logging.shutdown()  # (flushes the log's handlers)
        os._exit(EXIT_QUIT)


def configure_logging(level: str) -> None:
    """The proxy's log lines (the worker process logs the same way)."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return _config_error(exc)
    configure_logging(config.log.level)
    try:
        run(serve(config))
    except ConfigError as exc:  # a TLS or JWT secret file that cannot be read or used
        return _config_error(exc)
    except StoreError as exc:
        # the data folder is not private or in use, or the database is foreign or
        # damaged: never reset, the operator decides
        log.error("cannot open the job store: %s", exc)  # noqa: TRY400
        return 1
    except ListenError as exc:
        # one line, no traceback: the cause (port in use, ...) is all an operator needs
        log.error("cannot serve on %s: %s", config.server.listen, exc.strerror or exc)  # noqa: TRY400
        return 1
    except OSError as exc:  # (the worker process could not be started, ...)
        log.error("cannot start: %s", exc)  # noqa: TRY400
        return 1
    return 0


def _config_error(exc: ConfigError) -> int:
    print(f"arango-async-proxy: config error: {exc}", file=sys.stderr)
    return 1


def run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (the `speed` extra), the collector tuned."""
    tune_gc()
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is in the test extra
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


def tune_gc() -> None:
    """Python's cycle collector, set for a long-running server: what exists by now
    (modules, classes: most of the heap, alive until exit) is frozen out of its
    sight, and it runs after GC_THRESHOLD[0] new objects instead of 700. Measured
    under bench/accept.py, the proxy's loop spent 0.44 s in collections in 7 s
    (ten full ones of 20 ms, each scanning every imported module); 0.04 s so."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
