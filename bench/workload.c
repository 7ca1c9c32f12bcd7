/*
 * The benchmark's workload: a process with N MiB of touched memory that measures the longest
 * pause it sees, so that the benchmark can tell how long a checkpoint stalls it.
 *
 *   workload MIB [SLEEP_US [FILES_DIR FILES_COUNT FILES_MIB]]
 *
 * 1. optionally writes FILES_MIB MiB of pseudo-random data as FILES_COUNT files into FILES_DIR
 *    (its rootfs: the overlay upperdir), then sync(2);
 * 2. mallocs MIB MiB and touches every page (distinct, non-zero contents);
 * 3. loops: touch one page, read CLOCK_MONOTONIC, keep the longest gap between two iterations,
 *    sleep SLEEP_US (default 1000) microseconds. That loop does no file I/O: a second thread
 *    writes the reports. So the gap is the process being stopped (a checkpoint stops every
 *    thread), not its own report write waiting on the disk: after a checkpoint, containerd writes
 *    the images into its content store, and a write of the workload's could be throttled behind
 *    that writeback for a second or more, with either shim, long after the stop ended.
 *
 * It reports through /maxgap (written as /maxgap.tmp, then renamed: a reader never sees half a
 * file; no file stays open, so a restore into a fresh rootfs does not need it):
 *
 *   gen=G maxgap_us=M iter=I mib=N at_us=T
 *
 * (T: CLOCK_MONOTONIC, in µs, at the end of the longest gap: where in a checkpoint it fell)
 *
 * written once the memory is touched (the file appearing means "ready"), on every new maximum,
 * every 100 ms, and on SIGUSR1, which also starts a new measurement: G goes up, M goes to 0.
 * Built static (`gcc -static -O2`) so that it runs in the busybox image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define REPORT "/maxgap"
#define REPORT_TMP "/maxgap.tmp"

static volatile sig_atomic_t reset_requested;

static void on_usr1(int sig) {
  (void)sig;
  reset_requested = 1;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

static void report(unsigned long gen, uint64_t maxgap_ns, uint64_t iter, unsigned long mib,
                   uint64_t maxgap_at) {
  char buf[160];
  int n = snprintf(buf, sizeof buf, "gen=%lu maxgap_us=%llu iter=%llu mib=%lu at_us=%llu\n", gen,
                   (unsigned long long)(maxgap_ns / 1000), (unsigned long long)iter, mib,
                   (unsigned long long)(maxgap_at / 1000));
  int fd = open(REPORT_TMP, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return; /* a full disk must not kill the workload */
  ssize_t w = write(fd, buf, (size_t)n);
  close(fd);
  if (w == n) rename(REPORT_TMP, REPORT);
}

/* What the loop saw, for the reporter thread. */
static struct {
  pthread_mutex_t lock;
  unsigned long gen, mib;
  uint64_t maxgap, maxgap_at, iter;
  int changed;
} shared = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Writes a report within 5 ms of a new maximum or a reset, and every 100 ms anyway. */
static void *reporter(void *arg) {
  (void)arg;
  struct timespec tick = {.tv_sec = 0, .tv_nsec = 5000000};
  uint64_t last = now_ns();
  for (;;) {
    nanosleep(&tick, NULL);
    pthread_mutex_lock(&shared.lock);
    unsigned long gen = shared.gen, mib = shared.mib;
    uint64_t maxgap = shared.maxgap, iter = shared.iter, at = shared.maxgap_at;
    int changed = shared.changed;
    shared.changed = 0;
    pthread_mutex_unlock(&shared.lock);
    uint64_t t = now_ns();
    if (changed || t - last > 100000000ull) {
      report(gen, maxgap, iter, mib, at);
      last = t;
    }
  }
  return NULL;
}

static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static void write_files(const char *dir, unsigned long count, unsigned long mib) {
  const size_t chunk = 1 << 20;
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  uint64_t *buf = malloc(chunk);
  if (!buf) die("malloc");
  for (size_t i = 0; i < chunk / 8; i++) buf[i] = xorshift(&seed);
  if (mkdir(dir, 0755) < 0 && errno != EEXIST) die("mkdir");
  uint64_t total = (uint64_t)mib << 20;
  uint64_t per_file = total / count;
  for (unsigned long f = 0; f < count; f++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/f%05lu", dir, f);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("open");
    uint64_t left = per_file + (f + 1 == count ? total % count : 0);
    while (left > 0) {
      size_t n = left < chunk ? (size_t)left : chunk;
      buf[0] = xorshift(&seed); /* no two chunks alike */
      ssize_t w = write(fd, buf, n);
      if (w <= 0) die("write");
      left -= (uint64_t)w;
    }
    close(fd);
  }
  free(buf);
  sync();
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MIB [SLEEP_US [FILES_DIR FILES_COUNT FILES_MIB]]\n", argv[0]);
    return 2;
  }
  unsigned long mib = strtoul(argv[1], NULL, 10);
  unsigned long sleep_us = argc > 2 ? strtoul(argv[2], NULL, 10) : 1000;
  if (argc > 5) write_files(argv[3], strtoul(argv[4], NULL, 10), strtoul(argv[5], NULL, 10));

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGUSR1, &sa, NULL) < 0) die("sigaction");

  size_t pages = mib == 0 ? 1 : (size_t)mib * ((1 << 20) / PAGE);
  unsigned char *mem = malloc(pages * PAGE);
  if (!mem) die("malloc");
  for (size_t p = 0; p < pages; p++) memset(mem + p * PAGE, (int)(p % 255) + 1, PAGE);

  /* Reports from the thread, signals to the loop: block SIGUSR1 while the thread is made. */
  sigset_t usr1, old;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, &old);
  shared.mib = mib;
  report(0, 0, 0, mib, 0);
  pthread_t reporter_thread;
  if (pthread_create(&reporter_thread, NULL, reporter, NULL) != 0) die("pthread_create");
  pthread_sigmask(SIG_SETMASK, &old, NULL);

  unsigned long gen = 0;
  uint64_t iter = 0, maxgap = 0, maxgap_at = 0;
  uint64_t prev = now_ns();
  struct timespec nap = {.tv_sec = (time_t)(sleep_us / 1000000), .tv_nsec = (long)(sleep_us % 1000000) * 1000};
  for (;;) {
    mem[(iter % pages) * PAGE + (iter / pages) % PAGE]++;
    iter++;
    uint64_t t = now_ns();
    int changed = 0;
    if (reset_requested) {
      reset_requested = 0;
      gen++;
      maxgap = 0;
      changed = 1;
    } else if (t - prev > maxgap) {
      maxgap = t - prev;
      maxgap_at = t;
      changed = 1;
    }
    prev = t;
    pthread_mutex_lock(&shared.lock);
    shared.gen = gen;
    shared.maxgap = maxgap;
    shared.maxgap_at = maxgap_at;
    shared.iter = iter;
    shared.changed |= changed;
    pthread_mutex_unlock(&shared.lock);
    if (sleep_us) nanosleep(&nap, NULL);
  }
}
