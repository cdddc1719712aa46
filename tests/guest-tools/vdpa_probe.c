/*
 * vdpa_probe: reads what a vhost-vdpa device says about itself, for the
 * VDUSE test (tests/vduse.rs): device id, device features, the virtio-net
 * config space (MAC, status, MTU) and queue 0's vring base (which makes the
 * kernel ask the VDUSE daemon for the queue state: GET_VQ_STATE).
 *
 *   vdpa_probe /dev/vhost-vdpa-0
 *   -> device_id 1
 *      features 0x...
 *      mac 52:54:00:..
 *      mtu 1500
 *      vring_base0 0
 *
 * Built `gcc -static -O2` by scripts/build-guest.sh into /bin/vdpa_probe.
 */
#include <fcntl.h>
#include <linux/vhost.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s /dev/vhost-vdpa-N\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    if (ioctl(fd, VHOST_SET_OWNER) < 0)
        perror("VHOST_SET_OWNER");

    uint32_t id = 0;
    if (ioctl(fd, VHOST_VDPA_GET_DEVICE_ID, &id) < 0) {
        perror("VHOST_VDPA_GET_DEVICE_ID");
        return 1;
    }
    printf("device_id %u\n", id);

    uint64_t features = 0;
    if (ioctl(fd, VHOST_GET_FEATURES, &features) < 0) {
        perror("VHOST_GET_FEATURES");
        return 1;
    }
    printf("features 0x%llx\n", (unsigned long long)features);

    /* virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu. */
    struct {
        struct vhost_vdpa_config hdr;
        uint8_t buf[12];
    } cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.hdr.off = 0;
    cfg.hdr.len = sizeof(cfg.buf);
    if (ioctl(fd, VHOST_VDPA_GET_CONFIG, &cfg) < 0) {
        perror("VHOST_VDPA_GET_CONFIG");
        return 1;
    }
    const uint8_t *b = cfg.hdr.buf;
    printf("mac %02x:%02x:%02x:%02x:%02x:%02x\n", b[0], b[1], b[2], b[3], b[4], b[5]);
    printf("status %u\n", b[6] | b[7] << 8);
    printf("mtu %u\n", b[10] | b[11] << 8);

    struct vhost_vring_state st = { .index = 0, .num = 0 };
    if (ioctl(fd, VHOST_GET_VRING_BASE, &st) < 0) {
        perror("VHOST_GET_VRING_BASE");
        return 1;
    }
    printf("vring_base0 %u\n", st.num);
    close(fd);
    return 0;
}
