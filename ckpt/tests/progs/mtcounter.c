/* Test program for ckpt::proc, multi-threaded: the main thread and three others, each with
 * state of its own, so that every thread's progress after a restore or rollback can be
 * compared with an uninterrupted run. Usage: mtcounter DIR
 *  main: counts in a block of the main heap (brk), prints "i sum" to stdout every 10 ms;
 *  heap: counts in a block of its own thread's malloc arena, writes "i sum" to DIR/heap
 *        every 5 ms;
 *  map:  counts in an mmap'd region, writes "i sum" to DIR/map every 7 ms;
 *  pipe: blocks SIGUSR1 and SIGUSR2 and reads stdin (a pipe) line by line, so it is almost
 *        always blocked in read(); each line "n" is folded into its state and "n sum" written
 *        to DIR/pipe; on "q" the thread returns, and main joins it and prints "joined" (which
 *        needs the kernel to clear the thread's tid at its exit: clear_child_tid).
 * SIGUSR1 (a handler) makes main, heap and map re-sum their areas and print
 * "usr1 NAME N ok" when the result matches the running total each keeps, "... BAD" otherwise.
 * "ready" is printed once every thread runs. Each line goes out in one write. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define AREA (1u << 20)

static volatile sig_atomic_t usr1;
static volatile int pipe_done;
static const char *dir;
static pthread_t pipe_tid;

static void on_usr1(int sig) { (void)sig; usr1++; }

static unsigned long sum_bytes(const unsigned char *p, size_t n) {
    unsigned long s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}

static int open_out(const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (fd < 0) exit(4);
    return fd;
}

/* One counting loop: area of AREA bytes, output to `out`, a step every `ms` milliseconds. */
static void count(const char *name, unsigned char *area, int out, unsigned stride, long ms) {
    for (size_t k = 0; k < AREA; k++) area[k] = (unsigned char)(k * stride);
    unsigned long total = sum_bytes(area, AREA), sum = 0;
    int seen = 0;
    for (unsigned long i = 0;; i++) {
        size_t at = (i * (stride * 4096 + 1)) % AREA;
        total -= area[at];
        area[at] = (unsigned char)(area[at] + i + stride);
        total += area[at];
        sum = sum * 31 + area[at];
        dprintf(out, "%lu %lu\n", i, sum);
        if (usr1 != seen) {
            seen = usr1;
            dprintf(1, "usr1 %s %d %s\n", name, seen,
                    sum_bytes(area, AREA) == total ? "ok" : "BAD");
        }
        if (!strcmp(name, "main") && pipe_done == 1) {
            /* The pipe thread returned: join it (the kernel clears its tid at its exit). */
            pthread_join(pipe_tid, NULL);
            pipe_done = 2;
            dprintf(1, "joined\n");
        }
        struct timespec ts = {0, ms * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static void *heap_thread(void *arg) {
    (void)arg;
    unsigned char *area = malloc(AREA);
    if (!area) exit(3);
    count("heap", area, open_out("heap"), 3, 5);
    return NULL;
}

static void *map_thread(void *arg) {
    (void)arg;
    unsigned char *area = mmap(NULL, AREA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) exit(3);
    count("map", area, open_out("map"), 5, 7);
    return NULL;
}

static void *pipe_thread(void *arg) {
    (void)arg;
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    int out = open_out("pipe");
    unsigned long state = 7;
    char line[64];
    size_t len = 0;
    for (;;) {
        char c;
        ssize_t n = read(0, &c, 1);
        if (n <= 0) return NULL;
        if (c != '\n') {
            if (len + 1 < sizeof line) line[len++] = c;
            continue;
        }
        line[len] = 0;
        len = 0;
        if (!strcmp(line, "q")) {
            pipe_done = 1;
            return NULL;
        }
        state = state * 1000003 + strtoul(line, NULL, 10);
        dprintf(out, "%s %lu\n", line, state);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    dir = argv[1];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    /* Blocks of AREA bytes come from the heaps (brk, thread arenas), not from mmap. */
    mallopt(M_MMAP_THRESHOLD, 4 * AREA);
    pthread_t heap, map;
    if (pthread_create(&heap, NULL, heap_thread, NULL) || pthread_create(&map, NULL, map_thread, NULL) ||
        pthread_create(&pipe_tid, NULL, pipe_thread, NULL))
        return 5;
    unsigned char *area = malloc(AREA);
    if (!area) return 3;
    dprintf(1, "ready\n");
    count("main", area, 1, 1, 10);
    return 0;
}
