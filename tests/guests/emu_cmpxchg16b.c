/* lock cmpxchg16b, the first instruction a distribution kernel (SLUB's cmpxchg_double)
 * runs that kvm_pvm's emulator cannot: kvmm emulates it with one vCPU. Checks both
 * outcomes (memory, RDX:RAX, ZF, CF untouched) and #GP(0) for a misaligned operand
 * (Intel SDM vol. 2A, CMPXCHG8B/CMPXCHG16B). */
#include "guest.h"
#include "trap.h"

static u64 slot[4] __attribute__((aligned(16)));

ENTRY
{
    install_traps();
    u64 rax, rdx, flags;

    /* Equal: m128 = RCX:RBX, ZF=1; CF (set before) unaffected. */
    slot[0] = 0x1111111111111111; slot[1] = 0x2222222222222222;
    __asm__ volatile("stc; lock cmpxchg16b %[m]; pushfq; popq %[f]"
                     : [m] "+m"(slot[0]), "=a"(rax), "=d"(rdx), [f] "=r"(flags)
                     : "a"(0x1111111111111111), "d"(0x2222222222222222), "b"(0xaaaaaaaaaaaaaaaa),
                       "c"(0xbbbbbbbbbbbbbbbb) : "memory");
    check(slot[0] == 0xaaaaaaaaaaaaaaaa && slot[1] == 0xbbbbbbbbbbbbbbbb, "equal: memory", slot[1]);
    check((flags & 0x41) == 0x41, "equal: ZF and CF", flags);
    check(rax == 0x1111111111111111 && rdx == 0x2222222222222222, "equal: rdx:rax", rdx);

    /* Unequal: RDX:RAX = m128, ZF=0, memory unchanged. */
    __asm__ volatile("lock cmpxchg16b %[m]; pushfq; popq %[f]"
                     : [m] "+m"(slot[0]), "=a"(rax), "=d"(rdx), [f] "=r"(flags)
                     : "a"(1), "d"(2), "b"(3), "c"(4) : "memory");
    check(rax == 0xaaaaaaaaaaaaaaaa && rdx == 0xbbbbbbbbbbbbbbbb, "unequal: rdx:rax", rax);
    check(!(flags & 0x40), "unequal: ZF", flags);
    check(slot[0] == 0xaaaaaaaaaaaaaaaa && slot[1] == 0xbbbbbbbbbbbbbbbb, "unequal: memory", slot[0]);

    /* Misaligned: #GP(0), memory unchanged. */
    u64 v = TRY("lock cmpxchg16b (%0)", "r"((char *)slot + 8), "a"(0), "d"(0), "b"(0), "c"(0));
    check(v == 13 && fault_code == 0, "misaligned: #GP(0)", v);
    finish("cmpxchg16b", 16);
}
