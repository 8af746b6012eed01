/* Test program for ckpt::proc: three threads (main + 2 workers) each bumping a counter every
 * 5 ms; main prints the counters' sum to stdout every 10 ms. Used to check that a dump stops
 * and records every thread and that all of them run on afterwards. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long counters[2];

static void *worker(void *arg) {
    volatile unsigned long *c = arg;
    struct timespec ts = {0, 5 * 1000 * 1000};
    for (;;) {
        (*c)++;
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(void) {
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, (void *)&counters[i]);
    struct timespec ts = {0, 10 * 1000 * 1000};
    for (unsigned long i = 0;; i++) {
        printf("%lu %lu %lu\n", i, counters[0], counters[1]);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
}
