/* Jumps into the 32-bit MMIO hole, where no memory is: KVM cannot fetch (so cannot
 * emulate) the instruction and reports an emulation failure. */
#include "guest.h"

ENTRY
{
    puts_serial("jumping into the MMIO hole\n");
    ((void (*)(void))0xd0000000UL)();
    debug_exit(1);
}
