"""A 9P2000.L file server for virtio-9p shares (kvmm/virtio/p9.py).

- :mod:`kvmm.p9.wire`: the messages on the wire: parsing a request (pure, bounded) and
  encoding the replies;
- :mod:`kvmm.p9.hostfs`: the host side: confined path resolution (``openat2`` with
  ``RESOLVE_BENEATH`` where the kernel has it, else one component at a time with
  ``O_NOFOLLOW``), directory reading (``getdents64``) and ``fstatfs``, through cffi;
- :mod:`kvmm.p9.server`: executing parsed requests against a shared host directory: fids,
  limits, the read-only rule, zero-copy reads and writes.

docs/security.md says what confines a share and which test backs each claim.
"""
