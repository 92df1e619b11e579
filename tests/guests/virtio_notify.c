/* Drives the virtio-blk device at PCI 00:01.0 through its legacy registers: one GET_ID
 * request, a queue notify, then HLT until the interrupt arrives. Built twice:
 *  - INTx (default): IOAPIC pin 16, level; the handler reads ISR (acknowledging it), EOIs.
 *  - USE_MSIX: MSI-X enabled in the capability, table entry 1 -> this CPU's vector,
 *    queue 0 bound to vector 1 through the legacy MSI registers (device config at 24).
 * Prints the serial and how the interrupt came; debug-exit 0x10 on success, 1 on failure. */
#include "virtio.h"

static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }

struct __attribute__((packed)) gate { u16 off_lo, sel; u8 ist, type; u16 off_mid; u32 off_hi, zero; };

static struct gate idt[256] __attribute__((aligned(16)));
static u8 ring[3 * 4096] __attribute__((aligned(4096)));
static struct __attribute__((packed)) { u32 type, reserved; u64 sector; } hdr;
static char serial[21];
static volatile u8 status = 0xee;
static volatile u16 iobase;
static volatile int interrupts;
static volatile u8 isr_seen;

#define VEC 0x40
#define LAPIC 0xfee00000UL
#define IOAPIC 0xfec00000UL
#define QSIZE_MAX 1024

struct interrupt_frame;
__attribute__((interrupt)) static void on_irq(struct interrupt_frame *frame)
{
    (void)frame;
#ifndef USE_MSIX
    isr_seen = inb(iobase + 19); /* read-to-clear: the device lowers its line */
#endif
    interrupts++;
    mmio_w32(LAPIC + 0xb0, 0); /* EOI: KVM resamples the level-triggered line */
}

ENTRY
{
    if ((pci_read(1, 0) & 0xffff) != 0x1af4) { puts_serial("no virtio device\n"); debug_exit(1); }
    iobase = pci_read(1, 0x10) & ~3u;

    u64 h = (u64)on_irq;
    idt[VEC] = (struct gate){ (u16)h, 0x10, 0, 0x8e, (u16)(h >> 16), (u32)(h >> 32), 0 };
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
    mmio_w32(LAPIC + 0xf0, 0x1ff); /* software-enable the LAPIC, spurious vector 0xff */
#ifdef USE_MSIX
    u64 table = pci_read(1, 0x14) & ~0xfUL;
    if ((pci_read(1, 0x40) & 0xff) != 0x11) { puts_serial("no MSI-X capability\n"); debug_exit(1); }
    outl(0xcf8, 0x80000000u | (1 << 11) | 0x40);
    outl(0xcfc, pci_read(1, 0x40) | 0x80000000u); /* MSI-X enable */
    mmio_w32(table + 16 + 0, LAPIC);   /* entry 1: message address (APIC 0) */
    mmio_w32(table + 16 + 4, 0);
    mmio_w32(table + 16 + 8, VEC);     /* message data: fixed delivery, vector VEC */
    mmio_w32(table + 16 + 12, 0);      /* unmask */
#else
    mmio_w32(IOAPIC, 0x10 + 2 * 16 + 1);
    mmio_w32(IOAPIC + 0x10, 0); /* destination APIC 0 */
    mmio_w32(IOAPIC, 0x10 + 2 * 16);
    mmio_w32(IOAPIC + 0x10, VEC | (1u << 15)); /* fixed, physical, active high, level, unmasked */
#endif

    outb(iobase + 18, 0);
    outb(iobase + 18, 1 | 2);
    outl(iobase + 4, 0); /* no optional features: plain interrupts */
    outw(iobase + 14, 0);
    u16 qsize = inw(iobase + 12);
    if (qsize == 0 || qsize > 256) { puts_serial("bad queue size\n"); debug_exit(1); }
    struct desc *d = (struct desc *)ring;
    volatile u16 *avail = (u16 *)(ring + 16 * qsize);
    u64 used_off = ((16 * qsize + 2 * (3 + qsize)) + 4095) & ~4095UL;
    volatile u16 *used = (u16 *)(ring + used_off);
    outl(iobase + 8, (u32)((u64)ring >> 12));
#ifdef USE_MSIX
    outw(iobase + 22, 1); /* queue 0 -> vector 1 */
    outw(iobase + 20, 0); /* config changes -> vector 0 */
    if (inw(iobase + 22) != 1) { puts_serial("queue vector refused\n"); debug_exit(1); }
#endif
    outb(iobase + 18, 1 | 2 | 4);

    hdr.type = 8; /* VIRTIO_BLK_T_GET_ID */
    d[0] = (struct desc){ (u64)&hdr, 16, 1, 1 };
    d[1] = (struct desc){ (u64)serial, 20, 1 | 2, 2 };
    d[2] = (struct desc){ (u64)&status, 1, 2, 0 };
    avail[2] = 0;
    __asm__ volatile("" ::: "memory");
    avail[1] = 1;
    outw(iobase + 16, 0); /* QUEUE_NOTIFY: an ioeventfd in KVM, no exit to kvmm */

    for (long spins = 0; interrupts == 0 && spins < 1000000; spins++)
        __asm__ volatile("sti; hlt; cli");
    if (interrupts == 0) { puts_serial("no interrupt\n"); debug_exit(1); }
    if (used[1] != 1 || status != 0) { puts_serial("request not completed\n"); debug_exit(1); }
    puts_serial("serial ");
    puts_serial(serial);
#ifdef USE_MSIX
    puts_serial(" msix");
#else
    puts_serial(" isr ");
    putc_serial((char)('0' + isr_seen));
#endif
    putc_serial('\n');
    debug_exit(0x10);
}
