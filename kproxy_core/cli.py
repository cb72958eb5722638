"""The ``kproxy`` command.

``kproxy [upstream kube-proxy flags]`` runs the proxy; subcommands:

* ``kproxy plugins [--json]``: installed distributions, modes, algorithms, sources and hooks;
* ``kproxy explain NS/NAME[:PORT] [--from IP]`` / ``--all``: ask the running proxy what a
  Service means on this node and what it programmed (see `kproxy_core.explain`);
* ``kproxy demo``: the quick-start demo in a sandbox of network namespaces.

Every usage or configuration error is one line on stderr and exit status 2, as upstream;
that includes a mode's own validation: a backend that rejects a setting raises
`kproxy_core.options.ModeConfigError` (any `OptionError`) from ``check_supported`` or
``__init__``, before anything is applied. A host that cannot run the mode (a plain
`BackendUnavailable`) or a failed start is exit 1.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from kproxy_core import __version__
from kproxy_core.plugins import DuplicateRegistration, KproxyPluginManager

log = logging.getLogger("kproxy")

EXIT_USAGE = 2


def _fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    print(f"kproxy: {message}", file=sys.stderr)
    raise SystemExit(status)


def _plugin_manager() -> KproxyPluginManager:
    try:
        return KproxyPluginManager()
    except Exception as exc:  # a broken third-party plugin must not hide which one it is
        _fail(f"loading plugins failed: {exc}", 1)


def cmd_plugins(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kproxy plugins",
                                     description="List installed kproxy plugins.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(list(argv))
    pm = _plugin_manager()
    try:
        modes, algorithms, sources = pm.modes(), pm.algorithms(), pm.sources()
    except DuplicateRegistration as exc:
        _fail(str(exc), 1)
    data: dict[str, Any] = {
        "plugins": pm.plugin_summaries(),
        "modes": [{"name": m.name, "distribution": m.distribution, "help": m.help} for m in modes],
        "algorithms": [
            {"name": a.name, "distribution": a.distribution, "ipvs_scheduler": a.ipvs_scheduler,
             "help": a.help}
            for a in algorithms
        ],
        "sources": [{"name": s.name, "distribution": s.distribution, "help": s.help}
                    for s in sources],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("plugins:")
    for row in data["plugins"]:
        version = f" {row['version']}" if row["version"] else ""
        print(f"  {row['name']} ({row['distribution']}{version})")
        print(f"    hooks: {', '.join(row['hooks']) or '-'}")
    print("modes:")
    for mode in data["modes"]:
        print(f"  {mode['name']:<12} {mode['distribution']:<20} {mode['help']}")
    print("algorithms:")
    for algo in data["algorithms"]:
        sched = f" [ipvs: {algo['ipvs_scheduler']}]" if algo["ipvs_scheduler"] else ""
        print(f"  {algo['name']:<18} {algo['distribution']:<20} {algo['help']}{sched}")
    print("sources:")
    for source in data["sources"]:
        print(f"  {source['name']:<12} {source['distribution']:<20} {source['help']}")
    return 0


def cmd_explain(argv: Sequence[str]) -> int:
    import argparse

    from kproxy_core import explain

    parser = argparse.ArgumentParser(
        prog="kproxy explain",
        description="Explain what a Service means on this node and what the running kproxy "
                    "programmed for it (read-only, from the live process and kernel state).",
    )
    parser.add_argument("service", nargs="?", help="NAMESPACE/SERVICE[:PORT]")
    parser.add_argument("--all", action="store_true",
                        help="summarise problems: services without endpoints, drift")
    parser.add_argument("--from", dest="from_ip", metavar="IP",
                        help="trace a hypothetical packet from this source address")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--metrics-address", default="127.0.0.1:10249",
                        help="kproxy's --metrics-bind-address (default %(default)s)")

    def one_line_error(message: str) -> NoReturn:
        _fail(f"{message} (see kproxy explain --help)")

    parser.error = one_line_error  # type: ignore[method-assign]
    args = parser.parse_args(list(argv))
    if not args.all and not args.service:
        _fail("name a service (NAMESPACE/SERVICE[:PORT]) or use --all")
    try:
        if args.service:
            explain.parse_target(args.service)
        report = explain.fetch(args.metrics_address, None if args.all else args.service,
                               args.from_ip)
    except explain.ExplainError as exc:
        _fail(str(exc), 1)
    print(json.dumps(report, indent=2) if args.json else explain.render_text(report))
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    from kproxy_core import demo

    return demo.main(list(argv))


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "plugins": cmd_plugins,
    "explain": cmd_explain,
    "demo": cmd_demo,
}


def run_proxy(argv: Sequence[str]) -> int:
    from kproxy_core.agent import ModeNotFound, Proxy, resolve_mode
    from kproxy_core.backend import BackendUnavailable
    from kproxy_core.config import ConfigError, build_parser, load_config, write_config
    from kproxy_core.logs import setup_logging
    from kproxy_core.options import OptionError
    from kproxy_core.servers import ServerError

    pm = _plugin_manager()
    try:
        options = pm.options()
        modes = pm.modes().names()
    except (DuplicateRegistration, ValueError) as exc:
        _fail(str(exc), 1)
    parser = build_parser(options, modes)

    def one_line_error(message: str) -> NoReturn:
        _fail(f"{message} (see kproxy --help)")

    parser.error = one_line_error  # type: ignore[method-assign]
    args = parser.parse_args(list(argv))
    if getattr(args, "version", False):
        print(f"kproxy {__version__}")
        return 0
    try:
        config = load_config(args, options)
    except ConfigError as exc:
        _fail(str(exc))
    setup_logging(int(config.get("v") or 0), str(config.get("logFormat") or "text"))

    def log_warnings() -> None:
        for warning in getattr(config, "warnings", ()):
            log.warning("configuration: %s", warning)

    write_to = config.get("writeConfigTo")
    if write_to or config.get("cleanup"):
        log_warnings()
    if write_to:
        write_config(config, str(write_to))
        print(f"kproxy: wrote configuration to {write_to}")
        return 0
    if config.get("cleanup"):
        lines = pm.cleanup(config, None, log)
        for line in lines:
            print(line)
        errors = [line for line in lines if line.startswith("error:")]
        print(f"kproxy: cleanup removed {len(lines) - len(errors)} objects"
              + (f", {len(errors)} errors" if errors else ""))
        return 1 if errors else 0
    try:
        resolve_mode(config, pm)
    except ModeNotFound as exc:
        _fail(str(exc))

    mode = config.get("mode") or "iptables"
    try:
        # Builds the backend, which validates what only the mode can (its registries, e.g.
        # ipvs schedulers): before anything is started or applied.
        proxy = Proxy(config, plugins=pm)
    except ConfigError as exc:
        _fail(str(exc))
    except OptionError as exc:
        _fail(f"invalid configuration for proxy mode {mode}: {exc}")
    except BackendUnavailable as exc:
        _fail(f"cannot run proxy mode {mode}: {exc}", 1)
    # After the backend accepted the configuration: a rejected one stays a single line.
    log_warnings()
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping (programmed rules stay)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        proxy.start()
    except (BackendUnavailable, ServerError, OSError) as exc:
        _fail(f"start-up failed: {exc}", 1)
    except Exception as exc:
        # E.g. no kubeconfig and not in a cluster: one line for the operator; the traceback
        # only at debug verbosity.
        log.debug("start-up failed", exc_info=True)
        _fail(f"start-up failed: {exc}", 1)
    if config.get("initOnly"):
        proxy.stop()
        return 0
    stop.wait()
    proxy.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:])
    return run_proxy(args)


if __name__ == "__main__":
    sys.exit(main())
