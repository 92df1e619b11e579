/* Writes 65536 bytes to COM1's THR with no LSR polling (one port write, one VM exit, a
 * byte), then resets through the i8042: the same work as scripts/bench_guests/flat.S with
 * SERIAL, for VMMs that boot ELF images. For exit-handling throughput. */
#include "guest.h"

ENTRY
{
    for (int i = 0; i < 65536; i++)
        outb(COM1, 'x');
    outb(0x64, 0xfe);
    debug_exit(1);
}
