/* The snapshot test guest: counts timer interrupts and does virtio-blk I/O on each.
 *
 * The PIT (channel 0, mode 2, 100 Hz) interrupts through the PIC on vector 0x20. On each
 * new tick the main loop advances n, prints "tick n", writes sector n of the virtio-blk
 * disk at 00:01.0 with the value n repeated, reads sector n-1 back and checks it holds
 * n-1. A restored snapshot continues the sequence exactly: the console of the first run
 * followed by the console of the restored run reads "tick 1" ... "tick END-1" with no
 * gap or repeat. Ends with debug-exit 0x21 (status 97); "bad sector" and exit 1 on a
 * mismatch. Interrupt-driven timing, polled I/O (the used ring, no virtio interrupts). */
#include "irq.h"
#include "virtio_blk.h"


#ifndef END
#define END 400
#endif
#define PIT_HZ 1193182
#define TICK_HZ 100

static volatile u64 ticks;

__attribute__((interrupt)) static void timer(struct frame *f)
{
    (void)f;
    ticks++;
    pic_eoi();
}

static void fail(const char *why, u64 n)
{
    puts_serial(why);
    putc_serial(' ');
    put_dec(n);
    putc_serial('\n');
    debug_exit(1);
}

ENTRY
{
    blk_start();

    idt_init();
    set_gate(0x20, timer);
    pic_init(0xfe); /* only IRQ0, the PIT */
    /* 8254 channel 0, lobyte/hibyte, mode 2 (rate generator). */
    outb(0x43, 0x34);
    outb(0x40, (PIT_HZ / TICK_HZ) & 0xff);
    outb(0x40, (PIT_HZ / TICK_HZ) >> 8);
    __asm__ volatile("sti");

    u64 seen = ticks;
    for (u64 n = 1; n < END; n++) {
        while (ticks == seen)
            __asm__ volatile("pause" ::: "memory");
        seen = ticks;
        puts_serial("tick ");
        put_dec(n);
        putc_serial('\n');
        for (int i = 0; i < 64; i++)
            blk_data[i] = n;
        if (blk_request(VIRTIO_BLK_T_OUT, n) != 0)
            fail("write failed", n);
        if (blk_request(VIRTIO_BLK_T_IN, n - 1) != 0)
            fail("read failed", n);
        for (int i = 0; i < 64; i++)
            if (blk_data[i] != n - 1)
                fail("bad sector", n - 1);
    }
    debug_exit(0x21);
}
