/*
 * replwriter: writes a journal and a snapshot file in its working directory, either through
 * libft's replicated file API (ft_create_file / ft_write_file / ft_close_file) or, with
 * --stdio, through plain stdio (replicated only when the LD_PRELOAD shim is loaded).
 *
 *   replwriter [--stdio] RECORDS
 *
 * Run it as a watchd service with `filesets = ["data"]` and `cwd` inside the fileset; with
 * --stdio also `repl_shim = true`. It prints "done N" when it has written N records.
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ft.h"

static int fail(const char *what, long code) {
    fprintf(stderr, "replwriter: %s: %s\n", what, ft_strerror((int)code));
    return 1;
}

static int with_libft(long records) {
    int journal = ft_create_file("journal.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (journal < 0) return fail("ft_create_file journal.log", journal);
    char line[128];
    for (long i = 0; i < records; i++) {
        int n = snprintf(line, sizeof line, "record %ld\n", i);
        int64_t w = ft_write_file(journal, line, (size_t)n);
        if (w < 0) return fail("ft_write_file", (long)w);
        if (i % 100 == 99) {
            /* A snapshot rewritten in place: truncate and write the count. */
            int snap = ft_create_file("snapshot", O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (snap < 0) return fail("ft_create_file snapshot", snap);
            n = snprintf(line, sizeof line, "%ld records\n", i + 1);
            if (ft_write_file(snap, line, (size_t)n) < 0) return fail("snapshot write", -1);
            if (ft_sync_file(snap) < 0) return fail("ft_sync_file", -1);
            ft_close_file(snap);
        }
    }
    return ft_close_file(journal) == FT_OK ? 0 : fail("ft_close_file", -1);
}

static int with_stdio(long records) {
    FILE *journal = fopen("journal.log", "a");
    if (!journal) { perror("fopen journal.log"); return 1; }
    for (long i = 0; i < records; i++) {
        fprintf(journal, "record %ld\n", i);
        if (i % 100 == 99) {
            FILE *snap = fopen("snapshot", "w");
            if (!snap) { perror("fopen snapshot"); return 1; }
            fprintf(snap, "%ld records\n", i + 1);
            fflush(snap);
            fsync(fileno(snap));
            fclose(snap);
        }
    }
    fwrite("end\n", 1, 4, journal);
    return fclose(journal) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    int stdio_mode = argc > 1 && strcmp(argv[1], "--stdio") == 0;
    long records = argc > 1 + stdio_mode ? atol(argv[1 + stdio_mode]) : 1000;
    int rc = stdio_mode ? with_stdio(records) : with_libft(records);
    if (rc == 0) {
        printf("done %ld\n", records);
        fflush(stdout);
    }
    return rc;
}
