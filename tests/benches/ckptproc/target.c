/* Target of the process checkpoint benchmark (tests/benches/ckptproc.rs): writes MIB MiB of
 * anonymous memory (every 4 KiB page, no transparent huge pages), then keeps running and obeys
 * one command per line on stdin, each answered by one line on stdout:
 *   p                       ping                                                   -> "ok"
 *   d PERMILLE SEED VALUE   write VALUE into PERMILLE/1000 of the pages, distinct pages
 *                           picked at random from SEED (spread over the whole region) -> "ok N"
 *   c                       checksum of the whole region                           -> "sum X"
 * Usage: target MIB */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PAGE 4096UL

static unsigned long next(unsigned long *s) {
    /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717UL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    size_t len = (size_t)atol(argv[1]) << 20;
    size_t pages = len / PAGE;
    if (pages == 0) return 2;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 3;
    madvise(mem, len, MADV_NOHUGEPAGE);
    /* One bit per page: the picking itself dirties few pages besides the picked ones. */
    unsigned char *picked = calloc(pages / 8 + 1, 1);
    if (!picked) return 3;
    for (size_t p = 0; p < pages; p++) memset(mem + p * PAGE, (int)(p * 13 + 1), PAGE);
    printf("ready\n");
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long permille = 0, seed = 0, value = 0;
        if (line[0] == 'p') {
            printf("ok\n");
        } else if (line[0] == 'd' && sscanf(line + 1, "%lu %lu %lu", &permille, &seed, &value) == 3) {
            size_t want = pages * (permille > 1000 ? 1000 : permille) / 1000;
            unsigned long s = seed | 1;
            memset(picked, 0, pages / 8 + 1);
            size_t done = 0;
            while (done < want) {
                size_t p = next(&s) % pages;
                if (picked[p / 8] & (1u << (p % 8))) continue;
                picked[p / 8] |= (unsigned char)(1u << (p % 8));
                memset(mem + p * PAGE, (int)value, PAGE);
                done++;
            }
            printf("ok %zu\n", done);
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
