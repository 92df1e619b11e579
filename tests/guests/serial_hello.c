/* Prints a line on COM1 and ends the VM through the debug-exit port with 42. */
#include "guest.h"

ENTRY
{
    puts_serial("hello from the guest\n");
    debug_exit(42);
}
