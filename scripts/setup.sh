#!/usr/bin/env bash
# Install what kvmm, its guest kernel build and its tests need on a Debian 12 host:
# Debian packages (only those missing) and the kvmm package itself (editable) with the
# test extras. Safe to run again. Prints the Python interpreter to use on stdout: the
# current python3, or a .venv here where python3 is externally managed (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."

# The compressors Linux's build uses make the tests' bzImage payloads; liblzo2-dev builds python-lzo;
# acpica-tools (iasl, acpiexec) checks the ACPI tables kvmm writes (tests/acpi/).
scripts/ensure-packages.sh linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils \
    busybox-static e2fsprogs cpio linux-libc-dev iproute2 iputils-ping time \
    gzip bzip2 lzop lz4 zstd liblzo2-dev acpica-tools

py=python3
if [ -x .venv/bin/python ]; then
    py=.venv/bin/python
elif [ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
    echo "setup: python3 is externally managed; creating .venv" >&2
    dpkg -s python3-venv >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2; }
    python3 -m venv .venv >&2
    py=.venv/bin/python
fi
if ! "$py" -c "import kvmm, cffi, ioctl_opt, psutil, lz4, zstandard, iced_x86, pytest, hypothesis, xdist, mypy, build" 2>/dev/null \
   || [ "$("$py" -c 'import kvmm, os; print(os.path.dirname(os.path.dirname(kvmm.__file__)))')" != "$PWD" ]; then
    echo "setup: pip install -e .[test]" >&2
    "$py" -m pip install -q --disable-pip-version-check -e ".[test]" >&2
    command -v pyenv >/dev/null 2>&1 && pyenv rehash >&2 || true  # expose the kvmm command
fi
# The optional LZO extra is built from source: a failed build leaves LZO bzImages to their
# own decompressor (and the LZO host-path tests skipped with that reason), not a broken set-up.
if ! "$py" -c "import lzo" 2>/dev/null; then
    echo "setup: pip install .[lzo] (python-lzo)" >&2
    "$py" -m pip install -q --disable-pip-version-check "python-lzo>=1.15,<2" >&2 \
        || echo "setup: python-lzo did not build; LZO bzImage payloads will use the kernel's own decompressor" >&2
fi
echo "$py"
