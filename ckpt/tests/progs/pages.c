/* Test and benchmark program for incremental process checkpoints: MIB MiB of anonymous memory
 * (no transparent huge pages, so a written page is one 4 KiB page), every page filled at start.
 * Commands, one per line on stdin, each answered by one line on stdout:
 *   w FIRST COUNT VALUE  fill pages FIRST..FIRST+COUNT with VALUE          -> "ok"
 *   z FIRST COUNT        free pages FIRST..FIRST+COUNT (MADV_DONTNEED: zero) -> "ok"
 *   c                    checksum of the whole region                        -> "sum X"
 *   m                    map and write one more MiB (changes the memory layout) -> "ok"
 * Usage: pages MIB */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    size_t len = (size_t)atol(argv[1]) << 20;
    size_t pages = len / PAGE;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 3;
    madvise(mem, len, MADV_NOHUGEPAGE);
    for (size_t p = 0; p < pages; p++) memset(mem + p * PAGE, (int)(p * 13 + 1), PAGE);
    printf("ready\n");
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long first = 0, count = 0, value = 0;
        if (line[0] == 'w' && sscanf(line + 1, "%lu %lu %lu", &first, &count, &value) == 3) {
            for (size_t p = first; p < first + count && p < pages; p++)
                memset(mem + p * PAGE, (int)value, PAGE);
            printf("ok\n");
        } else if (line[0] == 'z' && sscanf(line + 1, "%lu %lu", &first, &count) == 2) {
            if (first < pages && first + count <= pages)
                madvise(mem + first * PAGE, count * PAGE, MADV_DONTNEED);
            printf("ok\n");
        } else if (line[0] == 'm') {
            unsigned char *more = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (more != MAP_FAILED) memset(more, 1, 1 << 20);
            printf("ok\n");
        } else if (line[0] == 'c') {
            unsigned long sum = 0;
            for (size_t i = 0; i < len; i += 8) {
                unsigned long w;
                memcpy(&w, mem + i, 8);
                sum = sum * 1099511628211UL + w;
            }
            printf("sum %lu\n", sum);
        } else {
            printf("bad\n");
        }
        fflush(stdout);
    }
    return 0;
}
