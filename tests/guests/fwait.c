/* Executes fwait with x87 exceptions masked (a no-op), then reports. Regression guest:
 * KVM's emulator on software-nested hosts cannot run fwait (seen in Linux's fpu__drop). */
#include "guest.h"

ENTRY
{
    __asm__ volatile("fninit; fwait");
    puts_serial("fwait done\n");
    debug_exit(9);
}
