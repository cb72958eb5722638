"""Bad input: invalid flags and config files, and API strings that must never reach a shell.

Every kproxy process here runs inside a network namespace this test creates: a kproxy that
wrongly accepted its arguments would otherwise program the host.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_harness import answered
from reliability_harness import FaultCluster

from kproxy_core.demo import endpoint_slice_obj, kproxy_command, service_obj, svc_port
from kproxy_core.testing.netns import NetNS, Sandbox

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent.parent

_CONFIG_HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"

#: (flags, text the one error line must contain)
BAD_FLAGS = [
    (["--iptables-sync-period=abc"], "--iptables-sync-period"),
    (["--iptables-sync-period=-5s"], "--iptables-sync-period"),
    (["--iptables-min-sync-period=1parsec"], "--iptables-min-sync-period"),
    (["--metrics-bind-address=999.1.1.1:10249"], "--metrics-bind-address"),
    (["--healthz-bind-address=0.0.0.0:99999"], "--healthz-bind-address"),
    (["--cluster-cidr=10.0.0.0/33"], "--cluster-cidr"),
    (["--nodeport-addresses=garbage"], "--nodeport-addresses"),
    (["--iptables-masquerade-bit=40"], "--iptables-masquerade-bit"),
    (["--v=abc"], "--v"),
    (["--conntrack-max-per-core=-1"], "--conntrack-max-per-core"),
    (["--config=/nonexistent/kproxy.yaml"], "--config"),
    (["--bind-address=notanip"], "--bind-address"),
    (["--oom-score-adj=2000"], "--oom-score-adj"),
    (["--detect-local-mode=Bogus"], "--detect-local-mode"),
    (["--conntrack-tcp-timeout-established=xyz"], "--conntrack-tcp-timeout-established"),
    (["--iptables-localhost-nodeports=maybe"], "--iptables-localhost-nodeports"),
    (["--proxy-mode=nonexistent"], "nonexistent"),
    (["--unknown-flag"], "--unknown-flag"),
    (["--iptables-sync-period"], "--iptables-sync-period"),
    # Checked by the mode itself (it needs the algorithm registry): still a config error.
    (["--proxy-mode=userspace", "--userspace-algorithm=bogus"], "--userspace-algorithm"),
    (["--proxy-mode=ipvs", "--ipvs-scheduler=bogus"], "--ipvs-scheduler"),
]

#: (config file body, text the one error line must contain)
BAD_CONFIGS = [
    (_CONFIG_HEAD + "bogusField: 1\n", "bogusField"),
    (_CONFIG_HEAD + "clusterCIDR: 10.0.0.0/99\n", "clusterCIDR"),
    (_CONFIG_HEAD + "iptables: {syncPeriod: 'soon'}\n", "syncPeriod"),
    (_CONFIG_HEAD + "iptables: {masqueradeBit: 99}\n", "masqueradeBit"),
    (_CONFIG_HEAD + "mode: warp\n", "warp"),
    (_CONFIG_HEAD + "nodePortAddresses: 'not-a-list'\n", "nodePortAddresses"),
    ("apiVersion: v9\nkind: Nope\n", "apiVersion"),
    ("{{{ not yaml", "YAML"),
    ("- a list\n", "mapping"),
]


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNS]:
    with Sandbox() as sb:
        yield sb.netns("badinput")


def _kernel_state(ns: NetNS) -> str:
    rules = "\n".join(ns.run([tool], check=False).stdout
                      for tool in ("iptables-legacy-save", "iptables-nft-save"))
    kube = [line for line in rules.splitlines() if "KUBE-" in line]
    localnet = ns.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip()
    return f"{kube} route_localnet={localnet}"


def _run_kproxy(ns: NetNS, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run([*kproxy_command(), "--kubeconfig=/nonexistent/kubeconfig",
                   "--hostname-override=node", *args], check=False)


def _assert_one_clear_line(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1, lines
    assert lines[0].startswith("kproxy: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "", proc.stdout


@pytest.mark.parametrize(("flags", "needle"), BAD_FLAGS,
                         ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_invalid_flag_is_one_line_exit_2_and_nothing_applied(
        ns: NetNS, flags: list[str], needle: str) -> None:
    before = _kernel_state(ns)
    proc = _run_kproxy(ns, *flags)
    _assert_one_clear_line(proc, needle)
    assert _kernel_state(ns) == before


@pytest.mark.parametrize(("body", "needle"), BAD_CONFIGS,
                         ids=[n for _, n in BAD_CONFIGS])
def test_invalid_config_file_is_one_line_exit_2_and_nothing_applied(
        ns: NetNS, tmp_path: Path, body: str, needle: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(body)
    before = _kernel_state(ns)
    proc = _run_kproxy(ns, f"--config={config}")
    _assert_one_clear_line(proc, needle)
    assert _kernel_state(ns) == before


# ------------------------------------------------------------------------------------------------
# No shell
# ------------------------------------------------------------------------------------------------

_SHELL = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput|"
                    r"subprocess\.getoutput\(|subprocess\.getstatusoutput\(")


def test_no_code_path_uses_a_shell() -> None:
    sources = [*REPO.glob("kproxy_core/**/*.py"), *REPO.glob("plugins/*/kproxy_*/**/*.py")]
    assert len(sources) > 20
    hits = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for path in sources
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if _SHELL.search(line)
            # The test sandbox's NetNS.sh runs test-authored commands, never API strings.
            and not str(path).endswith("kproxy_core/testing/netns.py")]
    assert not hits, hits


#: A name no API server would accept, but kproxy must still never hand to a shell.
EVIL = "evil$(touch${IFS}PWNED)`touch${IFS}PWNED`;'\"|&\\x"


def test_service_named_with_shell_metacharacters(tmp_path: Path) -> None:
    c = FaultCluster("iptables", tmp_path)
    try:
        marker = tmp_path / "PWNED"
        name = EVIL.replace("PWNED", str(marker))
        ip = "10.96.15.1"
        c.start_kproxy()
        c.apply(service_obj(name, ip, [svc_port(80, name="p'\"$(x)")]),
                endpoint_slice_obj(name, c.eps("pod-1-2"), ports=(("p'\"$(x)", 8080, "TCP"),)))
        c.wait_answered_by(c.pod("pod-1-3"), ip, 80, {"pod-1-2"})
        saved = c.sb.node.run(["iptables-nft-save", "-t", "nat"]).stdout
        comments = re.findall(r'--comment ("(?:[^"\\]|\\.)*"|\S+)', saved)
        ours = [cm for cm in comments if "evil" in cm]
        assert ours, saved
        # iptables-save prints a comment quoted, with " and \ escaped: the whole name, intact.
        expected = f'default/{name}:p\'"$(x)'
        unquoted = [re.sub(r'\\(.)', r"\1", cm[1:-1]) for cm in ours if cm.startswith('"')]
        assert any(u.startswith(expected) for u in unquoted), (ours, expected)
        assert not marker.exists()
        assert not (Path.cwd() / "PWNED").exists()
        assert c.kproxy is not None and c.kproxy.alive()
        assert answered(c.send(c.pod("pod-1-3"), ip, 80)[0])
        assert c.kproxy.stop(signal.SIGTERM) == 0
    finally:
        c.close()
