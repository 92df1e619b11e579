/* Reports boot milestones on port 0x80 (1, 2, 3), then ends with debug-exit 0. */
#include "guest.h"

ENTRY
{
    outb(0x80, 1);
    puts_serial("phase one\n");
    outb(0x80, 2);
    puts_serial("phase two\n");
    outb(0x80, 3);
    debug_exit(0);
}
