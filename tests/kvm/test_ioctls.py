"""The ioctl helpers against the real /dev/kvm (kvmm.kvm.system)."""

from __future__ import annotations

import errno

import pytest

from kvmm.errors import KvmError
from kvmm.kvm import ioctls as K
from kvmm.kvm.system import Kvm, ioctl_int

pytestmark = pytest.mark.kvm


def test_integer_ioctl_takes_an_unsigned_long() -> None:
    # KVM_SET_TSS_ADDR's address is above 2**31: fcntl.ioctl's C int cannot carry it.
    with Kvm() as kvm, kvm.create_vm() as vm:
        assert ioctl_int(vm.fd, K.KVM_SET_TSS_ADDR, 0xFFFB_D000) == 0


def test_failed_integer_ioctl_raises_kvm_error_with_errno_and_name() -> None:
    # Regression: _IO ioctls (no argument size: KVM_CREATE_VCPU is 0xae41) had no name
    # in the message, only their number.
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(KvmError) as info:
            ioctl_int(vm.fd, K.KVM_CREATE_VCPU, 1 << 20)  # far beyond KVM_MAX_VCPU_IDS
    assert info.value.errno == errno.EINVAL
    assert "KVM_CREATE_VCPU" in str(info.value) and "EINVAL" in str(info.value)
