"""kproxy proxy mode ``nftables`` (see ``docs/modes/nftables.md``)."""
