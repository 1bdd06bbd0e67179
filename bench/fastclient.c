/* fastclient: the bench's lightest websocket clients (--client-impl c), in C.
 *
 * On the 2-core bench machine the client processes share the cores with the relay, and a Python client spends
 * about twice the kernel's own cost of a read() on every frame it parses: with 10,000 clients their reads, not the
 * relay's sends, decide when the last client has a batch. These clients cost little more than the read() itself,
 * as send_floor.py's receivers do, so fan-out figures measure the relay.
 *
 * Usage: fastclient HOST PORT LIFETIME_S [POLL_MS], then commands on stdin, one JSON answer line each on stdout.
 * With POLL_MS > 0 the clients sleep POLL_MS between sweeps of every socket instead of waiting in epoll_wait, so
 * one read() takes whatever a socket got meanwhile (throughput runs, where the clients' own CPU must stay small);
 * arrival times are then up to POLL_MS late. Commands:
 *   connect CONCURRENCY COUNT   followed by COUNT lines "PATH?QUERY": open them (upgrade, then the welcome and one
 *                               ack per channel= in the query) -> {"ok":N,"failed":N,"errors":{...},"seconds":S}
 *   reset                       forget what was received -> {"ok":true}
 *   collect                     -> {"frames":N,"other":N,"closed":{"CODE":N},"by_seq":[[channel,seq,count,
 *                               first,last,first_key,keys],...]}: notify frames per (channel, seq), arrival times
 *                               on CLOCK_MONOTONIC (Python's time.monotonic())
 *   stop, or end of input       exit
 * Pings are answered with pongs. The process exits by itself after LIFETIME_S.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { UPGRADING, GREETING, OPEN, CLOSED };
#define STDIN_SLOT 0xffffffffu /* epoll's data for fd 0, the commands */

typedef struct {
    int fd, state, acks_wanted, acks, welcomed;
    char *buf;
    size_t len, cap;
} conn_t;

typedef struct {
    char channel[64], key[64];
    long seq, count, keys;
    double first, last;
} batch_t;

static conn_t *conns;
static int nconns, capconns, epfd;
static batch_t *batches;
static long nbatches, capbatches, frames, other;
static long closed_codes[5000];
static struct sockaddr_in relay;
static char host_header[128];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void copy_field(const char *data, size_t len, const char *name, char *out, size_t outlen) {
    /* the string after name (e.g. "\"channel\":\""), up to its closing quote */
    out[0] = 0;
    const char *at = memmem(data, len, name, strlen(name));
    if (!at) return;
    at += strlen(name);
    const char *end = memchr(at, '"', data + len - at);
    if (!end) return;
    size_t n = (size_t)(end - at) < outlen - 1 ? (size_t)(end - at) : outlen - 1;
    memcpy(out, at, n);
    out[n] = 0;
}

static void on_notify(const char *data, size_t len, double arrival) {
    char channel[64], key[64];
    frames++;
    copy_field(data, len, "\"channel\":\"", channel, sizeof channel);
    copy_field(data, len, "\"keys\":[\"", key, sizeof key);
    const char *at = memmem(data, len, "\"seq\":", 6);
    long seq = at ? strtol(at + 6, NULL, 10) : -1;
    long keys = 0;
    const char *list = memmem(data, len, "\"keys\":[", 8);
    if (list)
        for (const char *p = list + 8; p < data + len && *p != ']'; p++) keys += *p == ',';
    if (list && key[0]) keys++;
    /* frames of one batch arrive together: look back a little, else a new batch */
    for (long i = nbatches - 1; i >= 0 && i >= nbatches - 256; i--) {
        batch_t *b = &batches[i];
        if (b->seq == seq && strcmp(b->channel, channel) == 0) {
            b->count++;
            if (arrival > b->last) b->last = arrival;
            return;
        }
    }
    if (nbatches == capbatches) {
        capbatches = capbatches ? capbatches * 2 : 1024;
        batches = realloc(batches, capbatches * sizeof *batches);
    }
    batch_t *b = &batches[nbatches++];
    memcpy(b->channel, channel, sizeof channel);
    memcpy(b->key, key, sizeof key);
    b->seq = seq;
    b->count = 1;
    b->keys = keys;
    b->first = b->last = arrival;
}

static void drop(conn_t *c, int code) {
    if (c->state == CLOSED) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
    closed_codes[code >= 0 && code < 5000 ? code : 1006]++;
}

static void on_text(conn_t *c, const char *data, size_t len, double arrival) {
    if (c->state == OPEN) {
        if (memmem(data, len < 40 ? len : 40, "\"notify\"", 8))
            on_notify(data, len, arrival);
        else
            other++;
    } else if (memmem(data, len, "\"type\":\"welcome\"", 16)) {
        c->welcomed = 1;
    } else if (memmem(data, len, "\"type\":\"ack\"", 12)) {
        c->acks++;
    } else {
        drop(c, 1002); /* an error frame while connecting */
        return;
    }
    if (c->state == GREETING && c->welcomed && c->acks >= c->acks_wanted) c->state = OPEN;
}

static void frames_in(conn_t *c, double arrival) {
    size_t at = 0;
    while (c->len - at >= 2) {
        unsigned char *h = (unsigned char *)c->buf + at;
        int opcode = h[0] & 0x0f;
        size_t plen = h[1] & 0x7f, hdr = 2;
        if (plen == 126) {
            if (c->len - at < 4) break;
            plen = (size_t)h[2] << 8 | h[3];
            hdr = 4;
        } else if (plen == 127) {
            if (c->len - at < 10) break;
            plen = 0;
            for (int i = 2; i < 10; i++) plen = plen << 8 | h[i];
            hdr = 10;
        }
        if (plen > (1u << 24)) { /* no relay frame is this large: the stream is broken */
            drop(c, 1009);
            return;
        }
        if (c->len - at < hdr + plen) break;
        const char *payload = c->buf + at + hdr;
        if (opcode == 1) {
            on_text(c, payload, plen, arrival);
        } else if (opcode == 9 && plen <= 125) { /* ping: a pong, masked with key 0 */
            unsigned char pong[131] = {0x8a, (unsigned char)(0x80 | plen), 0, 0, 0, 0};
            memcpy(pong + 6, payload, plen);
            if (write(c->fd, pong, 6 + plen) < 0) { /* the next read sees the error */ }
        } else if (opcode == 8) {
            drop(c, plen >= 2 ? ((unsigned char)payload[0] << 8 | (unsigned char)payload[1]) : 1005);
            return;
        }
        if (c->state == CLOSED) return;
        at += hdr + plen;
    }
    memmove(c->buf, c->buf + at, c->len - at);
    c->len -= at;
}

static void readable(conn_t *c) {
    if (c->state == CLOSED) return; /* closed earlier in this round of events; its fd may be another's now */
    for (;;) {
        if (c->cap - c->len < 65536) {
            c->cap = c->len + 65536;
            c->buf = realloc(c->buf, c->cap);
        }
        ssize_t n = read(c->fd, c->buf + c->len, c->cap - c->len);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) {
            drop(c, 1006);
            return;
        }
        double arrival = now();
        c->len += (size_t)n;
        if (c->state == UPGRADING) {
            char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (!end) continue;
            if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0) {
                drop(c, 1002);
                return;
            }
            size_t head = (size_t)(end + 4 - c->buf);
            memmove(c->buf, c->buf + head, c->len - head);
            c->len -= head;
            c->state = GREETING;
        }
        frames_in(c, arrival);
        if (c->state == CLOSED || (size_t)n < 65536) return;
    }
}

static int open_one(const char *target) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&relay, sizeof relay) < 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char request[4096];
    int n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     target, host_header);
    if (n <= 0 || n >= (int)sizeof request || write(fd, request, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    if (nconns == capconns) {
        capconns = capconns ? capconns * 2 : 1024;
        conns = realloc(conns, capconns * sizeof *conns);
    }
    conn_t *c = &conns[nconns];
    memset(c, 0, sizeof *c);
    c->fd = fd;
    c->state = UPGRADING;
    for (const char *p = target; (p = strstr(p, "channel=")); p += 8) c->acks_wanted++;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)nconns};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    return nconns++;
}

static void pump(int timeout_ms) {
    struct epoll_event events[1024];
    int n = epoll_wait(epfd, events, 1024, timeout_ms);
    for (int i = 0; i < n; i++)
        if (events[i].data.u32 != STDIN_SLOT) readable(&conns[events[i].data.u32]); /* commands wait meanwhile */
}

static void connect_all(int concurrency, int count, FILE *in) {
    double started = now();
    int first = nconns, failed = 0, ok = 0;
    char line[4096];
    for (int done = 0; done < count;) {
        int pending = 0;
        for (int i = first; i < nconns; i++) pending += conns[i].state == UPGRADING || conns[i].state == GREETING;
        while (done < count && pending < concurrency) {
            if (!fgets(line, sizeof line, in)) {
                count = done;
                break;
            }
            line[strcspn(line, "\r\n")] = 0;
            if (open_one(line) < 0) failed++;
            done++;
            pending++;
        }
        pump(10);
    }
    double deadline = now() + 30;
    for (;;) {
        int pending = 0;
        for (int i = first; i < nconns; i++) pending += conns[i].state == UPGRADING || conns[i].state == GREETING;
        if (!pending || now() > deadline) break;
        pump(10);
    }
    for (int i = first; i < nconns; i++) {
        if (conns[i].state == OPEN) ok++;
        else {
            failed++;
            drop(&conns[i], 1006);
        }
    }
    if (failed)
        printf("{\"ok\":%d,\"failed\":%d,\"errors\":{\"refused, closed or not open within 30 s\":%d},"
               "\"seconds\":%.3f}\n", ok, failed, failed, now() - started);
    else
        printf("{\"ok\":%d,\"failed\":0,\"errors\":{},\"seconds\":%.3f}\n", ok, now() - started);
    fflush(stdout);
}

static void collect(void) {
    printf("{\"frames\":%ld,\"other\":%ld,\"closed\":{", frames, other);
    const char *sep = "";
    for (int code = 0; code < 5000; code++)
        if (closed_codes[code]) {
            printf("%s\"%d\":%ld", sep, code, closed_codes[code]);
            sep = ",";
        }
    printf("},\"by_seq\":[");
    for (long i = 0; i < nbatches; i++) {
        batch_t *b = &batches[i];
        printf("%s[\"%s\",%ld,%ld,%.6f,%.6f,\"%s\",%ld]", i ? "," : "", b->channel, b->seq, b->count, b->first,
               b->last, b->key, b->keys);
    }
    printf("]}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: fastclient HOST PORT LIFETIME_S [POLL_MS]\n");
        return 2;
    }
    relay.sin_family = AF_INET;
    relay.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &relay.sin_addr) != 1) {
        fprintf(stderr, "fastclient: %s is not an IPv4 address\n", argv[1]);
        return 2;
    }
    snprintf(host_header, sizeof host_header, "%s:%s", argv[1], argv[2]);
    alarm((unsigned)atoi(argv[3])); /* never outlive the bench */
    signal(SIGPIPE, SIG_IGN);         /* a pong to a reset socket: that client is gone, not the process */
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_SLOT};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    FILE *in = fdopen(0, "r");
    setvbuf(in, NULL, _IONBF, 0); /* epoll watches fd 0: no line may wait unseen in stdio's buffer */
    char line[256];
    long poll_ms = argc == 5 ? atol(argv[4]) : 0;
    struct timespec pause = {poll_ms / 1000, (poll_ms % 1000) * 1000000L};
    for (;;) {
        struct epoll_event events[1024];
        int n = epoll_wait(epfd, events, 1024, poll_ms ? 0 : -1);
        if (poll_ms && n < 1024) nanosleep(&pause, NULL); /* a full sweep: more may be ready, no pause */
        for (int i = 0; i < n; i++) {
            if (events[i].data.u32 != STDIN_SLOT) {
                readable(&conns[events[i].data.u32]);
                continue;
            }
            if (!fgets(line, sizeof line, in) || strncmp(line, "stop", 4) == 0) return 0;
            int concurrency, count;
            if (sscanf(line, "connect %d %d", &concurrency, &count) == 2) {
                connect_all(concurrency, count, in);
            } else if (strncmp(line, "reset", 5) == 0) {
                nbatches = frames = other = 0;
                printf("{\"ok\":true}\n");
                fflush(stdout);
            } else if (strncmp(line, "collect", 7) == 0) {
                collect();
            } else {
                printf("{\"error\":\"unknown command\"}\n");
                fflush(stdout);
            }
        }
    }
}
