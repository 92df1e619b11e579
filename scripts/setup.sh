#!/usr/bin/env bash
# Install what kvmm, its guest kernel build and its tests need on a Debian 12 host:
# Debian packages (only those missing) and the kvmm package itself (editable) with the
# test extras. Safe to run again; prints nothing when all is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils
      busybox-static e2fsprogs cpio linux-libc-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    sudo_cmd=()
    [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >&2
fi

if ! python3 -c "import kvmm, cffi, ioctl_opt, psutil, pytest, hypothesis" 2>/dev/null \
   || [ "$(python3 -c 'import kvmm, os; print(os.path.dirname(os.path.dirname(kvmm.__file__)))')" != "$PWD" ]; then
    echo "setup: pip install -e .[test]" >&2
    python3 -m pip install -q --disable-pip-version-check -e ".[test]" >&2
fi
