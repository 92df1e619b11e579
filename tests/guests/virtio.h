/* A legacy virtio-PCI driver in miniature for freestanding test guests (virtio 0.9.5,
 * I/O BAR layout: features 0/4, queue PFN 8, num 12, select 14, notify 16, status 18,
 * ISR 19, device config 20). */
#pragma once
#include "guest.h"

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

struct desc { u64 addr; u32 len; u16 flags, next; };
struct used_elem { u32 id, len; };

/* PCI configuration mechanism #1, bus 0, function 0. */
static inline u32 pci_read(u8 slot, u8 reg)
{
    outl(0xcf8, 0x80000000u | (slot << 11) | reg);
    return inl(0xcfc);
}

struct vq {
    u16 iobase, size;
    volatile u16 *avail, *used; /* flags, idx, ring[] */
    u16 avail_idx;              /* the driver's next available index */
};

/* Make the chain headed by ``head`` available, notify queue 0 and wait (polling the used
 * ring) until the device has used it. */
static inline void vq_run_chain(struct vq *q, u16 head)
{
    u16 seen = q->used[1];
    q->avail[2 + q->avail_idx % q->size] = head;
    __asm__ volatile("" ::: "memory");
    q->avail[1] = ++q->avail_idx;
    outw(q->iobase + 16, 0);
    while (q->used[1] == seen)
        __asm__ volatile("pause" ::: "memory");
}

/* Bring up queue 0 of the virtio device in PCI slot 1 with no features, its rings in
 * ``ring`` (3 pages, page-aligned), polled. Exits the guest with status 1 if absent. */
static inline void virtio_start_queue0(u8 *ring, struct vq *q)
{
    if ((pci_read(1, 0) & 0xffff) != 0x1af4) { puts_serial("no virtio device\n"); debug_exit(1); }
    q->iobase = pci_read(1, 0x10) & ~3u;
    outb(q->iobase + 18, 0);     /* reset */
    outb(q->iobase + 18, 1 | 2); /* ACKNOWLEDGE | DRIVER */
    outl(q->iobase + 4, 0);
    outw(q->iobase + 14, 0);
    q->size = inw(q->iobase + 12);
    q->avail = (u16 *)(ring + 16 * q->size);
    q->used = (u16 *)(ring + ((16 * q->size + 2 * (3 + q->size) + 4095) & ~4095UL));
    outl(q->iobase + 8, (u32)((u64)ring >> 12));
    outb(q->iobase + 18, 1 | 2 | 4); /* DRIVER_OK */
}
