/* Catching the exceptions an instruction raises, for test guests that check them
 * (#UD, #NM, #GP, #PF, #MF, #AC): each handler records the vector and error code and
 * resumes at the address the test set in resume_rip. Include after guest.h. */
#pragma once

struct __attribute__((packed)) gate {
    u16 off_lo, sel;
    u8 ist, type;
    u16 off_mid;
    u32 off_hi, zero;
};

static struct gate trap_idt[32] __attribute__((aligned(16)));
volatile u64 fault_vector __attribute__((used)), fault_code __attribute__((used)), resume_rip __attribute__((used));

/* The CPU pushes an error code for #GP, #PF and #AC only; the others push a zero, so
 * every stub leaves [vector][error code][rip] on the stack for trap_common. */
__asm__(
    ".text\n"
    "trap_ud: pushq $0\n pushq $6\n jmp trap_common\n"
    "trap_nm: pushq $0\n pushq $7\n jmp trap_common\n"
    "trap_gp: pushq $13\n jmp trap_common\n"
    "trap_pf: pushq $14\n jmp trap_common\n"
    "trap_mf: pushq $0\n pushq $16\n jmp trap_common\n"
    "trap_ac: pushq $17\n jmp trap_common\n"
    "trap_common:\n"
    " pushq %rax\n"
    " movq 8(%rsp), %rax\n movq %rax, fault_vector(%rip)\n"
    " movq 16(%rsp), %rax\n movq %rax, fault_code(%rip)\n"
    " movq resume_rip(%rip), %rax\n movq %rax, 24(%rsp)\n"
    " popq %rax\n addq $16, %rsp\n iretq\n");
extern char trap_ud[], trap_nm[], trap_gp[], trap_pf[], trap_mf[], trap_ac[];

static void set_gate(int vector, void *handler)
{
    u64 h = (u64)handler;
    trap_idt[vector] = (struct gate){ (u16)h, 0x10, 0, 0x8e, (u16)(h >> 16), (u32)(h >> 32), 0 };
}

static void install_traps(void)
{
    set_gate(6, trap_ud);
    set_gate(7, trap_nm);
    set_gate(13, trap_gp);
    set_gate(14, trap_pf);
    set_gate(16, trap_mf);
    set_gate(17, trap_ac);
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = { sizeof(trap_idt) - 1, (u64)trap_idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

/* Runs the instruction(s) in `insn` (which may use the operands given), and resumes after
 * them if they fault; evaluates to the vector raised, or ~0 if none. */
#define TRY(insn, ...)                                                                   \
    ({                                                                                   \
        fault_vector = ~0ul;                                                             \
        __asm__ volatile("leaq 1f(%%rip), %%r11\n\tmovq %%r11, resume_rip(%%rip)\n\t" insn \
                         "\n1:" : : __VA_ARGS__ : "r11", "memory", "cc");                \
        fault_vector;                                                                    \
    })
#define NO_FAULT (~0ul)

static int failures;

static __attribute__((unused)) void check(int ok, const char *what, u64 got)
{
    if (!ok) {
        puts_serial("FAIL ");
        puts_serial(what);
        puts_serial(": ");
        put_hex(got);
        putc_serial('\n');
        failures++;
    }
}

static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory"); }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }
static inline u64 read_flags(void) { u64 v; __asm__ volatile("pushfq; popq %0" : "=r"(v)); return v; }

static inline __attribute__((noreturn, unused)) void finish(const char *name, u8 status)
{
    puts_serial(name);
    puts_serial(failures ? " FAILED\n" : " ok\n");
    debug_exit(failures ? 1 : status);
}
