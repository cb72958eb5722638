"""A template kproxy mode. Copy this directory to start a new mode (docs/writing-a-plugin.md)."""
