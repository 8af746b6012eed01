/*
 * supervised.c: the one program that the watchd benchmark (tests/benches/watchd.rs) runs under
 * watchd, supervisord and runit alike. The benchmark compiles it with `cc` and links it against
 * libft.so; under supervisord and runit FT_SOCKET is unset, so ft_reg_watch() fails with
 * FT_ENOSOCKET and the same binary simply never heartbeats.
 *
 * The first thing main() does is tell the benchmark "I am running": one datagram
 *     start <pid> <CLOCK_MONOTONIC ns> <CLOCK_REALTIME ns>
 * to the Unix datagram socket named by argv[1]. Modes (argv[2]):
 *   idle                       nothing more: sleep until killed.
 *   beat INTERVAL_MS TIMEOUT_MS [report]
 *                              ft_reg_watch(), then ft_hbeat(1, TIMEOUT_MS) every INTERVAL_MS
 *                              (absolute schedule); the first failed calls are
 *                              printed on stderr. With `report`, every heartbeat that libft
 *                              accepted is reported *after* ft_hbeat returned:
 *                                  hb <pid> <seq> <mono ns> <real ns>
 *                              where the clocks were read just before ft_hbeat.
 *   flood SECONDS              ft_reg_watch(), report `armed <pid>`, wait for SIGUSR1, then call
 *                              ft_hbeat(1, 60000) as fast as possible for SECONDS, then
 *                              ft_hbeat_end(1) and report
 *                                  flood <pid> <ok> <eagain> <other errors> <elapsed ns>
 *                              and sleep until killed.
 * Errors of the report socket end the program with status 3 (the benchmark is gone), bad
 * arguments with status 2.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ft.h"

/* The thread id every heartbeat is sent for. */
#define TID 1u
/* The deadline a flooding client promises: far longer than any flood. */
#define FLOOD_TIMEOUT_MS 60000u
/* A flooding client reads the clock once per this many heartbeats. */
#define FLOOD_CLOCK_EVERY 1024u
/* A beating program reports at most this many failed ft_hbeat calls on stderr. */
#define MAX_ERRORS_SHOWN 10u
/* Longest report datagram. */
#define REPORT_MAX 160
#define NS_PER_S 1000000000ull
#define NS_PER_MS 1000000ull
#define EXIT_USAGE 2
#define EXIT_REPORT 3

static int report_fd = -1;
static struct sockaddr_un report_addr;

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

/* Sends one report line; blocks while the benchmark's queue is full (it always drains it). */
static void report(const char *line) {
    size_t len = strlen(line);
    for (;;) {
        ssize_t n = sendto(report_fd, line, len, 0, (const struct sockaddr *)&report_addr,
                           sizeof report_addr);
        if (n >= 0) {
            return;
        }
        if (errno != EINTR) {
            _exit(EXIT_REPORT);
        }
    }
}

static void open_report(const char *path) {
    if (strlen(path) >= sizeof report_addr.sun_path) {
        fprintf(stderr, "supervised: report socket path too long\n");
        exit(EXIT_USAGE);
    }
    memset(&report_addr, 0, sizeof report_addr);
    report_addr.sun_family = AF_UNIX;
    strcpy(report_addr.sun_path, path);
    report_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (report_fd < 0) {
        _exit(EXIT_REPORT);
    }
}

static int parse_u32(const char *s, uint32_t *out) {
    char *end = NULL;
    errno = 0;
    unsigned long n = strtoul(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || n > UINT32_MAX) {
        return -1;
    }
    *out = (uint32_t)n;
    return 0;
}

static void sleep_forever(void) {
    for (;;) {
        pause();
    }
}

static void beat(uint32_t interval_ms, uint32_t timeout_ms, int with_report) {
    if (ft_reg_watch() != FT_OK) {
        /* Not under watchd (supervisord, runit): the same program, without heartbeats. */
        sleep_forever();
    }
    char line[REPORT_MAX];
    unsigned errors_shown = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t seq = 0;; seq++) {
        uint64_t mono = clock_ns(CLOCK_MONOTONIC);
        uint64_t real = clock_ns(CLOCK_REALTIME);
        int rc = ft_hbeat(TID, timeout_ms);
        if (rc != FT_OK && errors_shown < MAX_ERRORS_SHOWN) {
            /* Shows in the supervisor's log of the service: why watchd may have missed a beat. */
            errors_shown++;
            fprintf(stderr, "supervised[%ld]: heartbeat %llu: ft_hbeat: %s\n", (long)getpid(),
                    (unsigned long long)seq, ft_strerror(rc));
        }
        if (with_report && rc == FT_OK) {
            snprintf(line, sizeof line, "hb %ld %llu %llu %llu", (long)getpid(),
                     (unsigned long long)seq, (unsigned long long)mono,
                     (unsigned long long)real);
            report(line);
        }
        uint64_t at = (uint64_t)next.tv_sec * NS_PER_S + (uint64_t)next.tv_nsec +
                      (uint64_t)interval_ms * NS_PER_MS;
        next.tv_sec = (time_t)(at / NS_PER_S);
        next.tv_nsec = (long)(at % NS_PER_S);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
        }
    }
}

static void flood(uint32_t seconds) {
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    if (ft_reg_watch() != FT_OK) {
        fprintf(stderr, "supervised: flood needs watchd (ft_reg_watch failed)\n");
        exit(EXIT_USAGE);
    }
    char line[REPORT_MAX];
    snprintf(line, sizeof line, "armed %ld", (long)getpid());
    report(line);
    int sig = 0;
    while (sigwait(&usr1, &sig) != 0) {
    }
    uint64_t ok = 0, eagain = 0, other = 0;
    uint64_t start = clock_ns(CLOCK_MONOTONIC);
    uint64_t end = start + (uint64_t)seconds * NS_PER_S;
    uint64_t now = start;
    while (now < end) {
        for (unsigned i = 0; i < FLOOD_CLOCK_EVERY; i++) {
            int rc = ft_hbeat(TID, FLOOD_TIMEOUT_MS);
            if (rc == FT_OK) {
                ok++;
            } else if (rc == FT_EAGAIN) {
                eagain++;
            } else {
                other++;
            }
        }
        now = clock_ns(CLOCK_MONOTONIC);
    }
    ft_hbeat_end(TID);
    snprintf(line, sizeof line, "flood %ld %llu %llu %llu %llu", (long)getpid(),
             (unsigned long long)ok, (unsigned long long)eagain, (unsigned long long)other,
             (unsigned long long)(now - start));
    report(line);
    sleep_forever();
}

int main(int argc, char **argv) {
    /* The clocks are read before anything else: this is the moment the program runs. */
    uint64_t mono = clock_ns(CLOCK_MONOTONIC);
    uint64_t real = clock_ns(CLOCK_REALTIME);
    if (argc < 3) {
        fprintf(stderr, "usage: supervised REPORT_SOCKET idle|beat I T [report]|flood S\n");
        return EXIT_USAGE;
    }
    open_report(argv[1]);
    char line[REPORT_MAX];
    snprintf(line, sizeof line, "start %ld %llu %llu", (long)getpid(), (unsigned long long)mono,
             (unsigned long long)real);
    report(line);

    const char *mode = argv[2];
    if (strcmp(mode, "idle") == 0 && argc == 3) {
        sleep_forever();
    }
    if (strcmp(mode, "beat") == 0 && (argc == 5 || argc == 6)) {
        uint32_t interval_ms = 0, timeout_ms = 0;
        int with_report = argc == 6 && strcmp(argv[5], "report") == 0;
        if (parse_u32(argv[3], &interval_ms) == 0 && parse_u32(argv[4], &timeout_ms) == 0 &&
            interval_ms > 0 && (argc == 5 || with_report)) {
            beat(interval_ms, timeout_ms, with_report);
        }
    }
    if (strcmp(mode, "flood") == 0 && argc == 4) {
        uint32_t seconds = 0;
        if (parse_u32(argv[3], &seconds) == 0 && seconds > 0) {
            flood(seconds);
        }
    }
    fprintf(stderr, "supervised: bad arguments\n");
    return EXIT_USAGE;
}
