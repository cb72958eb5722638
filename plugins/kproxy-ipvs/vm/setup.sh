#!/usr/bin/env bash
# Installs what the IPVS VM test env needs on a Debian host (the host kernel may lack ip_vs):
# Debian's generic kernel (its modules have ip_vs), QEMU, a static busybox (virtme-ng's
# initramfs has no libc), and virtme-ng, which boots that kernel over the host's root
# filesystem. Idempotent; run as root. Exit status 0 only if the VM can then be booted.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# A kernel in /boot whose module tree has IPVS (a cloud kernel next to it may not).
has_ipvs_kernel() {
  local image release
  for image in /boot/vmlinuz-*; do
    [ -e "$image" ] || continue
    release="${image#/boot/vmlinuz-}"
    grep -qE '(^|/)ip_vs\.ko' "/lib/modules/$release/modules.dep" 2>/dev/null && return 0
    grep -qE '(^|/)ip_vs\.ko' "/lib/modules/$release/modules.builtin" 2>/dev/null && return 0
  done
  return 1
}

need_apt=()
has_ipvs_kernel || need_apt+=(linux-image-amd64)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
for tool in ipvsadm ipset iptables conntrack; do
  command -v "$tool" >/dev/null || need_apt+=("$tool")
done
if ! { command -v busybox >/dev/null && ! ldd "$(command -v busybox)" >/dev/null 2>&1; }; then
  need_apt+=(busybox-static)
fi
# virtme-ng wants these to set up the guest.
command -v udevadm >/dev/null || need_apt+=(udev)
command -v kmod >/dev/null || need_apt+=(kmod)
if ((${#need_apt[@]})); then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
# scripts/test puts virtme-ng in its venv (and the tox env lists it); this is for a bare host.
command -v vng >/dev/null || python3 -m pip install -q virtme-ng
vng --version
has_ipvs_kernel || { echo "setup.sh: still no kernel with ip_vs in /boot" >&2; exit 1; }
ls /boot/vmlinuz-*
