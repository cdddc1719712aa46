/*
 * udpcheck: guest-side checker for the migration tests (tests/migration.rs).
 *
 * Binds a UDP port and validates every datagram sent by udpsend.py. Payload
 * layout (little endian), see udpsend.py for the sender side:
 *
 *   0  u32 magic  0x55584656 ("VFXU")
 *   4  u32 len    total payload length, a function of seq (expect_len)
 *   8  u64 seq
 *  16  body       len - 20 bytes: pattern[(seq * 131 + i) & 0xffff]
 * len-4 u32 crc   CRC-32 (zlib) over bytes [0, len - 4)
 *
 * The body depends on seq, so a stale buffer holding another packet's bytes
 * is caught even where a checksum would happen to match.
 *
 * Counters are rewritten atomically (tmp file + rename) every interval and
 * on SIGTERM/SIGINT, as "key value" lines:
 *   received valid corrupt duplicate out_of_order max_seq unique gaps
 *   bad_size bad_magic bad_len bad_crc bad_content out_of_range
 *   uptime_ms last_valid_ms last_bad (description of the last corrupt one)
 *
 * With -s it sends that stream instead (guest to guest, tests/guest_switch.rs).
 *
 * Built `gcc -static -O2` by scripts/build-guest.sh into /bin/udpcheck.
 * It must never crash on bad input: every length is checked before use.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x55584656u
#define HDR 16
#define TRAILER 4
#define MIN_LEN 64
#define MAX_LEN 1400
#define PATTERN_SIZE 65536
/* Seqs tracked for duplicate/gap accounting: 2^24 is over two hours at
 * 2000 packets/s, in a 2 MiB bitmap. */
#define SEQ_LIMIT (1ull << 24)

static uint8_t pattern[PATTERN_SIZE];
static uint32_t crc_table[256];
static uint8_t *seen;
static volatile sig_atomic_t stop;
static uint64_t start_ms;

static struct {
    uint64_t received, valid, corrupt, duplicate, out_of_order, unique;
    uint64_t bad_size, bad_magic, bad_len, bad_crc, bad_content, out_of_range;
    int64_t max_seq; /* -1 before the first valid datagram */
    uint64_t last_valid_ms;
    char last_bad[160];
} st = {.max_seq = -1, .last_bad = "none"};

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* xorshift32 from a fixed seed: the same bytes as udpsend.py's pattern(). */
static void init_pattern(void)
{
    uint32_t x = 0x9e3779b9u;
    for (int i = 0; i < PATTERN_SIZE; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        pattern[i] = (uint8_t)(x >> 24);
    }
}

static void init_crc(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Payload length for seq; must match udpsend.py's expect_len(). */
static uint32_t expect_len(uint64_t seq)
{
    uint64_t h = (seq * 2654435761u) & 0xffffffffu;
    return MIN_LEN + (uint32_t)((h >> 8) % (MAX_LEN - MIN_LEN + 1));
}

static void bad(const char *why, uint64_t seq, size_t n, uint64_t *counter)
{
    (*counter)++;
    st.corrupt++;
    snprintf(st.last_bad, sizeof st.last_bad, "%s(seq=%llu,size=%zu,at_ms=%llu)", why,
             (unsigned long long)seq, n, (unsigned long long)(now_ms() - start_ms));
}

static void check(const uint8_t *p, size_t n)
{
    st.received++;
    if (n < HDR + TRAILER) {
        bad("size", 0, n, &st.bad_size);
        return;
    }
    uint64_t seq = get64(p + 8);
    if (get32(p) != MAGIC) {
        bad("magic", seq, n, &st.bad_magic);
        return;
    }
    uint32_t len = get32(p + 4);
    if (len != n) {
        bad("size", seq, n, &st.bad_size);
        return;
    }
    if (get32(p + n - TRAILER) != crc32(p, n - TRAILER)) {
        bad("crc", seq, n, &st.bad_crc);
        return;
    }
    /* Checksum fine but the packet must also be the one seq names. */
    if (len != expect_len(seq)) {
        bad("len", seq, n, &st.bad_len);
        return;
    }
    uint64_t off = seq * 131;
    for (size_t i = HDR; i < n - TRAILER; i++) {
        if (p[i] != pattern[(off + (i - HDR)) & (PATTERN_SIZE - 1)]) {
            bad("content", seq, n, &st.bad_content);
            return;
        }
    }
    st.valid++;
    st.last_valid_ms = now_ms();
    if (seq >= SEQ_LIMIT) {
        st.out_of_range++;
        return;
    }
    uint8_t bit = (uint8_t)(1u << (seq & 7));
    if (seen[seq >> 3] & bit) {
        st.duplicate++;
        return;
    }
    seen[seq >> 3] |= bit;
    st.unique++;
    if ((int64_t)seq < st.max_seq)
        st.out_of_order++;
    else
        st.max_seq = (int64_t)seq;
}

static void write_stats(const char *path, uint64_t start)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    uint64_t gaps = st.max_seq < 0 ? 0 : (uint64_t)(st.max_seq + 1) - st.unique;
    uint64_t now = now_ms();
    fprintf(f,
            "received %llu\nvalid %llu\ncorrupt %llu\nduplicate %llu\nout_of_order %llu\n"
            "max_seq %lld\nunique %llu\ngaps %llu\nbad_size %llu\nbad_magic %llu\n"
            "bad_len %llu\nbad_crc %llu\nbad_content %llu\nout_of_range %llu\n"
            "uptime_ms %llu\nlast_valid_ms %llu\nlast_bad %s\n",
            (unsigned long long)st.received, (unsigned long long)st.valid,
            (unsigned long long)st.corrupt, (unsigned long long)st.duplicate,
            (unsigned long long)st.out_of_order, (long long)st.max_seq,
            (unsigned long long)st.unique, (unsigned long long)gaps,
            (unsigned long long)st.bad_size, (unsigned long long)st.bad_magic,
            (unsigned long long)st.bad_len, (unsigned long long)st.bad_crc,
            (unsigned long long)st.bad_content, (unsigned long long)st.out_of_range,
            (unsigned long long)(now - start),
            (unsigned long long)(st.last_valid_ms ? st.last_valid_ms - start : 0), st.last_bad);
    if (fclose(f) == 0)
        rename(tmp, path);
}

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: udpcheck [-p PORT] [-o STATS_FILE] [-i INTERVAL_MS] [-b RCVBUF]\n"
                    "       udpcheck -s DST_IP [-p PORT] -n COUNT   (send, from another guest)\n");
    exit(2);
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* The sender's side, what udpsend.py sends, for guest-to-guest streams:
 * seqs 0..count-1, paced (a burst of 8, then 2 ms) so that no queue on the
 * way overflows on an emulated guest. Prints "sent N". */
static int send_stream(const char *ip, int port, long count)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (fd < 0 || inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
        fprintf(stderr, "udpcheck: bad address %s\n", ip);
        return 2;
    }
    static uint8_t buf[MAX_LEN];
    long sent = 0;
    for (long seq = 0; seq < count; seq++) {
        uint32_t len = expect_len((uint64_t)seq);
        put32(buf, MAGIC);
        put32(buf + 4, len);
        put32(buf + 8, (uint32_t)seq);
        put32(buf + 12, (uint32_t)((uint64_t)seq >> 32));
        uint64_t off = (uint64_t)seq * 131;
        for (size_t i = HDR; i < len - TRAILER; i++)
            buf[i] = pattern[(off + (i - HDR)) & (PATTERN_SIZE - 1)];
        put32(buf + len - TRAILER, crc32(buf, len - TRAILER));
        if (sendto(fd, buf, len, 0, (struct sockaddr *)&sa, sizeof sa) == (ssize_t)len)
            sent++;
        if (seq % 8 == 7)
            usleep(2000);
    }
    printf("sent %ld\n", sent);
    return 0;
}

int main(int argc, char **argv)
{
    int port = 5555, interval = 200, rcvbuf = 4 << 20, opt;
    const char *out = "/tmp/udpcheck.stats", *dst = NULL;
    long count = -1;
    while ((opt = getopt(argc, argv, "p:o:i:b:s:n:")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'o': out = optarg; break;
        case 'i': interval = atoi(optarg); break;
        case 'b': rcvbuf = atoi(optarg); break;
        case 's': dst = optarg; break;
        case 'n': count = atol(optarg); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || interval <= 0 || (dst && count < 0))
        usage();

    init_pattern();
    init_crc();
    if (dst)
        return send_stream(dst, port, count);
    seen = calloc(SEQ_LIMIT / 8, 1);
    if (!seen) {
        perror("udpcheck: calloc");
        return 1;
    }

    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("udpcheck: socket");
        return 1;
    }
    /* A large buffer so the checker, not the socket, is never the bottleneck
     * while TCG is slow; RCVBUFFORCE ignores rmem_max as root. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("udpcheck: bind");
        return 1;
    }

    struct sigaction sig = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sig, NULL);
    sigaction(SIGINT, &sig, NULL);
    signal(SIGPIPE, SIG_IGN);

    uint64_t start = start_ms = now_ms(), next = start;
    write_stats(out, start);
    printf("udpcheck: listening on udp port %d, stats in %s\n", port, out);
    fflush(stdout);

    static uint8_t buf[65536];
    while (!stop) {
        uint64_t now = now_ms();
        if (now >= next) {
            write_stats(out, start);
            next = now + (uint64_t)interval;
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, (int)(next - now));
        if (r < 0 && errno != EINTR)
            break;
        if (r <= 0)
            continue;
        /* Drain what is queued, but come back to the stats deadline. */
        for (int k = 0; k < 256; k++) {
            ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
            if (n < 0)
                break;
            /* MSG_TRUNC returns the real length; a datagram larger than the
             * buffer is corrupt by definition (the sender never sends one). */
            if ((size_t)n > sizeof buf) {
                st.received++;
                bad("size", 0, (size_t)n, &st.bad_size);
                continue;
            }
            check(buf, (size_t)n);
        }
    }
    write_stats(out, start);
    return 0;
}
