/* Interrupt-driven UART output, as a tty driver does it: the guest enables the THR-empty
 * interrupt (IER bit 1) and halts; each interrupt (IRQ 4 through the PIC, vector 0x24)
 * writes the next byte of the message. kvmm must raise THRE after each write, which it
 * cannot do for a write queued in the coalesced ring: enabling the interrupt has to stop
 * the coalescing. Then a polled burst (interrupt disabled again: queued writes), and
 * debug-exit 0x23 (status 99). A lost interrupt leaves the guest halted: a timeout. */
#include "irq.h"

static const char message[] = "interrupt-driven output\n";
static volatile int next;

__attribute__((interrupt)) static void com1(struct frame *f)
{
    (void)f;
    u8 iir = inb(COM1 + 2);
    if ((iir & 0x0f) == 0x02) { /* THR empty */
        if (message[next])
            outb(COM1, (u8)message[next++]);
        else
            outb(COM1 + 1, 0); /* done: interrupts off */
    }
    pic_eoi();
}

ENTRY
{
    idt_init();
    set_gate(0x24, com1);
    pic_init(0xef);          /* only IRQ4, COM1 */
    outb(COM1 + 4, 0x08);    /* MCR.OUT2: the UART's interrupt reaches the PIC */
    __asm__ volatile("sti");
    outb(COM1 + 1, 0x02);    /* IER: THR empty; THR is empty, so it fires at once */
    /* Wait with interrupts off while testing, then "sti; hlt": the interrupt cannot slip
     * in between the test and the halt (sti takes effect after the next instruction). */
    for (;;) {
        __asm__ volatile("cli");
        if (!(inb(COM1 + 1) & 0x02)) /* the handler turns the interrupt off at the end */
            break;
        __asm__ volatile("sti; hlt");
    }
    __asm__ volatile("sti");
    for (int i = 0; i < 1000; i++) /* polled now: these writes may queue */
        outb(COM1, (u8)('0' + i % 10));
    outb(COM1, '\n');
    debug_exit(0x23);
}
