/* Prints what a panicking Linux prints, then resets through the i8042 as panic=-1 with
 * reboot=k does: kvmm must report a panic, not a plain reset. */
#include "guest.h"

ENTRY
{
    puts_serial("Kernel panic - not syncing: VFS: Unable to mount root fs\n");
    puts_serial("Rebooting in -1 seconds..\n");
    outb(0x64, 0xfe);
    debug_exit(1);
}
