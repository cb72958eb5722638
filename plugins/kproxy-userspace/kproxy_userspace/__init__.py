"""kproxy-userspace: kube-proxy's userspace mode as a kproxy plugin.

Every service port gets a listening socket on an ephemeral port; iptables ``nat`` rules send
service traffic there, and an asyncio relay connects each client to an endpoint chosen by a
registered load-balancing algorithm.
"""

from __future__ import annotations

__version__ = "0.1.0"
