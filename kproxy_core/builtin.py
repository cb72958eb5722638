"""The core's own plugin: it registers the core options, the built-in sources and the built-in
load-balancing algorithms through the same hooks a third-party plugin uses."""

from __future__ import annotations

from kproxy_core import hookimpl
from kproxy_core.backend import AlgorithmSpec, Source, SourceSpec
from kproxy_core.options import OptionRegistry
from kproxy_core.plugins import Registry


@hookimpl
def kproxy_add_options(options: OptionRegistry) -> None:
    from kproxy_core.config import CORE_OPTIONS

    for option in CORE_OPTIONS:
        options.add(option)


def _kube_source() -> type[Source]:
    from kproxy_core.sources.kube import KubeSource

    return KubeSource


def _manifest_source() -> type[Source]:
    from kproxy_core.sources.manifests import ManifestSource

    return ManifestSource


@hookimpl
def kproxy_register_sources(register: Registry[SourceSpec]) -> None:
    register.add(SourceSpec("kube", _kube_source, "list+watch the Kubernetes API"))
    register.add(
        SourceSpec("manifests", _manifest_source, "YAML files (--manifests DIR), re-read on change")
    )


@hookimpl
def kproxy_register_algorithms(register: Registry[AlgorithmSpec]) -> None:
    from kproxy_core.algorithms import BUILTIN_ALGORITHMS

    for spec in BUILTIN_ALGORITHMS:
        register.add(spec)
