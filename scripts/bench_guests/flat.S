/* A 64 KiB flat image every VMM can start: QEMU maps it as the BIOS (-bios: the CPU starts
 * at the reset vector F000:FFF0, which jumps to offset 0), kvmtool loads it as a flat
 * kernel (-k: entered at offset 0 in real mode). Built twice: without SERIAL it resets
 * the machine through the i8042 at once (start-up time); with SERIAL it first writes
 * 65536 bytes to COM1's THR, one port write (one VM exit) each, as fast as the VMM lets
 * it, with no LSR polling. Position-independent: only port I/O and a relative loop. */
    .code16
    .text
    .globl _start
_start:
    cli
#ifdef SERIAL
    mov $0x3f8, %dx
    xor %cx, %cx            /* 65536 iterations */
1:  mov $'x', %al
    out %al, %dx
    loop 1b
#endif
    mov $0xfe, %al          /* i8042 pulse reset */
    out %al, $0x64
2:  hlt
    jmp 2b

    .org 0xfff0
reset_vector:
    ljmp $0xf000, $0x0000
    .org 0x10000
