#!/usr/bin/env bash
# Runs INSIDE the virtme-ng VM (one boot for everything IPVS needs a real kernel for):
#   1. kproxy-ipvs's own suite, including its real-kernel tests (tests/kernel);
#   2. the shared end-to-end suite (tests/e2e) and the reliability suite (tests/reliability)
#      for the ipvs mode only (-k ipvs): kproxy as a separate process against the fake API
#      server, real traffic in network namespaces.
# Every step runs even when one before it fails; the exit status is non-zero if any failed,
# or if a step ran no test at all (pytest's 5), so a broken VM never passes as green.
# Extra arguments go to every pytest run (e.g. -x, -v).
# Called by the ipvs-vm tox env (CI):
#   python -m kproxy_core.testing.vm --modules ip_vs,ip_vs_rr,ip_set -- bash plugins/kproxy-ipvs/vm/guest-suites.sh
set -u
cd "$(dirname "$0")/../../.."
if [ "${KPROXY_IN_VM:-}" != "1" ]; then
    echo "guest-suites.sh: run it in the VM (python -m kproxy_core.testing.vm ...)" >&2
    exit 2
fi
failed=()
step() {
    local name="$1"; shift
    local start=$SECONDS status=0
    echo "=== ${name}: $*"
    "$@" || status=$?
    echo "=== ${name}: exit ${status} after $((SECONDS - start))s"
    ((status == 0)) || failed+=("${name} (exit ${status})")
}
step "ipvs plugin suite" python -m pytest -p no:cacheprovider -q plugins/kproxy-ipvs/tests "$@"
step "e2e + reliability, ipvs" python -m pytest -p no:cacheprovider -q -rfEs --durations=15 \
    tests/e2e tests/reliability -k ipvs "$@"
if ((${#failed[@]})); then
    echo "guest-suites.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "guest-suites.sh: all passed"
