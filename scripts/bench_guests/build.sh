#!/usr/bin/env bash
# Build the benchmark guests into $1: flat images for every VMM (flat.S), and kvmm's ELF
# equivalents (tests/guests). Needs gcc and binutils only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
mkdir -p "$out"
for variant in reset serial; do
    def=()
    [ "$variant" = serial ] && def=(-DSERIAL)
    gcc -m32 -c -x assembler-with-cpp "${def[@]}" -o "$out/flat_$variant.o" "$here/flat.S"
    ld -m elf_i386 -Ttext 0 --oformat binary -o "$out/flat_$variant.bin" "$out/flat_$variant.o"
    [ "$(stat -c %s "$out/flat_$variant.bin")" = 65536 ] || { echo "flat_$variant.bin is not 64 KiB" >&2; exit 1; }
done
