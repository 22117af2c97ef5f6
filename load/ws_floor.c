/* The kernel floor of room-socket fan-out (load/ws_bench.py compiles and runs it in every run).
 *
 *   ws_floor SOCKETS FRAME_BYTES ROUNDS
 *
 * Opens SOCKETS loopback TCP connections, forks an epoll reader that drains the client ends,
 * then writes one pre-framed binary WebSocket frame of FRAME_BYTES (payload) to every server
 * end, ROUNDS times, with send(MSG_DONTWAIT | MSG_NOSIGNAL) as the relay's native writer does
 * (a short write's rest waits in poll() for the socket to take it: no CPU while waiting).
 * Prints one JSON line: the writer process's CPU (user + system, which includes the loopback
 * receive work the kernel does on the sender's CPU) per frame in microseconds.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void reader(int *clients, int n) {
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = clients[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, clients[i], &ev) < 0) die("epoll_ctl");
    }
    static char buf[1 << 16];
    struct epoll_event events[256];
    int open = n;
    while (open > 0) {
        int k = epoll_wait(ep, events, 256, -1);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) die("epoll_wait");
        for (int j = 0; j < k; j++) {
            ssize_t r = recv(events[j].data.fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, events[j].data.fd, NULL);
                close(events[j].data.fd);
                open--;
            }
        }
    }
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKETS FRAME_BYTES ROUNDS\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]);
    long payload = atol(argv[2]);
    int rounds = atoi(argv[3]);
    if (n <= 0 || payload <= 0 || rounds <= 0) return 2;
    /* each process holds one end of every connection: the reader its n client sockets, the
     * writer its n accepted ones (so 10,000 sockets fit a 20,000 descriptor limit) */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t need = (rlim_t)n + 64;
    if (rl.rlim_cur < need) {
        rl.rlim_cur = rl.rlim_max < need ? rl.rlim_max : need;
        setrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < need) {
            fprintf(stderr, "RLIMIT_NOFILE %lu < %lu: too many sockets\n",
                    (unsigned long)rl.rlim_cur, (unsigned long)need);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof addr;
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    getsockname(ls, (struct sockaddr *)&addr, &alen);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(ls);
        int *clients = malloc(sizeof(int) * (size_t)n);
        for (int i = 0; i < n; i++) {
            clients[i] = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(clients[i], (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        }
        reader(clients, n);
    }
    int *servers = malloc(sizeof(int) * (size_t)n);
    for (int i = 0; i < n; i++) {
        servers[i] = accept(ls, NULL, NULL);
        if (servers[i] < 0) die("accept");
        int one = 1;
        setsockopt(servers[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // as uvicorn does
    }
    close(ls);
    /* the frame: RFC 6455 header (server frames are unmasked) + payload */
    size_t head = payload < 126 ? 2 : payload < 65536 ? 4 : 10;
    size_t len = head + (size_t)payload;
    unsigned char *frame = malloc(len);
    memset(frame, 0xa5, len);
    frame[0] = 0x82;
    if (head == 2) {
        frame[1] = (unsigned char)payload;
    } else if (head == 4) {
        frame[1] = 126;
        frame[2] = (unsigned char)(payload >> 8);
        frame[3] = (unsigned char)payload;
    } else {
        frame[1] = 127;
        for (int b = 0; b < 8; b++) frame[2 + b] = (unsigned char)(payload >> (8 * (7 - b)));
    }
    long shorts = 0;
    double c0 = cpu_seconds(), w0 = wall_seconds();
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < n; i++) {
            size_t sent = 0;
            while (sent < len) {
                ssize_t k = send(servers[i], frame + sent, len - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (k > 0) {
                    sent += (size_t)k;
                    continue;
                }
                if (k < 0 && errno == EINTR) continue;
                if (k < 0 && errno != EAGAIN) die("send");
                shorts++;
                struct pollfd pfd = {.fd = servers[i], .events = POLLOUT};
                poll(&pfd, 1, 1000);
            }
        }
    }
    double cpu = cpu_seconds() - c0, wall = wall_seconds() - w0;
    for (int i = 0; i < n; i++) close(servers[i]);
    int status;
    waitpid(child, &status, 0);
    double frames = (double)n * rounds;
    printf("{\"sockets\": %d, \"frame_bytes\": %ld, \"frames\": %.0f, \"cpu_s\": %.4f, "
           "\"wall_s\": %.4f, \"us_per_frame\": %.3f, \"short_writes\": %ld}\n",
           n, payload, frames, cpu, wall, cpu / frames * 1e6, shorts);
    return 0;
}
