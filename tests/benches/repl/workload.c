/* The write-heavy workload of the replication benchmark (tests/benches/repl.rs).
 *
 *   workload big   DIR NFILES FILE_BYTES BLOCK   NFILES files of FILE_BYTES, written in BLOCK-byte
 *                                                pwrite calls at increasing offsets
 *   workload small DIR NFILES FILE_BYTES         NFILES files: create, one write, close
 *
 * Built twice: plain (open/pwrite/close: run as is, or under the LD_PRELOAD shim) and with
 * -DUSE_FT (libft's ft_create_file / ft_write_file_at / ft_close_file). DIR is created first.
 * On success it prints one line on stdout:
 *   start_ns=<CLOCK_MONOTONIC before the first create> end_ns=<after the last close>
 *   cpu_ns=<user + system CPU time between the two> files=<n> bytes=<n> calls=<n>
 * and exits 0; any failed call is reported on stderr and exits 1: the benchmark must never
 * time a run whose writes did not all succeed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef USE_FT
#include "ft.h"
#endif

/* Bytes of pseudo-random data the blocks are cut from (blocks start at rotating offsets, so
 * consecutive blocks differ). */
#define POOL_BYTES (1u << 20)
#define PATH_MAX_LEN 4096

static unsigned char pool[POOL_BYTES * 2];

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* CPU time (user + system, every thread) this process used so far. */
static uint64_t cpu_ns(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
    return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000u +
           ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000u;
}

static void fill_pool(void) {
    uint64_t x = 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < sizeof pool; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pool[i] = (unsigned char)(x >> 24);
    }
}

static const unsigned char *block_at(uint64_t n, size_t len) {
    size_t start = (size_t)((n * 4099u) % (POOL_BYTES - 1));
    (void)len; /* len <= POOL_BYTES: the pool is twice that */
    return pool + start;
}

static void die(const char *what, const char *path, long code) {
    fprintf(stderr, "workload: %s %s failed: %ld (%s)\n", what, path, code, strerror(errno));
    exit(1);
}

/* One file handle of either API. */
static int file_create(const char *path) {
#ifdef USE_FT
    int h = ft_create_file(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (h < 0) die("ft_create_file", path, h);
    return h;
#else
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("open", path, fd);
    return fd;
#endif
}

static void file_write_at(int h, const void *buf, size_t len, uint64_t off, const char *path) {
#ifdef USE_FT
    int64_t n = ft_write_file_at(h, buf, len, off);
    if (n != (int64_t)len) die("ft_write_file_at", path, (long)n);
#else
    ssize_t n = pwrite(h, buf, len, (off_t)off);
    if (n != (ssize_t)len) die("pwrite", path, (long)n);
#endif
}

static void file_close(int h, const char *path) {
#ifdef USE_FT
    int rc = ft_close_file(h);
    if (rc != 0) die("ft_close_file", path, rc);
#else
    if (close(h) != 0) die("close", path, -1);
#endif
}

static uint64_t arg_u64(const char *s) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0') {
        fprintf(stderr, "workload: %s is not a number\n", s);
        exit(2);
    }
    return (uint64_t)v;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: workload big DIR NFILES FILE_BYTES BLOCK | small DIR NFILES FILE_BYTES\n");
        return 2;
    }
    const char *kind = argv[1];
    const char *dir = argv[2];
    uint64_t nfiles = arg_u64(argv[3]);
    uint64_t file_bytes = arg_u64(argv[4]);
    int big = strcmp(kind, "big") == 0;
    if (!big && strcmp(kind, "small") != 0) {
        fprintf(stderr, "workload: unknown kind %s\n", kind);
        return 2;
    }
    uint64_t block = big ? (argc > 5 ? arg_u64(argv[5]) : 4096) : file_bytes;
    if (block == 0 || block > POOL_BYTES) {
        fprintf(stderr, "workload: block must be 1..%u bytes\n", POOL_BYTES);
        return 2;
    }
    fill_pool();
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) die("mkdir", dir, -1);
    char path[PATH_MAX_LEN];
    uint64_t calls = 0, bytes = 0, n = 0;
    uint64_t cpu_start = cpu_ns();
    uint64_t start = mono_ns();
    for (uint64_t f = 0; f < nfiles; f++) {
        snprintf(path, sizeof path, "%s/f%06" PRIu64, dir, f);
        int h = file_create(path);
        for (uint64_t off = 0; off < file_bytes; off += block) {
            uint64_t len = file_bytes - off < block ? file_bytes - off : block;
            file_write_at(h, block_at(n++, (size_t)len), (size_t)len, off, path);
            calls++;
            bytes += len;
        }
        file_close(h, path);
    }
    uint64_t end = mono_ns();
    uint64_t cpu = cpu_ns() - cpu_start;
    printf("start_ns=%" PRIu64 " end_ns=%" PRIu64 " cpu_ns=%" PRIu64 " files=%" PRIu64
           " bytes=%" PRIu64 " calls=%" PRIu64 "\n",
           start, end, cpu, nfiles, bytes, calls);
    return 0;
}
