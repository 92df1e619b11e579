/* Loads an empty IDT and raises #UD: no handler -> #DF -> triple fault (shutdown). */
#include "guest.h"

ENTRY
{
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = { 0, 0 };
    __asm__ volatile("lidt %0" : : "m"(idtr));
    __asm__ volatile("ud2");
    debug_exit(1);
}
