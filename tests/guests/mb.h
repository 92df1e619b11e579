/* Helpers for freestanding 32-bit multiboot test guests (no libc; i386, ring 0, paging
 * off). Multiboot 0.6.96: the header (3.1) and the boot information (3.3). */
#pragma once
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3f8
#define KVMM_DEBUG_EXIT 0x501
#define MB_HEADER_MAGIC 0x1BADB002
#define MB_BOOTLOADER_MAGIC 0x2BADB002
#define MB_FLAGS_BASE 0x00000003 /* modules page-aligned, memory information */
#ifdef AOUT_KLUDGE
#define MB_FLAGS (MB_FLAGS_BASE | 0x00010000) /* the header's address fields are valid */
#else
#define MB_FLAGS MB_FLAGS_BASE
#endif

struct mb_header {
    u32 magic, flags, checksum;
    u32 header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr;
};

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr;
    u32 drives_length, drives_addr, config_table, boot_loader_name;
};

struct mb_module {
    u32 mod_start, mod_end, string, reserved;
};

struct mb_mmap {
    u32 size;
    u64 base_addr, length;
    u32 type;
} __attribute__((packed));

extern char _load_start[], _load_end[], _bss_end[];
void _start(void);

/* The header, first in the image (multiboot.ld). With AOUT_KLUDGE the loader takes the
 * load addresses from here instead of the ELF program headers (3.1.3). */
#define MULTIBOOT_HEADER                                                                  \
    __attribute__((section(".multiboot"), used, aligned(4))) static const struct mb_header \
        mb_header = {MB_HEADER_MAGIC, MB_FLAGS, -(MB_HEADER_MAGIC + MB_FLAGS),             \
                     (u32)&mb_header, (u32)_load_start, (u32)_load_end, (u32)_bss_end, (u32)_start}

/* The entry: a stack, then main(eax, ebx) with what the loader handed over. */
#define MULTIBOOT_ENTRY                                                       \
    MULTIBOOT_HEADER;                                                         \
    static u8 boot_stack[8192] __attribute__((aligned(16)));                  \
    __attribute__((noreturn)) void guest_main(u32 magic, struct mb_info *mbi); \
    __attribute__((section(".text.start"), naked, noreturn)) void _start(void) \
    {                                                                         \
        __asm__ volatile("mov %0, %%esp\n\t"                                  \
                         "push %%ebx\n\t"                                     \
                         "push %%eax\n\t"                                     \
                         "call guest_main\n" : : "i"(boot_stack + sizeof(boot_stack))); \
    }

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void putc_serial(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
        ;
    outb(COM1, (u8)c);
}

static inline void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}

static inline void put_hex(u64 v)
{
    puts_serial("0x");
    int started = 0;
    for (int i = 60; i >= 0; i -= 4) {
        u32 digit = (u32)(v >> i) & 0xf;
        if (digit || started || i == 0) {
            putc_serial("0123456789abcdef"[digit]);
            started = 1;
        }
    }
}

static inline void put_dec(u32 v)
{
    char buf[12];
    int i = 0;
    do { buf[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i)
        putc_serial(buf[--i]);
}

static inline __attribute__((noreturn)) void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* kvmm's own convention: a byte to port 0x501, kvmm exits with 64 + (v & 63). */
static inline __attribute__((noreturn)) void debug_exit(u8 status)
{
    outb(KVMM_DEBUG_EXIT, status);
    halt_forever();
}

static inline int str_eq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}
