/*
 * A fixed-answer OpenAI-shaped upstream for the benchmarks: one thread, epoll, no allocation
 * per request. It has to be much faster than any proxy put in front of it, so that the figures
 * measure the proxy and not this server.
 *
 *   upstream PORT
 *
 * Every POST answers a fixed chat completion, or, when the JSON body has "stream": true, a
 * server-sent-event stream of N events (default 100; the last one is `data: [DONE]`), each
 * written with its own send() as its own HTTP chunk:
 *   X-Bench-Events: N      events per stream
 *   X-Bench-Gap-Us: U      microseconds between events (0: back to back)
 * GET /health answers 200; anything else 404. Keep-alive and pipelining are supported.
 * Loopback only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 65536
#define MAX_REQUEST (1 << 20)
#define MAX_EVENTS 100000

static const char COMPLETION[] =
    "{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion\",\"created\":1700000000,"
    "\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\"Hello! This is a fixed answer from the benchmark upstream.\"},"
    "\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":12,"
    "\"completion_tokens\":12,\"total_tokens\":24}}";
static const char EVENT[] =
    "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"
    "\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token \"},"
    "\"logprobs\":null,\"finish_reason\":null}]}\n\n";
static const char DONE_EVENT[] = "data: [DONE]\n\n";
static const char SSE_HEAD[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    "Transfer-Encoding: chunked\r\n\r\n";
static const char NOT_FOUND[] =
    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found";
static const char HEALTH[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK";

static char json_response[1024];
static size_t json_response_len;
static char event_chunk[512];
static size_t event_chunk_len;
static char last_chunk[128];
static size_t last_chunk_len;

struct conn {
    int fd;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_len, out_cap;
    int close_after;
    /* streaming state */
    int streaming;
    int events_left;
    int64_t gap_ns;
    int64_t due_ns;
    struct conn *next_stream, *prev_stream;
};

static struct conn *conns[MAX_FDS];
static struct conn *streams; /* doubly linked list of conns with a paced stream going */
static int epfd;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void stream_unlink(struct conn *c) {
    if (!c->streaming) return;
    if (c->prev_stream) c->prev_stream->next_stream = c->next_stream;
    else streams = c->next_stream;
    if (c->next_stream) c->next_stream->prev_stream = c->prev_stream;
    c->next_stream = c->prev_stream = NULL;
    c->streaming = 0;
}

static void conn_close(struct conn *c) {
    stream_unlink(c);
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->in);
    free(c->out);
    free(c);
}

static void want_write(struct conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void out_append(struct conn *c, const char *data, size_t len) {
    if (c->out_len + len > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + len) cap *= 2;
        c->out = realloc(c->out, cap);
        if (!c->out) die("realloc");
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

/* Send now if nothing is queued, else queue. Returns -1 when the connection is gone. */
static int emit(struct conn *c, const char *data, size_t len) {
    if (c->out_len == 0) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            n = 0;
        }
        if ((size_t)n == len) return 0;
        data += n;
        len -= (size_t)n;
        want_write(c, 1);
    }
    out_append(c, data, len);
    return 0;
}

static int flush_out(struct conn *c) {
    while (c->out_len) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    want_write(c, 0);
    return 0;
}

static int send_event(struct conn *c) {
    c->events_left--;
    if (c->events_left == 0) return emit(c, last_chunk, last_chunk_len);
    return emit(c, event_chunk, event_chunk_len);
}

/* Case-insensitive header lookup within the header block [start, end). */
static const char *find_header(const char *start, const char *end, const char *name, size_t *len) {
    size_t nlen = strlen(name);
    const char *line = memchr(start, '\n', (size_t)(end - start));
    while (line && line + 1 < end) {
        line++;
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol) eol = end;
        if ((size_t)(eol - line) > nlen && line[nlen] == ':' && strncasecmp(line, name, nlen) == 0) {
            const char *v = line + nlen + 1;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            const char *ve = eol;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ')) ve--;
            *len = (size_t)(ve - v);
            return v;
        }
        line = eol < end ? eol : NULL;
    }
    return NULL;
}

static long header_long(const char *start, const char *end, const char *name, long fallback) {
    size_t len;
    const char *v = find_header(start, end, name, &len);
    if (!v || len == 0 || len > 20) return fallback;
    char buf[24];
    memcpy(buf, v, len);
    buf[len] = 0;
    return strtol(buf, NULL, 10);
}

static int body_streams(const char *body, size_t len) {
    const char *p = memmem(body, len, "\"stream\"", 8);
    if (!p) return 0;
    p += 8;
    const char *end = body + len;
    while (p < end && (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return end - p >= 4 && memcmp(p, "true", 4) == 0;
}

/* Handle whole requests in c->in; returns -1 when the connection must close now. */
static int process(struct conn *c) {
    size_t off = 0;
    int result = 0;
    while (!c->streaming && off < c->in_len) {
        char *start = c->in + off;
        size_t avail = c->in_len - off;
        char *eoh = memmem(start, avail, "\r\n\r\n", 4);
        if (!eoh) break;
        char *hend = eoh + 2;
        long clen = header_long(start, hend, "content-length", 0);
        size_t head = (size_t)(eoh + 4 - start);
        if (clen < 0 || clen > MAX_REQUEST) return -1;
        if (avail < head + (size_t)clen) break;
        const char *body = eoh + 4;
        size_t clen_u = (size_t)clen;
        size_t vlen;
        const char *conn_hdr = find_header(start, hend, "connection", &vlen);
        if (conn_hdr && vlen == 5 && strncasecmp(conn_hdr, "close", 5) == 0) c->close_after = 1;
        if (strncmp(start, "POST ", 5) == 0) {
            if (body_streams(body, clen_u)) {
                long events = header_long(start, hend, "x-bench-events", 100);
                long gap_us = header_long(start, hend, "x-bench-gap-us", 0);
                if (events < 1) events = 1;
                if (events > MAX_EVENTS) events = MAX_EVENTS;
                if (gap_us < 0) gap_us = 0;
                c->events_left = (int)events;
                if (emit(c, SSE_HEAD, sizeof SSE_HEAD - 1) < 0 || send_event(c) < 0) return -1;
                if (gap_us == 0) {
                    while (c->events_left > 0)
                        if (send_event(c) < 0) return -1;
                } else if (c->events_left > 0) {
                    c->gap_ns = gap_us * 1000LL;
                    c->due_ns = now_ns() + c->gap_ns;
                    c->streaming = 1;
                    c->prev_stream = NULL;
                    c->next_stream = streams;
                    if (streams) streams->prev_stream = c;
                    streams = c;
                }
            } else if (emit(c, json_response, json_response_len) < 0) {
                return -1;
            }
        } else if (strncmp(start, "GET /health", 11) == 0) {
            if (emit(c, HEALTH, sizeof HEALTH - 1) < 0) return -1;
        } else if (emit(c, NOT_FOUND, sizeof NOT_FOUND - 1) < 0) {
            return -1;
        }
        off += head + clen_u;
        if (c->close_after) {
            result = 1;
            break;
        }
    }
    if (off) {
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
    if (result == 1 && !c->streaming && c->out_len == 0) return -1;
    return 0;
}

static void on_readable(struct conn *c) {
    for (;;) {
        if (c->in_cap - c->in_len < 4096) {
            if (c->in_cap >= MAX_REQUEST + 65536) {
                conn_close(c);
                return;
            }
            c->in_cap *= 2;
            c->in = realloc(c->in, c->in_cap);
            if (!c->in) die("realloc");
        }
        ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (n == 0) {
            conn_close(c);
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_close(c);
            return;
        }
        c->in_len += (size_t)n;
    }
    if (process(c) < 0) conn_close(c);
}

static void on_accept(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (fd >= MAX_FDS) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        c->in_cap = 8192;
        c->in = malloc(c->in_cap);
        if (!c->in) die("malloc");
        conns[fd] = c;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }
}

/* Send the events that are due; returns when the next one is due (or -1: none pending). */
static int64_t run_timers(void) {
    int64_t now = now_ns();
    int64_t next = -1;
    struct conn *c = streams;
    while (c) {
        struct conn *following = c->next_stream;
        if (c->due_ns <= now) {
            if (send_event(c) < 0) {
                conn_close(c);
                c = following;
                continue;
            }
            if (c->events_left == 0) {
                stream_unlink(c);
                if (process(c) < 0 || (c->close_after && !c->streaming && c->out_len == 0)) {
                    conn_close(c);
                }
                c = following;
                continue;
            }
            c->due_ns += c->gap_ns;
            if (c->due_ns < now) c->due_ns = now; /* fell behind: do not burst to catch up */
        }
        if (next < 0 || c->due_ns < next) next = c->due_ns;
        c = following;
    }
    return next;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    json_response_len = (size_t)snprintf(
        json_response, sizeof json_response,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
        sizeof COMPLETION - 1, COMPLETION);
    event_chunk_len = (size_t)snprintf(event_chunk, sizeof event_chunk, "%zx\r\n%s\r\n",
                                       sizeof EVENT - 1, EVENT);
    last_chunk_len = (size_t)snprintf(last_chunk, sizeof last_chunk, "%zx\r\n%s\r\n0\r\n\r\n",
                                      sizeof DONE_EVENT - 1, DONE_EVENT);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl");
    fprintf(stderr, "upstream listening on 127.0.0.1:%s\n", argv[1]);

    struct epoll_event events[256];
    int64_t next_due = -1;
    for (;;) {
        struct timespec timeout, *tp = NULL;
        if (next_due >= 0) {
            int64_t wait = next_due - now_ns();
            if (wait < 0) wait = 0;
            timeout.tv_sec = wait / 1000000000LL;
            timeout.tv_nsec = wait % 1000000000LL;
            tp = &timeout;
        }
        int n = epoll_pwait2(epfd, events, 256, tp, NULL);
        if (n < 0 && errno != EINTR) die("epoll_pwait2");
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                on_accept(lfd);
                continue;
            }
            struct conn *c = conns[fd];
            if (!c) continue;
            if (events[i].events & EPOLLOUT) {
                if (flush_out(c) < 0) {
                    conn_close(c);
                    continue;
                }
                if (c->close_after && !c->streaming && c->out_len == 0) {
                    conn_close(c);
                    continue;
                }
            }
            if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
        next_due = streams ? run_timers() : -1;
    }
}
