/* Keeps the vCPU busy inside the guest for 1-2 s of wall time (until the CMOS RTC's
 * seconds change twice), with an exit to kvmm only every 100000 iterations. */
#include "guest.h"

static u8 rtc_seconds(void) { outb(0x70, 0); return inb(0x71); }

ENTRY
{
    u8 start = rtc_seconds(), last = start;
    int changes = 0;
    while (changes < 2) {
        for (volatile int i = 0; i < 100000; i++)
            ;
        u8 now = rtc_seconds();
        if (now != last) {
            changes++;
            last = now;
        }
    }
    debug_exit(0x11);
}
