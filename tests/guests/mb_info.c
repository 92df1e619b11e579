/* Multiboot entry state and boot information (Multiboot 0.6.96, 3.2 and 3.3).
 *
 * Checks in the guest what 3.2 requires at entry: EAX = 0x2BADB002, CR0.PE set and
 * CR0.PG clear, EFLAGS.IF and VM clear, CS a 32-bit code segment and DS/ES/FS/GS/SS data
 * segments, all with base 0 and limit 4 GiB (the descriptors the selectors name in the
 * GDT that GDTR points at, and a read near 4 GiB through each data segment). Then
 * prints the multiboot_info for the host test to compare with kvmm's e820 map, the
 * command line and the modules it passed: one "key value" line each. Ends with status
 * 0x21 (kvmm's debug-exit port) when the entry state holds, 0x3f otherwise. */
#include "mb.h"

MULTIBOOT_ENTRY

static int failures;

static void check(int ok, const char *what)
{
    if (!ok) {
        puts_serial("entry check failed: ");
        puts_serial(what);
        putc_serial('\n');
        failures++;
    }
}

struct __attribute__((packed)) gdtr {
    u16 limit;
    u32 base;
};

#define SEL(reg) ({ u16 s; __asm__ volatile("mov %%" reg ", %0" : "=r"(s)); s; })

/* The descriptor a selector names in the GDT that GDTR points at (kvmm's emulator host
 * cannot run LAR/LSL, so the table is read directly). */
static u64 descriptor(u16 sel)
{
    struct gdtr g;
    __asm__ volatile("sgdt %0" : "=m"(g));
    if ((sel & 4) || (u32)(sel & ~7) + 7 > g.limit)
        return 0;
    return *(const u64 *)(g.base + (sel & ~7));
}

static int flat(u64 d)
{
    u32 base = (u32)((d >> 16) & 0xffffff) | (u32)((d >> 32) & 0xff000000);
    u32 limit = (u32)(d & 0xffff) | (u32)((d >> 32) & 0xf0000);
    int g = (d >> 55) & 1, db = (d >> 54) & 1, present = (d >> 47) & 1;
    return base == 0 && limit == 0xfffff && g && db && present;
}

static void check_segment(u16 sel, int code, const char *name)
{
    u64 d = descriptor(sel);
    u32 type = (u32)(d >> 40) & 0x1f; /* S and type */
    check(flat(d), name);
    check(code ? (type & 0x1a) == 0x1a : (type & 0x1a) == 0x12, name); /* code+read / data+write */
}

/* A read at offset 0xfffffffc through each data segment: beyond a smaller limit it would
 * fault (and, without an IDT, end the VM); at 4 GiB - 4 nothing is mapped: all ones. */
static void check_limits(void)
{
    u32 v[5];
    __asm__ volatile("movl %%ds:0xfffffffc, %0" : "=r"(v[0]));
    __asm__ volatile("movl %%es:0xfffffffc, %0" : "=r"(v[1]));
    __asm__ volatile("movl %%fs:0xfffffffc, %0" : "=r"(v[2]));
    __asm__ volatile("movl %%gs:0xfffffffc, %0" : "=r"(v[3]));
    __asm__ volatile("movl %%ss:0xfffffffc, %0" : "=r"(v[4]));
    for (int i = 0; i < 5; i++)
        check(v[i] == v[0], "segment limits");
}

static void put_kv(const char *key, u64 value)
{
    puts_serial(key);
    putc_serial(' ');
    put_hex(value);
    putc_serial('\n');
}

static u32 checksum(const u8 *p, u32 n)
{
    u32 sum = 0;
    for (u32 i = 0; i < n; i++)
        sum = sum * 31 + p[i];
    return sum;
}

__attribute__((noreturn)) void guest_main(u32 magic, struct mb_info *mbi)
{
    u32 cr0, eflags;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("pushf; pop %0" : "=r"(eflags));
    check(magic == MB_BOOTLOADER_MAGIC, "eax");
    check((cr0 & 1) && !(cr0 & 0x80000000u), "cr0");
    check(!(eflags & (1u << 9)) && !(eflags & (1u << 17)), "eflags");
    check_segment(SEL("cs"), 1, "cs");
    check_segment(SEL("ds"), 0, "ds");
    check_segment(SEL("es"), 0, "es");
    check_segment(SEL("fs"), 0, "fs");
    check_segment(SEL("gs"), 0, "gs");
    check_segment(SEL("ss"), 0, "ss");
    check_limits();
    puts_serial(failures ? "entry state: wrong\n" : "entry state: ok\n");

    put_kv("magic", magic);
    put_kv("info", (u32)mbi);
    put_kv("flags", mbi->flags);
    put_kv("mem_lower", mbi->mem_lower);
    put_kv("mem_upper", mbi->mem_upper);
    puts_serial("cmdline ");
    puts_serial((const char *)mbi->cmdline);
    putc_serial('\n');
    puts_serial("loader ");
    puts_serial((const char *)mbi->boot_loader_name);
    putc_serial('\n');
    for (u32 off = 0; off < mbi->mmap_length;) {
        struct mb_mmap *e = (struct mb_mmap *)(mbi->mmap_addr + off);
        puts_serial("mmap ");
        put_hex(e->base_addr);
        putc_serial(' ');
        put_hex(e->length);
        putc_serial(' ');
        put_dec(e->type);
        putc_serial('\n');
        off += e->size + 4;
    }
    struct mb_module *mods = (struct mb_module *)mbi->mods_addr;
    for (u32 i = 0; i < mbi->mods_count; i++) {
        puts_serial("module ");
        put_hex(mods[i].mod_start);
        putc_serial(' ');
        put_hex(mods[i].mod_end - mods[i].mod_start);
        putc_serial(' ');
        put_hex(checksum((const u8 *)mods[i].mod_start, mods[i].mod_end - mods[i].mod_start));
        putc_serial(' ');
        puts_serial((const char *)mods[i].string);
        putc_serial('\n');
    }
    put_kv("kernel", (u32)_load_start);
    put_kv("kernel_end", (u32)_bss_end);
    debug_exit(failures ? 0x3f : 0x21);
}
