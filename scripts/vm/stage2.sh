#!/bin/sh
# PID 1 on the host root inside the guest: runs the command file, sends its
# output and exit status back over virtio-serial ports, powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
bash "$RVOL_VM_CMD" </dev/null >"${RVOL_VM_OUT:-/dev/null}" 2>"${RVOL_VM_ERR:-/dev/null}"
echo $? >"${RVOL_VM_RC:-/dev/null}"
sync
echo o >/proc/sysrq-trigger
sleep 10
