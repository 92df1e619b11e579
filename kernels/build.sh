#!/usr/bin/env bash
# Build kvmm's guest kernel (vmlinux and bzImage) from Debian's linux-source-6.1.
#
# The result is cached under ${KVMM_CACHE:-~/.cache/kvmm}/kernel-<key>/, where <key>
# hashes the source package version, config.fragment and the recipe number below, so a second run
# with the same inputs is instant. Prints the cache directory on stdout (last line).
#
# Usage: kernels/build.sh [--print-dir]   (--print-dir: print the cache dir, build nothing)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KVMM_CACHE:-$HOME/.cache/kvmm}
tarball=/usr/src/linux-source-6.1.tar.xz

"$here/../scripts/ensure-packages.sh" linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils

# Bump when the build steps below change what they produce.
recipe=1
src_version=$(dpkg-query -W -f '${Version}' linux-source-6.1)
key=$( { echo "$src_version recipe=$recipe"; cat "$here/config.fragment"; } | sha256sum | cut -c1-16)
out="$cache/kernel-$key"
if [ "${1:-}" = "--print-dir" ]; then echo "$out"; exit 0; fi
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    echo "kernels/build.sh: cached kernel $out (linux-source $src_version)" >&2
    echo "$out"; exit 0
fi

mkdir -p "$cache"
# One build at a time per cache: a second caller waits, then finds the result.
exec 9>"$cache/build.lock"
flock 9
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then echo "$out"; exit 0; fi
work=$(mktemp -d "$cache/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "kernels/build.sh: building linux-source $src_version in $work (about 5 minutes on 2 cores)" >&2
tar -C "$work" -xf "$tarball"
cd "$work"/linux-source-6.1
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$here/config.fragment" >/dev/null
make -s olddefconfig >&2
# Every option the fragment asks for must have survived olddefconfig (a missing
# dependency silently drops an option otherwise).
bad=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=n) opt=${line%%=*}
            grep -qx "$opt=y" .config && { echo "kernels/build.sh: $opt is still set" >&2; bad=1; } ;;
        CONFIG_*) grep -qx "$line" .config || { echo "kernels/build.sh: $line did not stick" >&2; bad=1; } ;;
    esac
done < "$here/config.fragment"
[ $bad = 0 ] || exit 1
make -s -j"$(nproc)" vmlinux bzImage >&2
tmp_out=$(mktemp -d "$cache/out-$key.XXXXXX")
cp vmlinux "$tmp_out/vmlinux"
cp arch/x86/boot/bzImage "$tmp_out/bzImage"
cp .config "$tmp_out/config"
echo "$src_version" > "$tmp_out/source-version"
rm -rf "$out"; mv "$tmp_out" "$out"
echo "kernels/build.sh: built $out" >&2
echo "$out"
