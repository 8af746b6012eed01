/*
 * kvstate.c: a stateful service whose whole state lives in libft's critical memory, for trying
 * checkpoint and recovery by hand and in end-to-end tests. Same options, operations, digest and
 * output lines as the Rust examples/src/bin/kvstate.rs.
 *
 * The state is a hash table of chained entries: a global registered with ft_critical points to
 * the table in the critical heap, the table to its bucket array, buckets to entries, entries to
 * the next entry and to their key and value strings -- all t_ftmalloc blocks linked by plain
 * pointers, which stay valid after t_recover because the heap lives at a fixed address. At
 * start-up it recovers the newest good checkpoint and prints "recovered seq S counter C digest
 * D" (or "fresh start") and t_recover_report(). Then each step applies one deterministic
 * operation (a pure function of the counter), heartbeats, and calls t_safe_point() (periodic
 * checkpoints from FT_CKPT_EVERY, and those asked for by `ftctl checkpoint`); every --sync-every
 * operations it calls t_checkpoint_sync(0) and appends "checkpoint seq S counter C digest D" to
 * --journal. Only those are journaled. D is an FNV-1a digest of the whole table, computed by
 * walking the pointers. The table's layout is the Rust program's, so under one identity
 * (FT_SERVICE, which places the heap) each program recovers the other's checkpoints.
 *
 * SIGUSR1 crashes it at once (abort), SIGUSR2 makes it hang (no more heartbeats).
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ft.h"

/* The thread id the program heartbeats for. */
#define TID 1u
/* The checkpoint stream holding the state ($FT_CKPT_DIR/0). */
#define STREAM 0u
#define DEFAULT_INTERVAL_MS 20u
#define DEFAULT_TIMEOUT_MS 1000u
#define DEFAULT_SYNC_EVERY 50u
/* How long one sleep of a hung program lasts; it sleeps in a loop forever. */
#define HANG_NAP_S 3600u
/* libft's store root when FT_CKPT_DIR is unset, and the layout of its image names. */
#define DEFAULT_CKPT_DIR "ft-ckpt"
#define SEQ_DIGITS 20
#define IMAGE_SUFFIX ".ckpt"

/* Buckets of the hash table. */
#define NBUCKETS 64u
/* Keys are k0 .. k<KEYSPACE-1>, which bounds the table however long the program runs. */
#define KEYSPACE 500u
/* Every DELETE_EVERY-th operation also deletes the key k<(counter * DELETE_STRIDE) % KEYSPACE>. */
#define DELETE_EVERY 3u
#define DELETE_STRIDE 7u
/* Values are v<counter> followed by counter % VALUE_PAD_CYCLE '+' characters. */
#define VALUE_PAD_CYCLE 16u
/* Longest key or value text, terminator included. */
#define TEXT_MAX 48
/* Mark an initialised table and global ("KVTABLE1", "KVGLOBL1" read little-endian). */
#define TABLE_MAGIC UINT64_C(0x31454c424154564b)
#define GLOBAL_MAGIC UINT64_C(0x314c424f4c47564b)
#define FNV_OFFSET UINT64_C(0xcbf29ce484222325)
#define FNV_PRIME UINT64_C(0x100000001b3)

static const char USAGE[] =
    "usage: kvstate [--interval-ms I] [--timeout-ms T] [--sync-every N] [--journal PATH]\n"
    "  Recovers its key-value table from the newest good checkpoint in $FT_CKPT_DIR/0, registers\n"
    "  with watchd (FT_SOCKET), reports ready, then applies one operation every I ms (default 20),\n"
    "  heartbeating thread 1 with a deadline of T ms (default 1000) and calling the safe point.\n"
    "  Every N operations (default 50, 0 = never) it takes a synchronous checkpoint and appends\n"
    "  `checkpoint seq S counter C digest D` to PATH. SIGUSR1 aborts now, SIGUSR2 hangs now.\n";

/* Set by the SIGUSR2 handler; the main loop hangs when it sees it. */
static volatile sig_atomic_t hang_requested = 0;

struct entry {
    struct entry *next;
    char *key;   /* klen bytes, no terminator */
    char *value; /* vlen bytes, no terminator */
    uint32_t klen;
    uint32_t vlen;
};

struct table {
    uint64_t magic;
    uint64_t counter; /* operations applied since the fresh start */
    uint64_t count;   /* live entries */
    uint64_t nbuckets;
    struct entry **buckets; /* NBUCKETS chain heads, a heap block of its own */
};

/* The ft_critical region: how a recovered process finds its table. */
static struct global {
    uint64_t magic;
    struct table *table;
} global;

struct options {
    uint64_t interval_ms;
    uint32_t timeout_ms;
    uint64_t sync_every;
    const char *journal; /* NULL: no journal */
};

/* Prints one line and flushes at once, so that a supervisor's log shows it before a crash. */
#define SAY(...)                                         \
    do {                                                 \
        printf("kvstate[%ld]: ", (long)getpid());        \
        printf(__VA_ARGS__);                             \
        putchar('\n');                                   \
        fflush(stdout);                                  \
    } while (0)

static int parse_number(const char *flag, const char *value, uint64_t max, uint64_t *out) {
    char *end = NULL;
    errno = 0;
    if (value[0] < '0' || value[0] > '9') {
        fprintf(stderr, "kvstate: %s: \"%s\" is not a number\n", flag, value);
        return -1;
    }
    unsigned long long n = strtoull(value, &end, 10);
    if (errno != 0 || *end != '\0' || n > max) {
        fprintf(stderr, "kvstate: %s: \"%s\" is not a number from 0 to %llu\n", flag, value,
                (unsigned long long)max);
        return -1;
    }
    *out = (uint64_t)n;
    return 0;
}

static int parse_options(int argc, char **argv, struct options *o) {
    o->interval_ms = DEFAULT_INTERVAL_MS;
    o->timeout_ms = DEFAULT_TIMEOUT_MS;
    o->sync_every = DEFAULT_SYNC_EVERY;
    o->journal = NULL;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
            return -1;
        }
        const char *value = i + 1 < argc ? argv[++i] : NULL;
        if (value == NULL) {
            fprintf(stderr, "kvstate: %s needs a value\n", flag);
            return -1;
        }
        uint64_t n = 0;
        if (strcmp(flag, "--interval-ms") == 0) {
            if (parse_number(flag, value, UINT64_MAX, &n) != 0) return -1;
            o->interval_ms = n > 0 ? n : 1;
        } else if (strcmp(flag, "--timeout-ms") == 0) {
            if (parse_number(flag, value, UINT32_MAX, &n) != 0) return -1;
            o->timeout_ms = (uint32_t)n;
        } else if (strcmp(flag, "--sync-every") == 0) {
            if (parse_number(flag, value, UINT64_MAX, &o->sync_every) != 0) return -1;
        } else if (strcmp(flag, "--journal") == 0) {
            o->journal = value;
        } else {
            fprintf(stderr, "kvstate: unknown option %s\n", flag);
            return -1;
        }
    }
    return 0;
}

/* FNV-1a, 64 bits: the digest both programs compute over the table. */
static void fnv_bytes(uint64_t *h, const void *data, size_t len) {
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++) {
        *h ^= p[i];
        *h *= FNV_PRIME;
    }
}

static void fnv_u64(uint64_t *h, uint64_t v) {
    unsigned char le[8];
    for (int i = 0; i < 8; i++) {
        le[i] = (unsigned char)(v >> (8 * i));
    }
    fnv_bytes(h, le, sizeof le);
}

static uint64_t bucket_of(const char *key, size_t klen) {
    uint64_t h = FNV_OFFSET;
    fnv_bytes(&h, key, klen);
    return h % NBUCKETS;
}

/* Copies `len` bytes into a new heap block; NULL when the heap is exhausted. */
static char *heap_copy(const char *text, size_t len) {
    char *p = t_ftmalloc(len);
    if (p != NULL) {
        memcpy(p, text, len);
    }
    return p;
}

/* An empty table, made the global's target. 0, or -1 when the heap is exhausted. */
static int table_create(void) {
    struct entry **buckets = t_ftmalloc(NBUCKETS * sizeof *buckets);
    struct table *t = t_ftmalloc(sizeof *t);
    if (buckets == NULL || t == NULL) {
        t_ftfree(buckets);
        t_ftfree(t);
        return -1;
    }
    for (unsigned i = 0; i < NBUCKETS; i++) {
        buckets[i] = NULL;
    }
    t->magic = TABLE_MAGIC;
    t->counter = 0;
    t->count = 0;
    t->nbuckets = NBUCKETS;
    t->buckets = buckets;
    global.table = t;
    global.magic = GLOBAL_MAGIC;
    return 0;
}

/* The link that points to `key`'s entry (a chain head or a `next` field), or NULL. */
static struct entry **find(struct table *t, const char *key, size_t klen) {
    struct entry **link = &t->buckets[bucket_of(key, klen)];
    while (*link != NULL) {
        struct entry *e = *link;
        if (e->klen == klen && memcmp(e->key, key, klen) == 0) {
            return link;
        }
        link = &e->next;
    }
    return NULL;
}

/* Sets `key` to `value`: replaces the value block of an existing entry, or links a new entry at
 * the head of its chain. Allocates everything before changing anything. 0, or -1 (heap full). */
static int put(struct table *t, const char *key, size_t klen, const char *value, size_t vlen) {
    char *v = heap_copy(value, vlen);
    if (v == NULL) {
        return -1;
    }
    struct entry **link = find(t, key, klen);
    if (link != NULL) {
        char *old = (*link)->value;
        (*link)->value = v;
        (*link)->vlen = (uint32_t)vlen;
        t_ftfree(old);
        return 0;
    }
    char *k = heap_copy(key, klen);
    struct entry *e = t_ftmalloc(sizeof *e);
    if (k == NULL || e == NULL) {
        t_ftfree(v);
        t_ftfree(k);
        t_ftfree(e);
        return -1;
    }
    struct entry **head = &t->buckets[bucket_of(key, klen)];
    e->next = *head;
    e->key = k;
    e->value = v;
    e->klen = (uint32_t)klen;
    e->vlen = (uint32_t)vlen;
    *head = e;
    t->count++;
    return 0;
}

/* Unlinks and frees `key`'s entry, if there is one. */
static void delete(struct table *t, const char *key, size_t klen) {
    struct entry **link = find(t, key, klen);
    if (link == NULL) {
        return;
    }
    struct entry *e = *link;
    *link = e->next;
    t_ftfree(e->key);
    t_ftfree(e->value);
    t_ftfree(e);
    t->count--;
}

/* Operation number counter + 1: a pure function of the counter, identical in Rust. */
static int step(struct table *t) {
    const uint64_t c = t->counter + 1;
    char key[TEXT_MAX];
    char value[TEXT_MAX];
    int klen = snprintf(key, sizeof key, "k%" PRIu64, c % KEYSPACE);
    int vlen = snprintf(value, sizeof value, "v%" PRIu64, c);
    for (uint64_t pad = c % VALUE_PAD_CYCLE; pad > 0; pad--) {
        value[vlen++] = '+';
    }
    if (put(t, key, (size_t)klen, value, (size_t)vlen) != 0) {
        return -1;
    }
    if (c % DELETE_EVERY == 0) {
        klen = snprintf(key, sizeof key, "k%" PRIu64, (c * DELETE_STRIDE) % KEYSPACE);
        delete(t, key, (size_t)klen);
    }
    t->counter = c;
    return 0;
}

/* Walks every chain and digests the counter, the entry count, and each entry's bucket, key and
 * value in chain order. 0, or -1 with `why` filled when the walk finds more entries than the
 * table counts (a broken recovered structure). */
static int digest(const struct table *t, uint64_t *out, char *why, size_t why_len) {
    uint64_t h = FNV_OFFSET;
    uint64_t seen = 0;
    fnv_u64(&h, t->counter);
    fnv_u64(&h, t->count);
    for (uint64_t b = 0; b < NBUCKETS; b++) {
        for (const struct entry *e = t->buckets[b]; e != NULL; e = e->next) {
            if (++seen > t->count) {
                snprintf(why, why_len, "more entries than the table's count %" PRIu64, t->count);
                return -1;
            }
            fnv_u64(&h, b);
            fnv_u64(&h, e->klen);
            fnv_bytes(&h, e->key, e->klen);
            fnv_u64(&h, e->vlen);
            fnv_bytes(&h, e->value, e->vlen);
        }
    }
    if (seen != t->count) {
        snprintf(why, why_len, "%" PRIu64 " entries reachable, the table counts %" PRIu64, seen,
                 t->count);
        return -1;
    }
    *out = h;
    return 0;
}

/* The newest committed image of the stream: t_checkpoint_sync does not return its sequence
 * number, and once it returned no other image of the stream is being written. */
static uint64_t newest_seq(void) {
    const char *root = getenv("FT_CKPT_DIR");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%u", root != NULL && root[0] != '\0' ? root : DEFAULT_CKPT_DIR,
             STREAM);
    DIR *d = opendir(dir);
    if (d == NULL) {
        return 0;
    }
    uint64_t best = 0;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        const char *name = ent->d_name;
        if (strlen(name) != SEQ_DIGITS + strlen(IMAGE_SUFFIX) ||
            strcmp(name + SEQ_DIGITS, IMAGE_SUFFIX) != 0) {
            continue;
        }
        uint64_t seq = 0;
        int digits = 1;
        for (int i = 0; i < SEQ_DIGITS; i++) {
            if (name[i] < '0' || name[i] > '9') {
                digits = 0;
                break;
            }
            seq = seq * 10u + (uint64_t)(name[i] - '0');
        }
        if (digits && seq > best) {
            best = seq;
        }
    }
    closedir(d);
    return best;
}

static void on_sigusr1(int sig) {
    static const char msg[] = "kvstate: SIGUSR1, crashing now (abort)\n";
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

/* Says a failure once per distinct code (watchd may be down for a while). */
static void complain(const char *call, int rc, int *last) {
    if (rc == FT_OK && *last != FT_OK) {
        SAY("%s works again", call);
    } else if (rc != FT_OK && rc != *last) {
        SAY("%s failed: %s", call, ft_strerror(rc));
    }
    *last = rc;
}

/* Registers the global and recovers: the recovered table or a fresh one, else NULL. */
static struct table *recover(void) {
    int rc = ft_critical(&global, sizeof global);
    if (rc != FT_OK) {
        SAY("ft_critical failed: %s", ft_strerror(rc));
        return NULL;
    }
    int64_t seq = t_recover(STREAM);
    if (seq < 0) {
        SAY("recovery report: %s", t_recover_report());
        SAY("t_recover failed: %s", ft_strerror((int)seq));
        return NULL;
    }
    if (seq == 0) {
        SAY("fresh start");
        if (table_create() != 0) {
            SAY("critical heap: %s", ft_strerror(FT_ENOMEM));
            return NULL;
        }
        SAY("recovery report: %s", t_recover_report());
        return global.table;
    }
    struct table *t = global.table;
    if (global.magic != GLOBAL_MAGIC || t == NULL) {
        SAY("corrupt state: the recovered global holds no table");
        return NULL;
    }
    if (t->magic != TABLE_MAGIC || t->nbuckets != NBUCKETS) {
        SAY("corrupt state: table at %p has magic %#" PRIx64 " and %" PRIu64 " buckets",
            (void *)t, t->magic, t->nbuckets);
        return NULL;
    }
    uint64_t d = 0;
    char why[128];
    if (digest(t, &d, why, sizeof why) != 0) {
        SAY("corrupt state: %s", why);
        return NULL;
    }
    SAY("recovered seq %" PRId64 " counter %" PRIu64 " digest %016" PRIx64, seq, t->counter, d);
    SAY("recovery report: %s", t_recover_report());
    return t;
}

/* Takes a synchronous checkpoint and journals it. FT_OK or an FT_E* code. */
static int sync_checkpoint(const struct table *t, int journal, int registered) {
    int rc = t_checkpoint_sync(STREAM);
    if (rc != FT_OK) {
        return rc;
    }
    uint64_t d = 0;
    char why[128];
    if (digest(t, &d, why, sizeof why) != 0) {
        SAY("corrupt state: %s", why);
        return FT_ECORRUPT;
    }
    const uint64_t seq = newest_seq();
    char line[160];
    int len = snprintf(line, sizeof line, "checkpoint seq %" PRIu64 " counter %" PRIu64
                       " digest %016" PRIx64 "\n", seq, t->counter, d);
    if (len <= 0 || (size_t)len >= sizeof line) {
        return FT_EINVAL;
    }
    if (journal >= 0) {
        /* One write per line, so a killed program leaves whole lines. */
        if (write(journal, line, (size_t)len) != (ssize_t)len) {
            SAY("cannot append to the journal: %s", strerror(errno));
        }
    }
    line[len - 1] = '\0';
    SAY("%s", line);
    if (registered) {
        char status[96];
        snprintf(status, sizeof status, "counter %" PRIu64 ", checkpoint #%" PRIu64, t->counter,
                 seq);
        ft_status(status);
    }
    return FT_OK;
}

int main(int argc, char **argv) {
    struct options o;
    if (parse_options(argc, argv, &o) != 0) {
        fputs(USAGE, stderr);
        return 2;
    }
    install_handler(SIGUSR1, on_sigusr1);
    install_handler(SIGUSR2, on_sigusr2);
    int journal = -1;
    if (o.journal != NULL) {
        journal = open(o.journal, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (journal < 0) {
            SAY("cannot open the journal %s: %s", o.journal, strerror(errno));
            return 2;
        }
    }

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
    struct table *t = recover();
    if (t == NULL) {
        return 1;
    }
    if (registered) {
        char status[64];
        rc = ft_ready();
        if (rc != FT_OK) {
            SAY("ft_ready failed: %s", ft_strerror(rc));
        }
        snprintf(status, sizeof status, "counter %" PRIu64, t->counter);
        ft_status(status);
    }
    SAY("ready: one operation every %" PRIu64 " ms, synchronous checkpoint every %" PRIu64
        " operations", o.interval_ms, o.sync_every);

    int hbeat_failure = FT_OK;
    int safe_point_failure = FT_OK;
    int sync_failure = FT_OK;
    for (;;) {
        if (hang_requested) {
            hang_forever();
        }
        if (step(t) != 0) {
            SAY("operation %" PRIu64 " failed: %s", t->counter + 1, ft_strerror(FT_ENOMEM));
            return 1;
        }
        if (registered) {
            complain("ft_hbeat", ft_hbeat(TID, o.timeout_ms), &hbeat_failure);
        }
        /* Also serves `ftctl checkpoint` requests, looked for every 100 ms. */
        complain("t_safe_point", t_safe_point(), &safe_point_failure);
        if (o.sync_every > 0 && t->counter % o.sync_every == 0) {
            complain("checkpoint", sync_checkpoint(t, journal, registered), &sync_failure);
        }
        nap(o.interval_ms);
    }
}
