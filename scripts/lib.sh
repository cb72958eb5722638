# Sourced by scripts/demo and scripts/test: idempotent setup of system packages and of the
# project's virtualenv under .venv/. Safe to run again and again: it installs only what is
# missing, and runs `apt-get update` at most once per run.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\033[1m+ %s\033[0m\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$0: run as root: kproxy creates network namespaces and programs netfilter inside them" >&2
        exit 1
    fi
}

_apt_updated=""
ensure_apt() {
    local pkg missing=()
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null; then
        echo "$0: missing packages ${missing[*]} and no apt-get to install them (Debian/Ubuntu expected)" >&2
        exit 1
    fi
    if [ -z "$_apt_updated" ]; then
        say "apt-get update"
        apt-get update -qq
        _apt_updated=1
    fi
    say "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# What every real-traffic run needs: netfilter tools, namespaces/veth (iproute2, which also
# brings `ss`), `sysctl` (procps) and modprobe (kmod).
ensure_system() {
    ensure_apt iptables ipset conntrack iproute2 kmod procps ca-certificates
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "python3 -m venv $VENV"
        if ! python3 -m venv "$VENV" 2>/dev/null; then
            # Debian ships ensurepip separately.
            rm -rf "$VENV"
            ensure_apt python3-venv
            python3 -m venv "$VENV"
        fi
    fi
}

# pip install "$@" into the venv unless the same request with the same pyproject files was
# already satisfied (editable installs keep code changes live, so only metadata matters).
venv_install() {
    local stamp_name="$1"; shift
    local stamp="$VENV/.kproxy-$stamp_name.stamp"
    local digest
    digest=$(cd "$ROOT" && { printf '%s\n' "$@"; cat pyproject.toml plugins/*/pyproject.toml 2>/dev/null; } | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
        return 0
    fi
    say "pip install $*"
    "$VENV/bin/python" -m pip install -q "$@"
    echo "$digest" >"$stamp"
}

# -e arguments for kproxy-core and every mode plugin present in the tree.
project_editables() {
    local dir
    printf '%s\n' -e "$ROOT"
    for dir in "$ROOT"/plugins/kproxy-*/; do
        [ -f "$dir/pyproject.toml" ] && printf '%s\n' -e "${dir%/}"
    done
    return 0
}
