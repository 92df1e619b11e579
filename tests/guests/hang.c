/* Prints a line, then keeps the vCPU busy in the guest forever (no exits). */
#include "guest.h"

ENTRY
{
    puts_serial("hanging\n");
    for (;;)
        __asm__ volatile("pause");
}
