/* Test program for ckpt::proc: a counter loop whose state lives in a heap block, an mmap'd
 * region, stdout and an appended data file. Usage: counter DATAFILE [HEAP_MIB]
 * Each step changes one byte of each region, prints "i sum" to stdout and "line i sum" to the
 * data file, then sleeps 10 ms in nanosleep (so a checkpoint usually catches it inside a
 * system call); it reads the clock through the vDSO each step. SIGUSR1 makes it re-sum both regions and print "usr1 N ok" when the result
 * matches the running total it keeps (memory and registers agree), "usr1 N BAD" otherwise. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t usr1;

static void on_usr1(int sig) { (void)sig; usr1++; }

static unsigned long sum_bytes(const unsigned char *p, size_t n) {
    unsigned long s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    size_t heap_len = (size_t)(argc > 2 ? atol(argv[2]) : 1) << 20;
    size_t map_len = 4u << 20;
    unsigned char *heap = malloc(heap_len);
    unsigned char *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!heap || map == MAP_FAILED) return 3;
    for (size_t k = 0; k < heap_len; k++) heap[k] = (unsigned char)(k * 7);
    for (size_t k = 0; k < map_len; k += 4096) map[k] = (unsigned char)(k >> 12);
    unsigned long total = sum_bytes(heap, heap_len) + sum_bytes(map, map_len);
    int data = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (data < 0) return 4;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    printf("ready\n");
    fflush(stdout);
    int seen = 0;
    unsigned long sum = 0;
    for (unsigned long i = 0;; i++) {
        size_t h = (i * 4099) % heap_len, m = (i * 8191) % map_len;
        total -= heap[h] + map[m];
        heap[h] = (unsigned char)(heap[h] + i);
        map[m] ^= (unsigned char)i;
        total += heap[h] + map[m];
        sum = sum * 31 + heap[h] + map[m];
        printf("%lu %lu\n", i, sum);
        fflush(stdout);
        dprintf(data, "line %lu %lu\n", i, sum);
        if (usr1 != seen) {
            seen = usr1;
            unsigned long now = sum_bytes(heap, heap_len) + sum_bytes(map, map_len);
            printf("usr1 %d %s\n", seen, now == total ? "ok" : "BAD");
            fflush(stdout);
        }
        /* Through the vDSO: a restored process must find it where it was. */
        struct timespec now;
        if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) {
            printf("BAD clock_gettime\n");
            fflush(stdout);
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0 && errno != EINTR) {
            printf("BAD nanosleep errno %d\n", errno);
            fflush(stdout);
        }
    }
}
