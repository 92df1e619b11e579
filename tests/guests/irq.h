/* Interrupts for freestanding test guests: an IDT whose every vector has a handler (a
 * stray interrupt must not triple-fault), and the 8259A PICs remapped to 0x20-0x2f. */
#pragma once
#include "guest.h"

struct __attribute__((packed)) idt_entry { u16 off0, sel; u8 ist, attr; u16 off1; u32 off2, zero; };
struct frame;
typedef void (*irq_handler)(struct frame *);

static struct idt_entry idt[256] __attribute__((aligned(16)));

__attribute__((interrupt)) static void ignore_interrupt(struct frame *f) { (void)f; }

static inline void set_gate(int vec, irq_handler handler)
{
    u64 a = (u64)handler;
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    idt[vec] = (struct idt_entry){ (u16)a, cs, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0 };
}

/* Every vector ignored, then the IDT loaded; install real handlers with set_gate. */
static inline void idt_init(void)
{
    for (int v = 0; v < 256; v++)
        set_gate(v, ignore_interrupt);
    struct __attribute__((packed)) { u16 limit; u64 base; } r = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(r));
}

/* 8259A: ICW1-4, IRQs 0-7 on vectors 0x20-0x27, 8-15 on 0x28-0x2f; ``mask`` for the master
 * (a clear bit lets that IRQ through), the slave all masked. */
static inline void pic_init(u8 mask)
{
    outb(0x20, 0x11); outb(0x21, 0x20); outb(0x21, 0x04); outb(0x21, 0x01);
    outb(0xa0, 0x11); outb(0xa1, 0x28); outb(0xa1, 0x02); outb(0xa1, 0x01);
    outb(0x21, mask); outb(0xa1, 0xff);
}

static inline void pic_eoi(void) { outb(0x20, 0x20); }
