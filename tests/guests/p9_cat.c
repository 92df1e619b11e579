/* A 9P2000.L client over the virtio-9p device at 00:01.0 (polled, one request at a
 * time): prints the mount tag from the config space, then Tversion, Tattach, walks to
 * "hello.txt", opens and reads it (the reply in Linux's zero-copy layout: an 11-byte
 * header buffer, then a data buffer) and prints its contents; then asks for ".." at the
 * root, which must be refused (Rlerror), and for "escape" (a symlink out of the share),
 * which must not open. Ends with debug-exit 0x33 (status 115), or exit 1 with the step. */
#include "virtio.h"

static u8 ring[3 * 4096] __attribute__((aligned(4096)));
static u8 req[512];
static u8 rep_hdr[11];
static u8 rep[4096];
static struct vq vq;
static u32 len;
static u16 tag;

static void put(u64 v, int n) { for (int i = 0; i < n; i++) req[len++] = (u8)(v >> (8 * i)); }
static void put_str(const char *s) { u16 n = 0; while (s[n]) n++; put(n, 2); for (u16 i = 0; i < n; i++) req[len++] = (u8)s[i]; }
static void begin(u8 type) { len = 0; put(0, 4); put(type, 1); put(++tag, 2); }
static u32 get32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }

/* Send the request built in req[]; the reply's type (7: Rlerror). The reply lands in
 * rep_hdr (11 bytes) then rep. */
static u8 rpc(void)
{
    struct desc *d = (struct desc *)ring;
    req[0] = (u8)len, req[1] = (u8)(len >> 8), req[2] = 0, req[3] = 0;
    d[0] = (struct desc){ (u64)req, len, 1, 1 };
    d[1] = (struct desc){ (u64)rep_hdr, sizeof(rep_hdr), 1 | 2, 2 };
    d[2] = (struct desc){ (u64)rep, sizeof(rep), 2, 0 };
    vq_run_chain(&vq, 0);
    return rep_hdr[4];
}

static void expect(u8 got, u8 want, const char *step)
{
    if (got != want) {
        puts_serial("9p step failed: ");
        puts_serial(step);
        puts_serial(", reply type ");
        put_dec(got);
        putc_serial('\n');
        debug_exit(1);
    }
}

ENTRY
{
    virtio_start_queue0(ring, &vq);
    u16 tag_len = inw(vq.iobase + 20);
    puts_serial("tag: ");
    for (u16 i = 0; i < tag_len && i < 64; i++)
        putc_serial((char)inb(vq.iobase + 22 + i));
    putc_serial('\n');

    begin(100); put(8192, 4); put_str("9P2000.L");
    expect(rpc(), 101, "version");
    begin(104); put(0, 4); put(~0u, 4); put_str("guest"); put_str(""); put(0, 4);
    expect(rpc(), 105, "attach");
    begin(110); put(0, 4); put(1, 4); put(1, 2); put_str("hello.txt");
    expect(rpc(), 111, "walk");
    begin(12); put(1, 4); put(0, 4);
    expect(rpc(), 13, "lopen");
    begin(116); put(1, 4); put(0, 8); put(200, 4);
    expect(rpc(), 117, "read");
    u32 n = get32(rep_hdr + 7);
    puts_serial("read: ");
    for (u32 i = 0; i < n && i < sizeof(rep); i++)
        putc_serial((char)rep[i]);

    begin(110); put(0, 4); put(2, 4); put(1, 2); put_str("..");
    expect(rpc(), 7, "dotdot refused");
    puts_serial("dotdot refused: errno ");
    put_dec(get32(rep_hdr + 7));
    putc_serial('\n');
    begin(110); put(0, 4); put(3, 4); put(1, 2); put_str("escape");
    expect(rpc(), 111, "walk to the symlink");
    begin(12); put(3, 4); put(0, 4);
    expect(rpc(), 7, "symlink not opened");
    puts_serial("symlink not opened: errno ");
    put_dec(get32(rep_hdr + 7));
    putc_serial('\n');
    debug_exit(0x33);
}
