/*
 * vdpa_drive: a minimal userspace virtio-net driver over vhost-vdpa, for
 * the VDUSE test (tests/vduse.rs). It does what a guest behind a vIOMMU
 * does and a kernel driver cannot be made to do on purpose: it chooses the
 * IOVAs and the permission of every mapping (VHOST_IOTLB_UPDATE), and may
 * post a buffer the device must not use.
 *
 * vfrelay serves the device with `--backend loopback`, so a frame sent on
 * TX comes back on RX with its MAC addresses swapped.
 *
 *   vdpa_drive /dev/vhost-vdpa-N MODE
 *
 *   wo       RX buffer in a write-only mapping, TX frame in a read-only one;
 *            then a second TX buffer mapped while the device runs (an
 *            UPDATE_IOTLB under traffic).            -> "rx ok 2"
 *   ro-rx    RX buffer in a read-only mapping: the device must stop the RX
 *            queue, not write there.          -> "rx refused, memory untouched"
 *   past-eof TX buffer in a mapping of a file page past its end (touching
 *            it is SIGBUS): the device must stop the TX queue and live.
 *                                                    -> "tx refused"
 *
 * Exit 0 when the device did what the mode expects, 1 otherwise.
 * Built `gcc -static -O2` by scripts/build-guest.sh into /bin/vdpa_drive.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vhost.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define QSIZE 16
#define F_VERSION_1 (1ULL << 32)
#define F_ACCESS_PLATFORM (1ULL << 33)
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define HDR 12

/* IOVA layout (the device sees only these). */
#define IOVA_RINGS 0x100000ULL /* RW: rx ring at +0, tx ring at +0x4000 */
#define IOVA_TX 0x200000ULL    /* RO */
#define IOVA_RX 0x300000ULL    /* WO (mode wo) or RO (mode ro-rx) */
#define IOVA_TX2 0x400000ULL   /* RO, mapped while running */
#define IOVA_EOF 0x500000ULL   /* RO, second page past the file's end */

/* Offsets of the same things in our memfd. */
#define OFF_TX 0x10000
#define OFF_RX 0x20000
#define OFF_TX2 0x30000
#define MEM 0x40000

static int fd;
static uint8_t *mem;

static void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(2);
}

static void xioctl(unsigned long req, void *arg, const char *what)
{
    if (ioctl(fd, req, arg) < 0)
        die(what);
}

static void iotlb(uint64_t iova, uint64_t size, void *uaddr, uint8_t perm)
{
    struct vhost_msg_v2 m;
    memset(&m, 0, sizeof(m));
    m.type = VHOST_IOTLB_MSG_V2;
    m.iotlb.iova = iova;
    m.iotlb.size = size;
    m.iotlb.uaddr = (uint64_t)(uintptr_t)uaddr;
    m.iotlb.perm = perm;
    m.iotlb.type = VHOST_IOTLB_UPDATE;
    if (write(fd, &m, sizeof(m)) != sizeof(m))
        die("VHOST_IOTLB_UPDATE");
}

static void status(uint8_t s)
{
    xioctl(VHOST_VDPA_SET_STATUS, &s, "VHOST_VDPA_SET_STATUS");
}

struct ring {
    unsigned index;
    uint64_t iova; /* desc; avail at +0x1000, used at +0x2000 */
    uint8_t *host;
    uint16_t avail_idx;
    int kick;
};

static void ring_setup(struct ring *r)
{
    struct vhost_vring_state num = { r->index, QSIZE };
    xioctl(VHOST_SET_VRING_NUM, &num, "VHOST_SET_VRING_NUM");
    struct vhost_vring_state base = { r->index, 0 };
    xioctl(VHOST_SET_VRING_BASE, &base, "VHOST_SET_VRING_BASE");
    struct vhost_vring_addr a = {
        .index = r->index,
        .desc_user_addr = r->iova,
        .avail_user_addr = r->iova + 0x1000,
        .used_user_addr = r->iova + 0x2000,
    };
    xioctl(VHOST_SET_VRING_ADDR, &a, "VHOST_SET_VRING_ADDR");
    r->kick = eventfd(0, EFD_CLOEXEC);
    struct vhost_vring_file k = { r->index, r->kick };
    xioctl(VHOST_SET_VRING_KICK, &k, "VHOST_SET_VRING_KICK");
    int call = eventfd(0, EFD_CLOEXEC);
    struct vhost_vring_file c = { r->index, call };
    xioctl(VHOST_SET_VRING_CALL, &c, "VHOST_SET_VRING_CALL");
    struct vhost_vring_state en = { r->index, 1 };
    xioctl(VHOST_VDPA_SET_VRING_ENABLE, &en, "VHOST_VDPA_SET_VRING_ENABLE");
}

/* One descriptor chain of one buffer at `iova`, made available. */
static void post(struct ring *r, uint64_t iova, uint32_t len, int device_writes)
{
    uint16_t slot = r->avail_idx % QSIZE;
    volatile uint8_t *d = r->host + 16 * slot;
    uint16_t flags = device_writes ? 2 /* VRING_DESC_F_WRITE */ : 0;
    memcpy((void *)d, &iova, 8);
    memcpy((void *)(d + 8), &len, 4);
    memcpy((void *)(d + 12), &flags, 2);
    memset((void *)(d + 14), 0, 2);
    volatile uint16_t *avail = (volatile uint16_t *)(r->host + 0x1000);
    avail[2 + slot] = slot;
    __sync_synchronize();
    avail[1] = ++r->avail_idx;
    __sync_synchronize();
    uint64_t one = 1;
    if (write(r->kick, &one, 8) != 8)
        die("kick");
}

static uint16_t used_idx(struct ring *r)
{
    return *(volatile uint16_t *)(r->host + 0x2000 + 2);
}

static uint32_t used_len(struct ring *r, uint16_t i)
{
    return *(volatile uint32_t *)(r->host + 0x2000 + 4 + 8 * (i % QSIZE) + 4);
}

/* Waits up to `ms` for the used index to reach `want`. */
static int wait_used(struct ring *r, uint16_t want, int ms)
{
    for (int i = 0; i < ms / 10; i++) {
        if (used_idx(r) == want)
            return 1;
        usleep(10000);
    }
    return used_idx(r) == want;
}

static void frame(uint8_t *p, uint8_t seed)
{
    memset(p, 0, HDR);
    uint8_t *f = p + HDR;
    const uint8_t dst[6] = { 2, 0, 0, 0, 0, 1 }, src[6] = { 2, 0, 0, 0, 0, 2 };
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x88;
    f[13] = 0xb5; /* local experimental ethertype */
    for (int i = 14; i < 200; i++)
        f[i] = (uint8_t)(i * 7 + seed);
}

/* The echo of frame(seed) in an RX buffer: same payload, MACs swapped. */
static int is_echo(const uint8_t *rx, uint8_t seed)
{
    uint8_t want[HDR + 200];
    frame(want, seed);
    return memcmp(rx + HDR, want + HDR + 6, 6) == 0 && memcmp(rx + HDR + 12, want + HDR + 12, 188) == 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s /dev/vhost-vdpa-N wo|ro-rx|past-eof\n", argv[0]);
        return 2;
    }
    const char *mode = argv[2];
    fd = open(argv[1], O_RDWR);
    if (fd < 0)
        die(argv[1]);
    xioctl(VHOST_SET_OWNER, NULL, "VHOST_SET_OWNER");
    uint64_t bf = 1ULL << VHOST_BACKEND_F_IOTLB_MSG_V2;
    xioctl(VHOST_SET_BACKEND_FEATURES, &bf, "VHOST_SET_BACKEND_FEATURES");

    /* Our "guest memory": a shared memfd (vhost-vdpa hands VDUSE the file
     * behind each mapping). */
    int mfd = memfd_create("vdpa-drive", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, MEM) < 0)
        die("memfd");
    mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    memset(mem, 0, MEM);

    status(S_ACK | S_DRIVER);
    uint64_t dev_features;
    xioctl(VHOST_GET_FEATURES, &dev_features, "VHOST_GET_FEATURES");
    uint64_t features = dev_features & (F_VERSION_1 | F_ACCESS_PLATFORM);
    xioctl(VHOST_SET_FEATURES, &features, "VHOST_SET_FEATURES");
    status(S_ACK | S_DRIVER | S_FEATURES_OK);

    iotlb(IOVA_RINGS, 0x8000, mem, VHOST_ACCESS_RW);
    iotlb(IOVA_TX, 0x1000, mem + OFF_TX, VHOST_ACCESS_RO);
    int rx_perm = strcmp(mode, "ro-rx") == 0 ? VHOST_ACCESS_RO : VHOST_ACCESS_WO;
    iotlb(IOVA_RX, 0x1000, mem + OFF_RX, rx_perm);
    if (strcmp(mode, "past-eof") == 0) {
        /* Two pages mapped of a one-page file: the second has no backing. */
        int efd = memfd_create("vdpa-drive-eof", MFD_CLOEXEC);
        if (efd < 0 || ftruncate(efd, 0x1000) < 0)
            die("memfd");
        uint8_t *e = mmap(NULL, 0x2000, PROT_READ | PROT_WRITE, MAP_SHARED, efd, 0);
        if (e == MAP_FAILED)
            die("mmap");
        iotlb(IOVA_EOF, 0x2000, e, VHOST_ACCESS_RO);
    }

    struct ring rx = { 0, IOVA_RINGS, mem, 0, -1 };
    struct ring tx = { 1, IOVA_RINGS + 0x4000, mem + 0x4000, 0, -1 };
    ring_setup(&rx);
    ring_setup(&tx);
    status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    int ok = 0;
    if (strcmp(mode, "wo") == 0) {
        post(&rx, IOVA_RX, 2048, 1);
        frame(mem + OFF_TX, 1);
        post(&tx, IOVA_TX, HDR + 200, 0);
        if (!wait_used(&tx, 1, 3000) || !wait_used(&rx, 1, 3000)) {
            printf("no echo (tx used %u, rx used %u)\n", used_idx(&tx), used_idx(&rx));
            return 1;
        }
        if (used_len(&rx, 0) != HDR + 200 || !is_echo(mem + OFF_RX, 1)) {
            printf("bad echo, len %u\n", used_len(&rx, 0));
            return 1;
        }
        /* A mapping added under traffic, and the old ones still used. */
        iotlb(IOVA_TX2, 0x1000, mem + OFF_TX2, VHOST_ACCESS_RO);
        memset(mem + OFF_RX, 0, 0x1000);
        post(&rx, IOVA_RX, 2048, 1);
        frame(mem + OFF_TX2, 2);
        post(&tx, IOVA_TX2, HDR + 200, 0);
        if (!wait_used(&tx, 2, 3000) || !wait_used(&rx, 2, 3000) || !is_echo(mem + OFF_RX, 2)) {
            printf("no second echo (tx used %u, rx used %u)\n", used_idx(&tx), used_idx(&rx));
            return 1;
        }
        printf("rx ok 2\n");
        ok = 1;
    } else if (strcmp(mode, "ro-rx") == 0) {
        memset(mem + OFF_RX, 0xa5, 0x1000);
        post(&rx, IOVA_RX, 2048, 1);
        frame(mem + OFF_TX, 3);
        post(&tx, IOVA_TX, HDR + 200, 0);
        int tx_done = wait_used(&tx, 1, 3000);
        int rx_used = wait_used(&rx, 1, 1000);
        int untouched = 1;
        for (int i = 0; i < 0x1000; i++)
            untouched &= mem[OFF_RX + i] == 0xa5;
        printf("tx used %d, rx used %d, memory %s\n", tx_done, rx_used,
               untouched ? "untouched" : "written");
        if (tx_done && !rx_used && untouched) {
            printf("rx refused, memory untouched\n");
            ok = 1;
        }
    } else if (strcmp(mode, "past-eof") == 0) {
        post(&rx, IOVA_RX, 2048, 1);
        post(&tx, IOVA_EOF + 0x1000, HDR + 200, 0);
        int tx_used = wait_used(&tx, 1, 2000);
        printf("tx used %d\n", tx_used);
        if (!tx_used) {
            printf("tx refused\n");
            ok = 1;
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    /* Closing resets the device (vhost_vdpa_release). */
    close(fd);
    return ok ? 0 : 1;
}
