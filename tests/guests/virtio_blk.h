/* A polled virtio-blk driver for test guests: one 512-byte sector per request through
 * queue 0 of the device at 00:01.0 (virtio 0.9.5, appendix D: header, data, status). */
#pragma once
#include "virtio.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4

static u8 blk_ring[3 * 4096] __attribute__((aligned(4096)));
static struct __attribute__((packed)) { u32 type, reserved; u64 sector; } blk_hdr;
static u64 blk_data[64]; /* the sector: written by OUT, filled by IN */
static volatile u8 blk_status;
static struct vq blk_vq;

static inline void blk_start(void) { virtio_start_queue0(blk_ring, &blk_vq); }

/* One request of ``type`` for ``sector`` (a FLUSH carries no data); the device's status. */
static inline u8 blk_request(u32 type, u64 sector)
{
    struct desc *d = (struct desc *)blk_ring;
    blk_hdr.type = type;
    blk_hdr.sector = sector;
    blk_status = 0xee;
    d[0] = (struct desc){ (u64)&blk_hdr, 16, 1, 1 };
    if (type == VIRTIO_BLK_T_FLUSH)
        d[0].next = 2;
    else /* NEXT, and WRITE (the device writes) for IN */
        d[1] = (struct desc){ (u64)blk_data, sizeof(blk_data), type == VIRTIO_BLK_T_IN ? 1 | 2 : 1, 2 };
    d[2] = (struct desc){ (u64)&blk_status, 1, 2, 0 };
    vq_run_chain(&blk_vq, 0);
    return blk_status;
}
