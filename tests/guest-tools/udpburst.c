/*
 * udpburst: counts UDP datagrams across a link, for the VDUSE test
 * (tests/vduse.rs). Each datagram carries a 32-bit sequence number.
 *
 *   udpburst send DST_IP PORT COUNT SIZE   paced sender; prints "sent N"
 *   udpburst recv PORT COUNT IDLE_SECS     prints "received N unique U"
 *                                          when COUNT unique arrived or
 *                                          nothing came for IDLE_SECS
 *
 * The sender sets SO_NO_CHECK (UDP checksum 0, valid for IPv4): a veth with
 * TX checksum offload would otherwise hand AF_XDP frames whose checksum was
 * never filled in, and the guest has no ethtool to turn that off.
 *
 * Built `gcc -static -O2` by scripts/build-guest.sh into /bin/udpburst.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_NO_CHECK
#define SO_NO_CHECK 11
#endif

static int do_send(const char *ip, int port, long count, int size)
{
    if (size < 4 || size > 65000) {
        fprintf(stderr, "bad size %d\n", size);
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_NO_CHECK, &one, sizeof(one));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", ip);
        return 2;
    }
    char *buf = calloc(1, size);
    long sent = 0;
    for (uint32_t seq = 0; seq < count; seq++) {
        memcpy(buf, &seq, 4);
        if (sendto(s, buf, size, 0, (struct sockaddr *)&a, sizeof(a)) == size)
            sent++;
        /* Paced: a burst of 8, then a pause, so no ring or socket queue on
         * the way overflows on a one-CPU emulated guest. */
        if (seq % 8 == 7)
            usleep(2000);
    }
    printf("sent %ld\n", sent);
    return 0;
}

static int do_recv(int port, long count, int idle)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int rcv = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
        perror("bind");
        return 1;
    }
    uint8_t *seen = calloc(count, 1);
    long received = 0, unique = 0;
    char buf[65536];
    printf("listening\n");
    fflush(stdout);
    while (unique < count) {
        struct pollfd p = { .fd = s, .events = POLLIN };
        if (poll(&p, 1, idle * 1000) <= 0)
            break;
        ssize_t n = recv(s, buf, sizeof(buf), 0);
        if (n < 4)
            continue;
        received++;
        uint32_t seq;
        memcpy(&seq, buf, 4);
        if (seq < count && !seen[seq]) {
            seen[seq] = 1;
            unique++;
        }
    }
    printf("received %ld unique %ld\n", received, unique);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "send"))
        return do_send(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
    if (argc == 5 && !strcmp(argv[1], "recv"))
        return do_recv(atoi(argv[2]), atol(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: udpburst send IP PORT COUNT SIZE | recv PORT COUNT IDLE_SECS\n");
    return 2;
}
