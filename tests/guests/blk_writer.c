/* Writes sector k of the virtio-blk disk at 00:01.0 with the 64-bit value k repeated, for
 * k = 0, 1, 2, ..., and after every 8 writes sends a FLUSH and, once the device has
 * completed it with VIRTIO_BLK_S_OK, prints "flushed K" (K sectors are now durable).
 * Polls the used ring (no interrupts). Ends with debug-exit 0x20 after MAX_SECTORS. */
#include "virtio_blk.h"

#define MAX_SECTORS 8192

ENTRY
{
    blk_start();

    for (u64 k = 0; k < MAX_SECTORS; k++) {
        for (int i = 0; i < 64; i++)
            blk_data[i] = k;
        if (blk_request(VIRTIO_BLK_T_OUT, k) != 0) { puts_serial("write failed\n"); debug_exit(1); }
        if (k % 8 == 7) {
            if (blk_request(VIRTIO_BLK_T_FLUSH, 0) != 0) { puts_serial("flush failed\n"); debug_exit(1); }
            puts_serial("flushed ");
            put_dec(k + 1);
            putc_serial('\n');
        }
    }
    debug_exit(0x20);
}
