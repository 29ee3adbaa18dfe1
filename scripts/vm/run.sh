#!/usr/bin/env bash
# Runs one command inside a throw-away QEMU guest whose kernel has ublk_drv
# and nbd, and exits with its exit status (125: the guest never reported one).
#
#   scripts/vm/run.sh [--timeout S] [--mem SIZE] [--overlay DIR] [--disk FILE]
#                     [--kill-on REGEX] -- CMD [ARGS...]
#
# The guest sees this host's whole filesystem read-only over virtio-9p, so
# host binaries (a freshly built target/release/rvol) run unchanged inside;
# /tmp /etc /root /var /home /mnt and every --overlay DIR are writable
# throw-away overlays. The command runs as root in the current directory;
# its stdout and stderr stream back. RVOL_VM_ENV names extra environment
# variables to pass in. Needs scripts/vm/setup.sh to have run.
#
# --disk FILE attaches a raw image as the guest's /dev/vda (virtio-blk).
# --kill-on REGEX SIGKILLs QEMU as soon as a line of the guest's stdout
# matches: a power cut. Whatever the guest's kernel had not written to
# the disk is gone; what it had written is in FILE (QEMU hands writes to
# the host as they come, so only the guest's own memory is lost). Then the
# exit status is 0, or 125 if the line never came.
#
# The guest runs under software emulation (this host's KVM cannot boot these
# kernels): behaviour is real, speed is not comparable with the host.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VMLAB=${RVOL_VMLAB:-$HOME/.cache/rvol-vmlab}
timeout=1800 mem=3G overlays= disk=() kill_on=
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --disk) disk=(-drive "file=$(realpath -e "$2"),format=raw,if=virtio") || exit 2; shift 2 ;;
    --kill-on) kill_on=$2; shift 2 ;;
    --overlay) overlays=${overlays:+$overlays,}$(realpath -e "$2") || exit 2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [options] -- CMD [ARGS...]" >&2; exit 2; }
kpkg=$(cat "$VMLAB/kernel-package" 2>/dev/null) || { echo "rvol-vm: run scripts/vm/setup.sh first" >&2; exit 125; }
kver=${kpkg#linux-image-}

run=$(mktemp -d "${TMPDIR:-/tmp}/rvol-vm.XXXXXX")
trap 'rm -rf "$run"' EXIT
{
  echo "#!/bin/bash"
  for v in PATH HOME RUST_LOG RUST_BACKTRACE ${RVOL_VM_ENV:-}; do
    [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'cd %q || exit 126\n' "$PWD"
  printf '%q ' "$@"
  echo
} >"$run/cmd.sh"
: >"$run/rc"; : >"$run/out"; : >"$run/err"

# qboot starts faster than SeaBIOS where the package ships it.
bios=()
[ -f /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)
timeout -k 5 "$timeout" qemu-system-x86_64 \
  -nodefaults -no-user-config -machine pc,accel=tcg -cpu max -smp 2 -m "$mem" \
  -display none -vga none -no-reboot "${bios[@]}" "${disk[@]}" \
  -kernel "$VMLAB/kernel/boot/vmlinuz-$kver" -initrd "$VMLAB/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 rvol.stage2=$here/stage2.sh rvol.moddir=$VMLAB/kernel/lib/modules/$kver rvol.cmd=$run/cmd.sh rvol.overlay=$overlays" \
  -serial file:"$run/console.log" \
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -device virtio-serial-pci \
  -chardev file,id=out,path="$run/out" -device virtserialport,chardev=out,name=rvol.out \
  -chardev file,id=err,path="$run/err" -device virtserialport,chardev=err,name=rvol.err \
  -chardev file,id=rc,path="$run/rc" -device virtserialport,chardev=rc,name=rvol.rc \
  </dev/null &
qpid=$!
tail -q -c +1 -f --pid=$qpid "$run/out" &
t1=$!
tail -q -c +1 -f --pid=$qpid "$run/err" >&2 &
t2=$!
trap 'kill $qpid 2>/dev/null; rm -rf "$run"' INT TERM
if [ -n "$kill_on" ]; then
  # Not a pipeline: under pipefail, tail's SIGPIPE would fail it.
  (grep -q -m 1 -E "$kill_on" < <(tail -q -c +1 -f --pid=$qpid "$run/out") &&
    : >"$run/cut" && pkill -KILL -P $qpid qemu-system) &
fi
wait $qpid 2>/dev/null
qrc=$?
wait $t1 $t2
if [ -n "$kill_on" ]; then
  [ -e "$run/cut" ] && exit 0
  echo "rvol-vm: the guest never printed a line matching $kill_on" >&2
  exit 125
fi
rc=$(tr -dc 0-9 <"$run/rc")
if [ -z "$rc" ]; then
  echo "rvol-vm: the guest reported no exit status (qemu/timeout status $qrc); console:" >&2
  tail -n 30 "$run/console.log" >&2
  exit 125
fi
exit "$rc"
