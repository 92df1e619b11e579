/* What kvm-unit-tests' x86 start-up asks of the platform (lib/x86/smp.c, fwcfg.c), in
 * small: read the CPU count and RAM size from QEMU's fw_cfg (ports 0x510/0x511), then
 * bring the APs up the way a PC's firmware or OS does: INIT, then a start-up IPI to all
 * but self (Intel SDM vol. 3A, 8.4.4 "MP initialization example"). Each AP starts in
 * real mode at 0x8000 (SIPI vector 8), switches to 32-bit protected mode with the
 * guest's GDT, records its APIC id and halts. The BSP waits for all of them and reports
 * "fw_cfg ... cpus N", "aps up K ids ..." and ends with status 0x22 when every AP came
 * up, 0x3e otherwise. */
#include "mb.h"

MULTIBOOT_ENTRY

#define FW_CFG_SELECT 0x510
#define FW_CFG_DATA 0x511
#define APIC_BASE 0xfee00000u
#define APIC_ID 0x20
#define APIC_SVR 0xf0
#define APIC_ICR_LOW 0x300
#define APIC_ICR_HIGH 0x310
#define TRAMPOLINE 0x8000u

volatile u32 ap_count;
volatile u32 ap_ids; /* bit n: APIC id n checked in */

static const u64 gdt[3] __attribute__((aligned(8))) = {0, 0x00cf9b000000ffffull, 0x00cf93000000ffffull};

/* Real-mode entry of the APs, copied to TRAMPOLINE: CS = 0x800, IP = 0. */
extern const u8 trampoline_start[], trampoline_end[], trampoline_gdtr[];
__asm__(".section .rodata\n"
        ".code16\n"
        "trampoline_start:\n"
        "  cli\n"
        "  mov %cs, %ax\n"
        "  mov %ax, %ds\n"
        "  lgdtl trampoline_gdtr - trampoline_start\n"
        "  mov %cr0, %eax\n"
        "  or $1, %eax\n"
        "  mov %eax, %cr0\n"
        "  ljmpl $0x08, $ap_entry32\n"
        "trampoline_gdtr:\n"
        "  .word 23\n"
        "  .long 0\n" /* the GDT's address, filled in by the BSP */
        "trampoline_end:\n"
        ".code32\n"
        ".text\n"
        "ap_entry32:\n"
        "  mov $0x10, %ax\n"
        "  mov %ax, %ds\n"
        "  mov %ax, %es\n"
        "  mov %ax, %ss\n"
        "  mov 0xfee00020, %ecx\n" /* APIC ID register: id in bits 31:24 */
        "  shr $24, %ecx\n"
        "  lock btsl %ecx, ap_ids\n"
        "  lock incl ap_count\n"
        "1: cli\n"
        "  hlt\n"
        "  jmp 1b\n");

static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(APIC_BASE + reg); }
static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(APIC_BASE + reg) = v; }

static u64 fw_cfg(u16 key, int bytes)
{
    u64 v = 0;
    outw(FW_CFG_SELECT, key);
    for (int i = 0; i < bytes; i++)
        v |= (u64)inb(FW_CFG_DATA) << (8 * i);
    return v;
}

static void copy(u8 *dst, const u8 *src, u32 n)
{
    while (n--)
        *dst++ = *src++;
}

__attribute__((noreturn)) void guest_main(u32 magic, struct mb_info *mbi)
{
    (void)mbi;
    if (magic != MB_BOOTLOADER_MAGIC)
        debug_exit(0x3d);
    u32 signature = (u32)fw_cfg(0, 4);
    u32 cpus = (u32)fw_cfg(5, 2);
    u64 ram = fw_cfg(3, 8);
    puts_serial("fw_cfg ");
    puts_serial(signature == 0x554d4551 ? "QEMU" : "none"); /* "QEMU", little-endian */
    puts_serial(" cpus ");
    put_dec(cpus);
    puts_serial(" ram ");
    put_hex(ram);
    putc_serial('\n');

    copy((u8 *)TRAMPOLINE, trampoline_start, (u32)(trampoline_end - trampoline_start));
    *(volatile u32 *)(TRAMPOLINE + (u32)(trampoline_gdtr - trampoline_start) + 2) = (u32)gdt;
    apic_write(APIC_SVR, apic_read(APIC_SVR) | 0x100); /* software-enable the BSP's LAPIC */
    apic_write(APIC_ICR_HIGH, 0);
    apic_write(APIC_ICR_LOW, 0x000c4500); /* all excluding self, INIT, level assert */
    apic_write(APIC_ICR_LOW, 0x000c4600 | (TRAMPOLINE >> 12)); /* all excluding self, start-up */
    for (u32 spins = 0; ap_count < cpus - 1 && spins < 20000000; spins++)
        __asm__ volatile("pause");
    puts_serial("aps up ");
    put_dec(ap_count);
    puts_serial(" ids ");
    put_hex(ap_ids);
    putc_serial('\n');
    debug_exit(ap_count == cpus - 1 && cpus > 0 ? 0x22 : 0x3e);
}
