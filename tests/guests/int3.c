/* Installs an IDT whose #BP (vector 3) handler reports through the debug-exit port, then
 * executes int3. On software-nested KVM the emulator cannot run int3 and kvmm delivers
 * the exception by hand; on hardware KVM it runs natively. Either way the handler runs. */
#include "guest.h"

struct __attribute__((packed)) gate {
    u16 off_lo, sel;
    u8 ist, type;
    u16 off_mid;
    u32 off_hi, zero;
};

static struct gate idt[32] __attribute__((aligned(16)));

static void __attribute__((noreturn, used)) on_breakpoint(void)
{
    puts_serial("breakpoint handled\n");
    debug_exit(3);
}

ENTRY
{
    u64 h = (u64)on_breakpoint;
    idt[3] = (struct gate){ (u16)h, 0x10, 0, 0x8e, (u16)(h >> 16), (u32)(h >> 32), 0 };
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
    __asm__ volatile("int3");
    puts_serial("int3 returned without the handler\n");
    debug_exit(1);
}
