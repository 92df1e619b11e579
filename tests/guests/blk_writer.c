/* Writes sector k of the virtio-blk disk at 00:01.0 with the 64-bit value k repeated, for
 * k = 0, 1, 2, ..., and after every 8 writes sends a FLUSH and, once the device has
 * completed it with VIRTIO_BLK_S_OK, prints "flushed K" (K sectors are now durable).
 * Polls the used ring (no interrupts). Ends with debug-exit 0x20 after MAX_SECTORS. */
#include "virtio.h"



#define MAX_SECTORS 8192
static u8 ring[3 * 4096] __attribute__((aligned(4096)));
static struct __attribute__((packed)) { u32 type, reserved; u64 sector; } hdr;
static u64 data[64];
static volatile u8 status;
static struct vq vq;

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
    vq_run_chain(&vq, 0);
    return status;
}

ENTRY
{
    virtio_start_queue0(ring, &vq);

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
