/* Resets the machine the way Linux's reboot=k does: pulse-reset command 0xFE on 0x64. */
#include "guest.h"

ENTRY
{
    puts_serial("resetting\n");
    while (inb(0x64) & 0x02) /* input buffer full */
        ;
    outb(0x64, 0xfe);
    puts_serial("reset did not happen\n");
    debug_exit(1);
}
