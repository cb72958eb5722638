"""How fast can a kube-proxy-shaped rule set get into the kernel? (the floor for iptables mode)

Generates upstream-shaped rule sets (KUBE-SERVICES -> KUBE-SVC-x -> KUBE-SEP-y with statistic
+ DNAT, KUBE-MARK-MASQ, comments, a NodePort per service) for N services x E endpoints and
restores them in fresh network namespaces with each writer/backend, then measures variants
that isolate what makes iptables-nft slow. Prints a table; asserts nothing.

    python benchmarks/iptables_floor.py                 # 1000 5000 10000 services
    python benchmarks/iptables_floor.py --sizes 1000 2000 --endpoints 5 --budget 60
    python benchmarks/iptables_floor.py --isolate --sizes 5000 10000 20000

Variants (each in a fresh namespace):
  full          the realistic set, restored into an empty namespace
  resync        the same set restored again on top of itself (a full sync in steady state)
  partial       on top of the full set: top-level chains + 1 service rewritten (partial sync)
  nocomment     full without ``-m comment``
  nojump        same rule count, but rules in KUBE-SERVICES/KUBE-SVC end in RETURN instead of
                jumping to per-service chains (chains still declared)
  fewchains     the nojump rules packed into 64 chains (chain count effect)
  delete        -X of every service chain after flushing them (stale-chain cleanup)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

from kproxy_core.kernel.iptables_writers import Backend, WriterKind, make_writer
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import Sandbox
from kproxy_core.testing.signals import exit_on_signals

Text = str


def chain_hash(prefix: str, text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def generate(services: int, endpoints: int, *, comments: bool = True, jumps: bool = True,
             chains_limit: int = 0, declare_all: bool = True,
             only: range | None = None) -> Text:
    """Restore text for ``services`` x ``endpoints`` (nat + filter)."""
    nat_chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    nat_rules: list[str] = [
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
    ]
    svc_rules: list[str] = []
    top: list[str] = []
    nodeports: list[str] = []
    own_chains: list[str] = []

    def comment(text: str) -> str:
        return f'-m comment --comment "{text}" ' if comments else ""

    def chain_for(name: str) -> str:
        if chains_limit:
            bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % chains_limit
            return f"KUBE-BUCKET-{bucket}"
        return name

    for s in range(services):
        name = f"ns{s % 50}/svc{s}:p80"
        ip = f"172.{16 + s // 65536 % 16}.{s // 256 % 256}.{s % 256}"
        svc = chain_for(chain_hash("KUBE-SVC-", name + "udp"))
        ext = chain_for(chain_hash("KUBE-EXT-", name + "udp"))
        node_port = 30000 + s % 2768
        selected = only is None or s in only
        jump = (lambda c: c) if jumps else (lambda c: "RETURN")
        top.append(f"-A KUBE-SERVICES {comment(name + ' cluster IP')}-m udp -p udp -d {ip}/32 "
                   f"--dport 80 -j {jump(svc)}")
        nodeports.append(f"-A KUBE-NODEPORTS {comment(name)}-m udp -p udp --dport {node_port} "
                         f"-j {jump(ext)}")
        if not selected:
            continue
        own_chains += [svc, ext]
        svc_rules.append(f"-A {ext} {comment('masquerade traffic for ' + name)}-j KUBE-MARK-MASQ")
        svc_rules.append(f"-A {ext} -j {jump(svc)}")
        svc_rules.append(f"-A {svc} {comment(name + ' cluster IP')}-m udp -p udp -d {ip}/32 "
                         "--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ")
        for e in range(endpoints):
            n = s * endpoints + e
            ep = f"10.{128 + n // 65536 % 64}.{n // 256 % 256}.{n % 256}"
            sep = chain_for(chain_hash("KUBE-SEP-", name + "udp" + ep + ":80"))
            own_chains.append(sep)
            left = endpoints - e
            stat = (f"-m statistic --mode random --probability {1 / left:.10f} "
                    if left > 1 else "")
            svc_rules.append(f"-A {svc} {comment(name + ' -> ' + ep + ':80')}{stat}-j {jump(sep)}")
            svc_rules.append(f"-A {sep} {comment(name)}-s {ep}/32 -j KUBE-MARK-MASQ")
            svc_rules.append(f"-A {sep} {comment(name)}-m udp -p udp -j DNAT "
                             f"--to-destination {ep}:80")
    top.append(f"-A KUBE-SERVICES {comment('kubernetes service nodeports')}"
               "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    declared = list(dict.fromkeys(nat_chains + own_chains))
    filter_text = ["*filter", ":KUBE-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]",
                   ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                   ":KUBE-PROXY-FIREWALL - [0:0]",
                   "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
                   "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT",
                   "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                   "COMMIT"]
    nat_text = ["*nat", *(f":{c} - [0:0]" for c in declared), *nat_rules, *top, *nodeports,
                *svc_rules, "COMMIT"]
    del declare_all
    return "\n".join(filter_text + nat_text) + "\n"


def delete_text(services: int, endpoints: int) -> Text:
    """Flush and -X every per-service chain of `generate` (after emptying the top level)."""
    full = generate(services, endpoints)
    chains = [line[1:].split()[0] for line in full.splitlines()
              if line.startswith(":KUBE-SVC-") or line.startswith(":KUBE-SEP-")
              or line.startswith(":KUBE-EXT-")]
    return "\n".join(["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                      *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains),
                      "COMMIT", ""])


def restore_in_fresh_ns(kind: WriterKind, backend: Backend, texts: list[Text]) -> list[float]:
    """Restore ``texts`` one after the other in a new namespace; seconds for each."""
    def run() -> list[float]:
        writer = make_writer(kind, 4, backend)
        times = []
        for text in texts:
            start = time.perf_counter()
            writer.restore_text(text)  # type: ignore[attr-defined]
            times.append(time.perf_counter() - start)
        return times

    with Sandbox() as sandbox:
        return in_netns(sandbox.netns("bench").name, run, timeout=1800)


# Isolating shapes for the nf_tables growth question (``--isolate``): N chains with no rules,
# N chains with one rule each, N rules in one chain, one chain with N jumps to N chains.
ISOLATE: dict[str, Callable[[int], Text]] = {
    "chains_only": lambda n: "*nat\n" + "".join(f":KUBE-C{i} - [0:0]\n" for i in range(n))
    + "COMMIT\n",
    "chains_one_rule": lambda n: "*nat\n" + "".join(f":KUBE-C{i} - [0:0]\n" for i in range(n))
    + "".join(f"-A KUBE-C{i} -j RETURN\n" for i in range(n)) + "COMMIT\n",
    "rules_one_chain": lambda n: "*nat\n:KUBE-C - [0:0]\n" + "".join(
        f"-A KUBE-C -d 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}/32 -j RETURN\n"
        for i in range(n)) + "COMMIT\n",
    "jumps": lambda n: "*nat\n:KUBE-TOP - [0:0]\n" + "".join(
        f":KUBE-C{i} - [0:0]\n" for i in range(n)) + "".join(
        f"-A KUBE-TOP -d 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}/32 -j KUBE-C{i}\n"
        for i in range(n)) + "COMMIT\n",
}


def isolate(sizes: list[int], budget: float) -> None:
    """Wall, user and system CPU of one iptables-<backend>-restore per shape and size: shows
    whether time goes to the userspace tool or to the kernel."""
    print(f"{'shape':<16} {'backend':<7} {'N':>6} {'wall s':>8} {'user s':>8} {'sys s':>8}")
    for shape, gen in ISOLATE.items():
        for backend in ("legacy", "nft"):
            for size in sizes:
                text = gen(size)

                def run(backend: str = backend, text: str = text) -> tuple[float, float, float]:
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    start = time.perf_counter()
                    subprocess.run([f"iptables-{backend}-restore", "-w", "5", "--noflush"],
                                   input=text, text=True, check=True)
                    wall = time.perf_counter() - start
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    return (wall, after.ru_utime - before.ru_utime,
                            after.ru_stime - before.ru_stime)

                with Sandbox() as sandbox:
                    wall, user, system = in_netns(sandbox.netns("iso").name, run, timeout=1800)
                print(f"{shape:<16} {backend:<7} {size:>6} {wall:>8.3f} {user:>8.3f} "
                      f"{system:>8.3f}", flush=True)
                if wall > budget:
                    break


def main() -> None:
    exit_on_signals()  # SIGTERM/SIGINT unwind through the sandboxes' cleanup
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="skip larger sizes of a variant once one run took longer")
    parser.add_argument("--variants", nargs="+", default=[
        "full", "resync", "partial", "nocomment", "nojump", "fewchains", "delete"])
    parser.add_argument("--isolate", action="store_true",
                        help="measure the isolating shapes (chains vs rules vs jumps) instead")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (creates network namespaces)")
    if args.isolate:
        isolate(args.sizes, args.budget)
        return

    writers: list[tuple[WriterKind, Backend]] = [
        ("restore", "legacy"), ("restore", "nft"), ("libiptc", "legacy")]
    print(f"{'variant':<10} {'writer':<15} {'services':>8} {'lines':>8} {'seconds':>9} "
          f"{'us/line':>8}")
    for variant in args.variants:
        for kind, backend in writers:
            if kind == "libiptc" and variant not in ("full", "resync", "partial"):
                continue
            for size in args.sizes:
                e = args.endpoints
                texts: list[Text]
                measure: Callable[[list[float]], float] = lambda t: t[-1]  # noqa: E731
                if variant == "full":
                    texts = [generate(size, e)]
                elif variant == "resync":
                    texts = [generate(size, e)] * 2
                elif variant == "partial":
                    texts = [generate(size, e), generate(size, e, only=range(7, 8))]
                elif variant == "nocomment":
                    texts = [generate(size, e, comments=False)]
                elif variant == "nojump":
                    texts = [generate(size, e, jumps=False)]
                elif variant == "fewchains":
                    # compare with nojump: same rules, 64 chains instead of ~7 per service
                    texts = [generate(size, e, jumps=False, chains_limit=64)]
                elif variant == "delete":
                    texts = [generate(size, e), delete_text(size, e)]
                else:
                    sys.exit(f"unknown variant {variant}")
                lines = texts[-1].count("\n")
                took = measure(restore_in_fresh_ns(kind, backend, texts))
                print(f"{variant:<10} {kind + '-' + backend:<15} {size:>8} {lines:>8} "
                      f"{took:>9.3f} {took / lines * 1e6:>8.1f}", flush=True)
                if took > args.budget:
                    break


if __name__ == "__main__":
    main()
