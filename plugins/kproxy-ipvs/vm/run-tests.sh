#!/usr/bin/env bash
# Runs the whole kproxy-ipvs test suite, including the real-kernel tests (tests/kernel), inside
# a virtme-ng VM booted with Debian's kernel (which has ip_vs). Prerequisites: vm/setup.sh.
# Extra arguments go to pytest. Exit code: pytest's.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../../.."
exec python3 -m kproxy_core.testing.vm --modules ip_vs,ip_vs_rr,ip_set --timeout 900 -- \
  python3 -m pytest -p no:cacheprovider -q plugins/kproxy-ipvs/tests "$@"
