/* Powers the machine off the way an ACPI OS does, finding everything in kvmm's tables:
 * the RSDP in the BIOS area (ACPI 6.5 5.2.5.1), the XSDT, the FADT in it, the FADT's
 * PM1a control block, and \_S5's SLP_TYP in the DSDT's AML (the Name's package, read as
 * ACPICA reads a constant); then SLP_TYP | SLP_EN to PM1a_CNT (4.8.3.2.1, 16.1.7).
 * Built with -DRESET it resets through the FADT's RESET_REG and RESET_VALUE instead.
 * Any inconsistency ends with a debug-exit status naming the step that failed. */
#include "guest.h"

static u8 sum(const u8 *p, u64 n)
{
    u8 s = 0;
    while (n--)
        s += *p++;
    return s;
}

static int sig_is(const u8 *p, const char *sig, int n)
{
    for (int i = 0; i < n; i++)
        if (p[i] != (u8)sig[i])
            return 0;
    return 1;
}

static u32 rd32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }

/* A valid table at addr with this signature, or 0. */
static const u8 *table(u64 addr, const char *sig)
{
    const u8 *t = (const u8 *)addr;
    if (!sig_is(t, sig, 4) || sum(t, rd32(t + 4)) != 0)
        return 0;
    return t;
}

/* An AML data object at p (20.2.3): ZeroOp, OneOp or BytePrefix; -1 otherwise. */
static __attribute__((unused)) int aml_small_integer(const u8 *p)
{
    if (p[0] == 0x00 || p[0] == 0x01)
        return p[0];
    if (p[0] == 0x0a)
        return p[1];
    return -1;
}

ENTRY
{
    const u8 *rsdp = 0;
    for (u64 a = 0xe0000; a < 0x100000; a += 16) /* 5.2.5.1: 16-byte boundaries */
        if (sig_is((const u8 *)a, "RSD PTR ", 8) && sum((const u8 *)a, 20) == 0) {
            rsdp = (const u8 *)a;
            break;
        }
    if (!rsdp || rsdp[15] < 2 || sum(rsdp, 36) != 0)
        debug_exit(1);
    const u8 *xsdt = table(rd64(rsdp + 24), "XSDT");
    if (!xsdt)
        debug_exit(2);
    const u8 *fadt = 0;
    for (u32 off = 36; off + 8 <= rd32(xsdt + 4); off += 8)
        if ((fadt = table(rd64(xsdt + off), "FACP")))
            break;
    if (!fadt)
        debug_exit(3);
#ifdef RESET
    const u8 *reg = fadt + 116; /* RESET_REG: a Generic Address Structure (5.2.3.2) */
    if (!(rd32(fadt + 112) & (1 << 10)) || reg[0] != 1 || reg[1] != 8) /* RESET_REG_SUP, SystemIO, 8 bits */
        debug_exit(4);
    puts_serial("ACPI reset through port ");
    put_hex(rd64(reg + 4));
    putc_serial('\n');
    outb((u16)rd64(reg + 4), fadt[128]);
    puts_serial("reset did not happen\n");
    debug_exit(5);
#else
    u32 pm1a_cnt = rd32(fadt + 64);
    const u8 *dsdt = table(rd64(fadt + 140), "DSDT");
    if (!pm1a_cnt || !dsdt)
        debug_exit(4);
    /* NameOp ['\\'] "_S5_" PackageOp PkgLength NumElements, then PM1a's SLP_TYP */
    int slp_typ = -1;
    u32 len = rd32(dsdt + 4);
    for (u32 i = 36; i + 9 < len; i++) {
        if (dsdt[i] != 0x08)
            continue;
        u32 at = i + 1 + (dsdt[i + 1] == '\\'); /* a root prefix, as kvmm writes \_S5 */
        if (sig_is(dsdt + at, "_S5_", 4) && dsdt[at + 4] == 0x12) {
            const u8 *p = dsdt + at + 5;
            p += 1 + (p[0] >> 6); /* the PkgLength: lead byte and the bytes it says follow */
            slp_typ = aml_small_integer(p + 1); /* past NumElements */
            break;
        }
    }
    if (slp_typ < 0 || slp_typ > 7)
        debug_exit(6);
    puts_serial("ACPI S5: SLP_TYP ");
    put_dec((u64)slp_typ);
    puts_serial(" to PM1a_CNT ");
    put_hex(pm1a_cnt);
    putc_serial('\n');
    outw((u16)pm1a_cnt, (u16)(slp_typ << 10 | 1 << 13));
    puts_serial("power-off did not happen\n");
    debug_exit(7);
#endif
}
