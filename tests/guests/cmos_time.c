/* Prints the CMOS RTC date and time (BCD, as register B says) as YYMMDDhhmmss. */
#include "guest.h"

static u8 cmos(u8 reg) { outb(0x70, reg); return inb(0x71); }

static void put_bcd(u8 v) { putc_serial((char)('0' + (v >> 4))); putc_serial((char)('0' + (v & 0xf))); }

ENTRY
{
    while (cmos(0x0a) & 0x80) /* update in progress */
        ;
    puts_serial("rtc ");
    u8 regs[] = { 0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00 };
    for (unsigned i = 0; i < sizeof(regs); i++)
        put_bcd(cmos(regs[i]));
    putc_serial('\n');
    debug_exit(0);
}
