from __future__ import annotations

from pathlib import Path

from kproxy_core import capabilities


def _status(tmp_path: Path, cap_eff: str) -> str:
    path = tmp_path / "status"
    path.write_text(f"Name:\tkproxy\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    return str(path)


def test_root_has_everything(tmp_path: Path) -> None:
    assert capabilities.check("iptables", ["CAP_NET_ADMIN", "CAP_NET_RAW"],
                              _status(tmp_path, "000001ffffffffff")) is None


def test_missing_net_admin_is_one_line_naming_it(tmp_path: Path) -> None:
    only_net_raw = f"{1 << 13:016x}"
    message = capabilities.check("iptables", ["CAP_NET_ADMIN", "CAP_NET_RAW"],
                                 _status(tmp_path, only_net_raw))
    assert message is not None and "\n" not in message
    assert "needs CAP_NET_ADMIN:" in message and "capabilities.add: [NET_ADMIN]" in message


def test_unreadable_status_does_not_refuse(tmp_path: Path) -> None:
    assert capabilities.check("iptables", ["CAP_NET_ADMIN"], str(tmp_path / "absent")) is None
