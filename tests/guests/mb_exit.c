/* Ends the VM through a debug-exit port as its command line says:
 * "<kernel> port=0xf4 width=4 value=0x5" writes 0x5 to port 0xf4 with a 32-bit out
 * (kvm-unit-tests' exit()). Either convention can be exercised: kvmm's port 0x501, or a
 * --debug-exit port with QEMU's. If the write does not end the VM, says so and halts. */
#include "mb.h"

MULTIBOOT_ENTRY

static u32 parse_hex(const char *s)
{
    u32 v = 0;
    if (s[0] == '0' && s[1] == 'x')
        s += 2;
    for (; *s && *s != ' '; s++)
        v = v * 16 + (u32)(*s <= '9' ? *s - '0' : (*s | 0x20) - 'a' + 10);
    return v;
}

static const char *find(const char *s, const char *key)
{
    for (; *s; s++) {
        const char *a = s, *k = key;
        while (*k && *a == *k)
            a++, k++;
        if (!*k)
            return a;
    }
    return 0;
}

__attribute__((noreturn)) void guest_main(u32 magic, struct mb_info *mbi)
{
    const char *cmdline = (const char *)mbi->cmdline;
    const char *port = find(cmdline, "port="), *width = find(cmdline, "width="), *value = find(cmdline, "value=");
    if (magic != MB_BOOTLOADER_MAGIC || !port || !width || !value) {
        puts_serial("usage: port=P width=1|2|4 value=V\n");
        halt_forever();
    }
    u16 p = (u16)parse_hex(port);
    u32 v = parse_hex(value);
    puts_serial("exiting\n");
    switch (parse_hex(width)) {
    case 1: outb(p, (u8)v); break;
    case 2: outw(p, (u16)v); break;
    default: outl(p, v); break;
    }
    puts_serial("still running\n");
    halt_forever();
}
