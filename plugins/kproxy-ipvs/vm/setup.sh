#!/usr/bin/env bash
# Installs what the IPVS VM test env needs on a Debian host (the host kernel may lack ip_vs):
# Debian's generic kernel (its modules have ip_vs), QEMU, and virtme-ng, which boots that
# kernel over the host's root filesystem. Idempotent; run as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need_apt=()
ls /boot/vmlinuz-* >/dev/null 2>&1 || need_apt+=(linux-image-amd64)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
for tool in ipvsadm ipset iptables conntrack busybox; do
  command -v "$tool" >/dev/null || need_apt+=("$tool")
done
# virtme-ng wants these to set up the guest.
command -v udevadm >/dev/null || need_apt+=(udev)
command -v kmod >/dev/null || need_apt+=(kmod)
if ((${#need_apt[@]})); then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
command -v vng >/dev/null || python3 -m pip install -q virtme-ng
vng --version
ls /boot/vmlinuz-*
