/*
 * hbdemo.c: a service that heartbeats to watchd through libft's C API, for trying crash and
 * hang detection by hand and in end-to-end tests. Same options and output as the Rust
 * examples/src/bin/hbdemo.rs. It never stops because of watchd: failed calls are printed and
 * the program carries on, and without FT_SOCKET it runs alone after one warning.
 *
 * SIGUSR1 crashes it at once (abort), SIGUSR2 makes it hang (no more heartbeats).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ft.h"

/* The thread id the demo heartbeats for. */
#define TID 1u
#define DEFAULT_INTERVAL_MS 100u
#define DEFAULT_TIMEOUT_MS 500u
#define DEFAULT_PRINT_EVERY 10u
/* How long one sleep of a hung demo lasts; it sleeps in a loop forever. */
#define HANG_NAP_S 3600u
#define NO_DEADLINE UINT64_MAX

static const char USAGE[] =
    "usage: hbdemo [--interval-ms I] [--timeout-ms T] [--print-every N]\n"
    "              [--crash-after-ms X] [--hang-after-ms X] [--exit-after-ms X]\n"
    "  Registers with watchd (FT_SOCKET), reports ready, then heartbeats thread 1 every I ms\n"
    "  (default 100) promising the next beat within T ms (default 500), printing every N beats\n"
    "  (default 10). --crash-after-ms aborts, --hang-after-ms stops heartbeating and sleeps forever,\n"
    "  --exit-after-ms exits 0. SIGUSR1 aborts now, SIGUSR2 hangs now.\n";

/* Set by the SIGUSR2 handler; the main loop hangs when it sees it. */
static volatile sig_atomic_t hang_requested = 0;

struct options {
    uint64_t interval_ms;
    uint32_t timeout_ms;
    uint64_t print_every;
    uint64_t crash_after_ms; /* NO_DEADLINE when not set */
    uint64_t hang_after_ms;
    uint64_t exit_after_ms;
};

/* Prints one line and flushes at once, so that a supervisor's log shows it before a crash. */
#define SAY(...)                                         \
    do {                                                 \
        printf("hbdemo[%ld]: ", (long)getpid());         \
        printf(__VA_ARGS__);                             \
        putchar('\n');                                   \
        fflush(stdout);                                  \
    } while (0)

static int parse_number(const char *flag, const char *value, uint64_t max, uint64_t *out) {
    char *end = NULL;
    errno = 0;
    if (value == NULL || value[0] < '0' || value[0] > '9') {
        fprintf(stderr, "hbdemo: %s: \"%s\" is not a number\n", flag, value ? value : "");
        return -1;
    }
    unsigned long long n = strtoull(value, &end, 10);
    if (errno != 0 || *end != '\0' || n > max) {
        fprintf(stderr, "hbdemo: %s: \"%s\" is not a number from 0 to %llu\n", flag, value,
                (unsigned long long)max);
        return -1;
    }
    *out = (uint64_t)n;
    return 0;
}

static int parse_options(int argc, char **argv, struct options *o) {
    o->interval_ms = DEFAULT_INTERVAL_MS;
    o->timeout_ms = DEFAULT_TIMEOUT_MS;
    o->print_every = DEFAULT_PRINT_EVERY;
    o->crash_after_ms = NO_DEADLINE;
    o->hang_after_ms = NO_DEADLINE;
    o->exit_after_ms = NO_DEADLINE;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
            return -1;
        }
        const char *value = i + 1 < argc ? argv[++i] : NULL;
        if (value == NULL) {
            fprintf(stderr, "hbdemo: %s needs a value\n", flag);
            return -1;
        }
        uint64_t n = 0;
        if (strcmp(flag, "--interval-ms") == 0) {
            if (parse_number(flag, value, UINT64_MAX, &n) != 0) return -1;
            o->interval_ms = n > 0 ? n : 1;
        } else if (strcmp(flag, "--timeout-ms") == 0) {
            if (parse_number(flag, value, UINT32_MAX, &n) != 0) return -1;
            o->timeout_ms = (uint32_t)n;
        } else if (strcmp(flag, "--print-every") == 0) {
            if (parse_number(flag, value, UINT64_MAX, &n) != 0) return -1;
            o->print_every = n > 0 ? n : 1;
        } else if (strcmp(flag, "--crash-after-ms") == 0) {
            if (parse_number(flag, value, UINT64_MAX - 1, &o->crash_after_ms) != 0) return -1;
        } else if (strcmp(flag, "--hang-after-ms") == 0) {
            if (parse_number(flag, value, UINT64_MAX - 1, &o->hang_after_ms) != 0) return -1;
        } else if (strcmp(flag, "--exit-after-ms") == 0) {
            if (parse_number(flag, value, UINT64_MAX - 1, &o->exit_after_ms) != 0) return -1;
        } else {
            fprintf(stderr, "hbdemo: unknown option %s\n", flag);
            return -1;
        }
    }
    return 0;
}

static void on_sigusr1(int sig) {
    static const char msg[] = "hbdemo: SIGUSR1, crashing now (abort)\n";
    (void)sig;
    /* write(2) and abort(3) are async-signal-safe; nothing else is called here. */
    ssize_t ignored = write(STDOUT_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    abort();
}

static void on_sigusr2(int sig) {
    (void)sig;
    hang_requested = 1;
}

static void install_handler(int sig, void (*handler)(int)) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    sigemptyset(&action.sa_mask);
    /* No SA_RESTART: a signal interrupts the nanosleep of the main loop so it reacts at once. */
    action.sa_flags = 0;
    if (sigaction(sig, &action, NULL) != 0) {
        SAY("cannot install handler for signal %d: %s", sig, strerror(errno));
    }
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Sleeps for `ms` or until a signal arrives, whichever comes first. */
static void nap(uint64_t ms) {
    struct timespec req;
    req.tv_sec = (time_t)(ms / 1000u);
    req.tv_nsec = (long)(ms % 1000u) * 1000000L;
    nanosleep(&req, NULL);
}

static void hang_forever(void) {
    SAY("hanging now: no more heartbeats");
    for (;;) {
        sleep(HANG_NAP_S);
    }
}

static void report(const char *call, int rc) {
    if (rc != FT_OK) {
        SAY("%s failed: %s", call, ft_strerror(rc));
    }
}

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }

int main(int argc, char **argv) {
    struct options o;
    if (parse_options(argc, argv, &o) != 0) {
        fputs(USAGE, stderr);
        return 2;
    }
    install_handler(SIGUSR1, on_sigusr1);
    install_handler(SIGUSR2, on_sigusr2);

    int registered = 0;
    int rc = ft_reg_watch();
    if (rc == FT_OK) {
        SAY("registered with watchd at %s", getenv("FT_SOCKET"));
        registered = 1;
    } else if (rc == FT_ENOSOCKET) {
        SAY("warning: FT_SOCKET is not set, running without watchd");
    } else if (rc == FT_EUNREACHABLE || rc == FT_EAGAIN) {
        /* libft keeps the registration and retries with the next call. */
        SAY("ft_reg_watch failed: %s (will retry with the next heartbeat)", ft_strerror(rc));
        registered = 1;
    } else {
        SAY("ft_reg_watch failed: %s; running without watchd", ft_strerror(rc));
    }
    if (registered) {
        char status[64];
        report("ft_ready", ft_ready());
        snprintf(status, sizeof status, "heartbeat every %llu ms",
                 (unsigned long long)o.interval_ms);
        report("ft_status", ft_status(status));
    }
    SAY("ready: heartbeat every %llu ms, timeout %lu ms", (unsigned long long)o.interval_ms,
        (unsigned long)o.timeout_ms);

    const uint64_t start = now_ms();
    uint64_t next_beat = start;
    uint64_t beats = 0;
    int last_failure = FT_OK;
    for (;;) {
        const uint64_t now = now_ms();
        const uint64_t elapsed = now - start;
        if (elapsed >= o.crash_after_ms) {
            SAY("crashing now (abort) after %llu ms", (unsigned long long)elapsed);
            abort();
        }
        if (hang_requested || elapsed >= o.hang_after_ms) {
            hang_forever();
        }
        if (elapsed >= o.exit_after_ms) {
            if (registered) {
                report("ft_hbeat_end", ft_hbeat_end(TID));
                report("ft_del_watch", ft_del_watch());
            }
            SAY("exiting (status 0) after %llu beats", (unsigned long long)beats);
            return 0;
        }
        if (now >= next_beat) {
            if (registered) {
                rc = ft_hbeat(TID, o.timeout_ms);
                if (rc == FT_OK && last_failure != FT_OK) {
                    SAY("ft_hbeat works again");
                } else if (rc != FT_OK && rc != last_failure) {
                    /* Printed once per distinct failure: watchd may be down for a while. */
                    SAY("ft_hbeat failed: %s", ft_strerror(rc));
                }
                last_failure = rc;
            }
            beats++;
            if (beats == 1 || beats % o.print_every == 0) {
                SAY("beat %llu", (unsigned long long)beats);
            }
            /* After a stall (SIGSTOP, overload) resume the rhythm instead of bursting beats. */
            next_beat = next_beat + o.interval_ms > now ? next_beat + o.interval_ms : now;
        }
        uint64_t wake = next_beat;
        const uint64_t deadlines[] = {o.crash_after_ms, o.hang_after_ms, o.exit_after_ms};
        for (size_t i = 0; i < sizeof deadlines / sizeof deadlines[0]; i++) {
            if (deadlines[i] != NO_DEADLINE) {
                wake = min_u64(wake, start + deadlines[i]);
            }
        }
        const uint64_t after = now_ms();
        nap(wake > after ? wake - after : 0);
    }
}
