"""kproxy's iptables proxy mode (upstream kube-proxy's default mode, same chains and rules).

`kproxy_iptables.plugin` is the entry point and imports nothing native; the backend lives in
`kproxy_iptables.proxier` and is loaded only when ``--proxy-mode=iptables`` is chosen.
"""

from __future__ import annotations

__version__ = "0.1.0"
