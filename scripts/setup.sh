#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build, test and demo
# tether. Idempotent: packages already present are not fetched again.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
# make generate pins clang 14 (bpf/gen.go): the committed eBPF objects are
# its bytes, and CI's check-generated compares against them.
have clang-14      || need+=(clang-14)
have llvm-strip-14 || need+=(llvm-14)
have bpftool      || need+=(bpftool)
have redis-server || need+=(redis-server)
have ip           || need+=(iproute2)
have nft          || need+=(nftables)
have curl         || need+=(curl)
have python3      || need+=(python3)
have nsenter      || need+=(util-linux)
# test/container builds the image (deploy/container) and runs it: podman
# builds FROM scratch offline; runc runs it where crun cannot (hybrid cgroups).
have podman       || need+=(podman)
have runc         || need+=(runc)
have make         || need+=(make)
# deploy/systemd is checked with systemd-analyze verify; the redirector's
# least capabilities are proven by running it under setpriv.
have systemd-analyze || need+=(systemd)
have setpriv      || need+=(util-linux)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run this script as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  echo "setup: go is at /usr/local/go/bin; add it to PATH"
fi
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || { echo "setup: Go 1.26 is required (https://go.dev/dl)" >&2; exit 1; }

# bpffs is where the redirector pins its maps and links.
if [ "$(id -u)" -eq 0 ] && ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf
fi
echo "setup: ok"
