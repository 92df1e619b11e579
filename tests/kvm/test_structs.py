"""The cffi layouts and ioctl numbers agree with the system's <linux/kvm.h>."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmm.kvm import ioctls as K
from kvmm.kvm.structs import ABI_SIZES, ffi

STRUCTS = [name for name in ABI_SIZES]
IOCTLS = [name for name in dir(K) if name.startswith("KVM_") and isinstance(getattr(K, name), int) and getattr(K, name) > 0xFFFF]
OFFSETS = [("struct kvm_run", "io"), ("struct kvm_run", "kvm_valid_regs"), ("struct kvm_sregs", "efer"),
           ("struct kvm_vcpu_events", "exception_payload"), ("struct kvm_irq_routing_entry", "u")]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not Path("/usr/include/linux/kvm.h").exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and the kernel headers (linux-libc-dev)")
    src = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for s in STRUCTS:
        src.append(f'printf("%s=%zu\\n", "{s}", sizeof({s}));')
    for name in IOCTLS:
        src.append(f'printf("%s=%lu\\n", "{name}", (unsigned long){name});')
    for s, f in OFFSETS:
        src.append(f'printf("%s=%zu\\n", "{s}.{f}", offsetof({s}, {f}));')
    src.append("return 0; }")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(src))
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=") for line in out.splitlines())}


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_size_matches_kernel_header(header_values: dict[str, int], struct: str) -> None:
    assert ffi.sizeof(struct) == header_values[struct]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_kernel_header(header_values: dict[str, int], name: str) -> None:
    assert getattr(K, name) == header_values[name], f"{name}: {getattr(K, name):#x} != {header_values[name]:#x}"


@pytest.mark.parametrize("struct,field", OFFSETS)
def test_field_offset_matches_kernel_header(header_values: dict[str, int], struct: str, field: str) -> None:
    assert ffi.offsetof(struct, field) == header_values[f"{struct}.{field}"]


def test_the_preparsed_abi_module_is_current() -> None:
    # kvmm/kvm/_abi.py (cffi out-of-line ABI mode) must be regenerated after cdef.py
    # changes (scripts/gen-abi); a stale one would cost every start a pycparser run.
    from kvmm.kvm import _abi
    from kvmm.kvm.cdef import cdef_digest

    assert _abi.CDEF_DIGEST == cdef_digest(), "run scripts/gen-abi"
    assert ffi is _abi.ffi


def test_the_cached_ioctl_numbers_are_ioctl_opts_for_every_declaration() -> None:
    # kvmm/kvm/_ioctl_numbers.py spares every start ioctl-opt's import (ctypes); it must
    # hold ioctl-opt's answer for each declaration (regenerate with scripts/gen-abi).
    import ioctl_opt

    from kvmm.kvm._ioctl_numbers import NUMBERS

    assert len(K.DECLARED) >= 40
    for (kind, type_, nr, size), number in K.DECLARED.items():
        fn = getattr(ioctl_opt, kind)
        assert number == (fn(type_, nr) if kind == "IO" else fn(type_, nr, bytearray(size)))
        assert NUMBERS.get((kind, type_, nr, size)) == number, "run scripts/gen-abi"
