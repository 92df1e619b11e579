/* Helpers for freestanding test guests (no libc; x86-64, long mode, ring 0). */
#pragma once
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3f8
#define DEBUG_EXIT 0x501

#define ENTRY __attribute__((section(".text.start"), noreturn)) void _start(void)

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
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
    for (int i = 60; i >= 0; i -= 4)
        putc_serial("0123456789abcdef"[(v >> i) & 0xf]);
}

static inline void put_dec(u64 v)
{
    char buf[24];
    int i = 0;
    do { buf[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i)
        putc_serial(buf[--i]);
}

static inline __attribute__((noreturn)) void debug_exit(u8 status)
{
    outb(DEBUG_EXIT, status);
    for (;;)
        __asm__ volatile("cli; hlt");
}
