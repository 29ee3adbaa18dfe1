#!/usr/bin/env bash
# Prepares what scripts/vm/run.sh needs to boot a throw-away guest with a
# kernel that has ublk_drv and nbd (this host's kernel has neither):
#   - qemu-system-x86 and busybox-static on the host. qemu comes from
#     bookworm-backports so that it matches the preinstalled qemu-utils 10.0
#     (bookworm's qemu 7.2 would replace qemu-img/qemu-io with 7.2);
#   - the bookworm-backports 6.12 kernel, downloaded and unpacked into
#     $RVOL_VMLAB (not installed on the host), with modules.dep;
#   - an initramfs (busybox + the modules needed before the host root is
#     mounted over 9p).
# Idempotent; a second run does nothing. Needs root and network access to
# the Debian mirror.
#
#   scripts/vm/setup.sh            # RVOL_VMLAB defaults to ~/.cache/rvol-vmlab
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VMLAB=${RVOL_VMLAB:-$HOME/.cache/rvol-vmlab}
mkdir -p "$VMLAB"

# A private APT configuration: the system's mirror plus bookworm-backports,
# without touching /etc/apt.
A=$VMLAB/apt
if [ ! -f "$A/apt.conf" ]; then
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial"
  uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
  uri=${uri:-http://deb.debian.org/debian}
  sec=${uri%/debian}/debian-security
  {
    echo "deb $uri bookworm main"
    echo "deb $uri bookworm-updates main"
    echo "deb $sec bookworm-security main"
    echo "deb $uri bookworm-backports main"
  } >"$A/sources.list"
  cat >"$A/apt.conf" <<EOC
Dir::Etc::sourcelist "$A/sources.list";
Dir::Etc::sourceparts "/nonexistent";
Dir::State::Lists "$A/lists";
Dir::Cache "$A/cache";
Dir::Cache::archives "$A/cache/archives";
EOC
  APT_CONFIG=$A/apt.conf apt-get update -qq
fi
apt_bp() { APT_CONFIG=$A/apt.conf DEBIAN_FRONTEND=noninteractive apt-get "$@"; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
for p in xz-utils cpio kmod e2fsprogs nbd-client fio; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "vm setup: installing ${need[*]}"
  apt_bp install -y -qq --no-install-recommends -t bookworm-backports "${need[@]}" >/dev/null
fi

# The newest 6.12 kernel image in backports.
kpkg=$(cat "$VMLAB/kernel-package" 2>/dev/null || true)
if [ -z "$kpkg" ]; then
  kpkg=$(APT_CONFIG=$A/apt.conf apt-cache search --names-only '^linux-image-6\.12\.[0-9.]+\+deb12-amd64$' \
    | awk '{print $1}' | sort -V | tail -n 1)
  [ -n "$kpkg" ] || { echo "vm setup: no 6.12 kernel found in bookworm-backports" >&2; exit 1; }
fi
kver=${kpkg#linux-image-}
if [ ! -f "$VMLAB/kernel/boot/vmlinuz-$kver" ]; then
  echo "vm setup: fetching $kpkg"
  mkdir -p "$VMLAB/debs"
  (cd "$VMLAB/debs" && apt_bp download -qq "$kpkg")
  rm -rf "$VMLAB/kernel"
  dpkg-deb -x "$VMLAB"/debs/"${kpkg}"_*.deb "$VMLAB/kernel"
fi
grep -q '^CONFIG_BLK_DEV_UBLK=m' "$VMLAB/kernel/boot/config-$kver"
moddir=$VMLAB/kernel/lib/modules/$kver
[ -f "$moddir/modules.dep" ] || depmod -b "$VMLAB/kernel" "$kver"
echo "$kpkg" >"$VMLAB/kernel-package"

# The initramfs: busybox, our init, and the modules it loads before the host
# root is mounted. Rebuilt when init changes.
initrd=$VMLAB/initramfs.cpio.gz
if [ ! -f "$initrd" ] || [ "$here/guest-init" -nt "$initrd" ]; then
  t=$(mktemp -d)
  mkdir -p "$t/bin" "$t/mods" "$t/proc" "$t/sys" "$t/dev" "$t/newroot"
  cp /bin/busybox "$t/bin/busybox"
  for m in fs/netfs/netfs net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p fs/overlayfs/overlay \
    drivers/block/ublk_drv drivers/block/nbd; do
    xz -dc "$moddir/kernel/$m.ko.xz" >"$t/mods/$(basename "$m").ko"
  done
  cp "$here/guest-init" "$t/init"
  chmod +x "$t/init"
  (cd "$t" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd"
  rm -rf "$t"
fi
echo "vm setup: ready in $VMLAB (kernel $kver)"
