"""kvmm: a lightweight virtual machine monitor for KVM, in Python."""

__version__ = "0.1.0"
