"""kproxy proxy mode ``ipvs``: IPVS virtual servers, ``kube-ipvs0``, ipsets and a few iptables
rules, like upstream kube-proxy's IPVS mode."""

__version__ = "0.1.0"
