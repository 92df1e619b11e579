/* Writes sector k of the virtio-blk disk at 00:01.0 with the 64-bit value k repeated, for
 * k = 0, 1, 2, ..., and after every 8 writes sends a FLUSH and, once the device has
 * completed it with VIRTIO_BLK_S_OK, prints "flushed K" (K sectors are now durable).
 * Polls the used ring (no interrupts). Ends with debug-exit 0x20 after MAX_SECTORS. */
#include "guest.h"

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

struct desc { u64 addr; u32 len; u16 flags, next; };

#define MAX_SECTORS 8192
static u8 ring[3 * 4096] __attribute__((aligned(4096)));
static struct __attribute__((packed)) { u32 type, reserved; u64 sector; } hdr;
static u64 data[64];
static volatile u8 status;
static u16 iobase, qsize, avail_idx;
static volatile u16 *avail, *used;

static u32 pci_read(u8 slot, u8 reg)
{
    outl(0xcf8, 0x80000000u | (slot << 11) | reg);
    return inl(0xcfc);
}

static void put_dec(u64 v)
{
    char buf[24];
    int i = 0;
    do { buf[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i)
        putc_serial(buf[--i]);
}

static u8 request(u32 type, u64 sector, int with_data)
{
    struct desc *d = (struct desc *)ring;
    hdr.type = type;
    hdr.sector = sector;
    status = 0xee;
    d[0] = (struct desc){ (u64)&hdr, 16, 1, 1 };
    if (with_data) {
        d[1] = (struct desc){ (u64)data, sizeof(data), 1, 2 }; /* device-readable */
        d[2] = (struct desc){ (u64)&status, 1, 2, 0 };
    } else {
        d[0].next = 2;
        d[2] = (struct desc){ (u64)&status, 1, 2, 0 };
    }
    u16 seen = used[1];
    avail[2 + avail_idx % qsize] = 0;
    __asm__ volatile("" ::: "memory");
    avail[1] = ++avail_idx;
    outw(iobase + 16, 0);
    while (used[1] == seen)
        __asm__ volatile("pause" ::: "memory");
    return status;
}

ENTRY
{
    if ((pci_read(1, 0) & 0xffff) != 0x1af4) { puts_serial("no virtio device\n"); debug_exit(1); }
    iobase = pci_read(1, 0x10) & ~3u;
    outb(iobase + 18, 0);
    outb(iobase + 18, 1 | 2);
    outl(iobase + 4, 0);
    outw(iobase + 14, 0);
    qsize = inw(iobase + 12);
    avail = (u16 *)(ring + 16 * qsize);
    used = (u16 *)(ring + ((16 * qsize + 2 * (3 + qsize) + 4095) & ~4095UL));
    outl(iobase + 8, (u32)((u64)ring >> 12));
    outb(iobase + 18, 1 | 2 | 4);

    for (u64 k = 0; k < MAX_SECTORS; k++) {
        for (int i = 0; i < 64; i++)
            data[i] = k;
        if (request(1 /* OUT */, k, 1) != 0) { puts_serial("write failed\n"); debug_exit(1); }
        if (k % 8 == 7) {
            if (request(4 /* FLUSH */, 0, 0) != 0) { puts_serial("flush failed\n"); debug_exit(1); }
            puts_serial("flushed ");
            put_dec(k + 1);
            putc_serial('\n');
        }
    }
    debug_exit(0x20);
}
