/* Reads bytes from COM1 (polling LSR.DR) until a newline and echoes them upper-cased. */
#include "guest.h"

ENTRY
{
    puts_serial("ready\n");
    for (;;) {
        while (!(inb(COM1 + 5) & 0x01)) /* LSR.DR */
            ;
        char c = (char)inb(COM1);
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        putc_serial(c);
        if (c == '\n')
            debug_exit(0);
    }
}
