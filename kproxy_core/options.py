"""Declarative options: one declaration gives a command-line flag, a config-file field,
a ``--write-config-to`` entry and a ``/configz`` entry.

The core declares its own options this way, and each mode declares its ``--<mode>-*`` options
through the ``kproxy_add_options`` hook, so a third-party mode's settings live in the same
``KubeProxyConfiguration`` file as upstream's ``iptables:`` and ``ipvs:`` sections.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from kproxy_core.backend import BackendUnavailable


class OptionError(ValueError):
    """A value that does not parse; the message names the problem, the caller adds the field.

    A mode that can only validate a setting when its backend is built raises `ModeConfigError`
    (an `OptionError`) from ``Backend.check_supported`` or ``__init__``.
    """


class ModeConfigError(OptionError, BackendUnavailable):
    """A mode rejects one of its settings in ``Backend.check_supported`` or ``__init__``, where
    the check needs more than the value (the plugin registries: ``--ipvs-scheduler`` naming an
    algorithm, ``--userspace-algorithm``...). The CLI reports it as a configuration error: one
    line, exit 2, before anything is started or applied. Name the flag or field in the message.

    It is also a `BackendUnavailable`, so code and tests that expected that keep working; a
    plain `BackendUnavailable` stays for a host that cannot run the mode (exit 1).
    """


# --------------------------------------------------------------------------------------------
# Go durations ("1m0s", "30s", "500ms"), as upstream's config file and flags spell them.
# --------------------------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: object) -> float:
    """Parse a Go duration string to seconds. Strings of plain digits are not accepted (Go
    rejects them too, except "0"), because a bare "30" is ambiguous between seconds and
    nanoseconds; Python numbers are taken as seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise OptionError(f"expected a duration like '30s' or '1m0s', got {value!r}")
    if not isinstance(value, str):
        # A number can only come from Python (embedding) or a typed YAML value in code, never
        # from a flag: it is seconds, unambiguous there.
        return float(value)
    text = value.strip()
    if text in ("0", "0.0"):
        return 0.0
    sign = 1.0
    if text[:1] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if not text:
        raise OptionError(f"expected a duration like '30s' or '1m0s', got {value!r}")
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise OptionError(f"expected a duration like '30s' or '1m0s', got {value!r}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Format seconds the way Go's ``time.Duration.String`` does ("1m0s", "500ms", "0s")."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    nanos = round(abs(seconds) * 1e9)
    if nanos < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if nanos >= size:
                text = f"{nanos / size:.9f}".rstrip("0").rstrip(".")
                return f"{sign}{text}{unit}"
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    secs = f"{rest / 1e9:.9f}".rstrip("0").rstrip(".")
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


# --------------------------------------------------------------------------------------------
# Value kinds: parse from a flag string or a YAML value; dump back for the config file.
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Kind:
    name: str
    parse: Callable[[Any], Any]
    dump: Callable[[Any], Any] = lambda value: value


def _parse_str(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise OptionError(f"expected a string, got {value!r}")
    return str(value)


def _parse_int(value: object) -> int:
    if isinstance(value, bool):
        raise OptionError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise OptionError(f"expected an integer, got {value!r}")


def _parse_optional_int(value: object) -> int | None:
    return None if value is None or value == "" else _parse_int(value)


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "t", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "f", "no"):
        return False
    raise OptionError(f"expected true or false, got {value!r}")


def _parse_str_list(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, Sequence):
        return tuple(_parse_str(item) for item in value)
    raise OptionError(f"expected a list of strings, got {value!r}")


def _parse_cidr_list(value: object) -> tuple[str, ...]:
    cidrs = _parse_str_list(value)
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise OptionError(f"{cidr!r} is not a CIDR") from None
    return cidrs


def _parse_map(value: object) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, str):
        # Flag form, as upstream's --feature-gates: "A=true,B=false".
        result: dict[str, Any] = {}
        for part in value.split(","):
            if not part.strip():
                continue
            name, sep, raw = part.partition("=")
            if not sep:
                raise OptionError(f"expected key=value pairs, got {part!r}")
            result[name.strip()] = raw.strip()
        return result
    raise OptionError(f"expected a mapping, got {value!r}")


STRING = Kind("string", _parse_str)
INTEGER = Kind("integer", _parse_int)
OPTIONAL_INTEGER = Kind("integer", _parse_optional_int)
BOOLEAN = Kind("boolean", _parse_bool)
DURATION = Kind("duration", parse_duration, format_duration)
STRING_LIST = Kind("string list", _parse_str_list, list)
CIDR_LIST = Kind("CIDR list", _parse_cidr_list, list)
MAPPING = Kind("mapping", _parse_map, dict)


@attrs.frozen
class Option:
    """One setting.

    ``path`` is the field in ``KubeProxyConfiguration`` (dotted, upstream's camelCase), e.g.
    ``"ipvs.scheduler"``; ``flag`` the command-line flag (``None`` for file-only settings).
    ``check`` validates a parsed value beyond its kind and raises `OptionError`.
    """

    path: str
    flag: str | None
    kind: Kind
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], None] | None = None
    #: Mode name for a mode's own options (shown grouped in ``--help``); None for core options.
    owner: str | None = None
    #: False for flag-only settings that upstream's config file does not have (``--master``,
    #: ``--cleanup``...): they are neither read from nor written to the file.
    in_file: bool = True

    def parse(self, raw: object) -> Any:
        value = self.kind.parse(raw)
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{value!r} is not one of {', '.join(map(repr, self.choices))}")
        if self.check is not None:
            self.check(value)
        return value


class OptionRegistry:
    """What ``kproxy_add_options`` receives: plugins add their `Option` declarations here."""

    def __init__(self) -> None:
        self._by_path: dict[str, Option] = {}
        self._by_flag: dict[str, Option] = {}

    def add(self, option: Option) -> None:
        if option.path in self._by_path:
            raise ValueError(f"config field {option.path!r} is declared twice")
        if option.flag is not None:
            if not option.flag.startswith("--"):
                raise ValueError(f"flag {option.flag!r} must start with '--'")
            if option.flag in self._by_flag:
                raise ValueError(f"flag {option.flag} is declared twice")
            self._by_flag[option.flag] = option
        self._by_path[option.path] = option

    def __iter__(self) -> Iterator[Option]:
        return iter(self._by_path.values())

    def __len__(self) -> int:
        return len(self._by_path)

    def get(self, path: str) -> Option | None:
        return self._by_path.get(path)

    def by_flag(self, flag: str) -> Option | None:
        return self._by_flag.get(flag)
