/*
 * The lazy-migration workload: memory whose every byte can be checked.
 *
 *   memhog MIB SEED
 *
 * 1. mallocs MIB MiB and fills it with a PRNG stream (xorshift64*, seeded by SEED);
 * 2. loops every 50 ms: bumps a counter (its own small hot set, not the big region) and reports
 *    through /memhog (written as /memhog.tmp, then renamed):
 *
 *      tick=T mib=N verified=V bad=B
 *
 *    the file appearing means "filled";
 * 3. on SIGUSR1 regenerates the stream and compares all MIB MiB with it (touching every page):
 *    V counts finished verifications, B the words that differed (0: the memory is intact).
 *
 * So after a lazy restore the process runs while touching one page per tick, and the pages
 * arrive without it; a SIGUSR1 afterwards proves that all of them arrived intact.
 * Built static (`gcc -static -O2`) so that it runs in the busybox image.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t verify_requested;

static void on_usr1(int sig) {
  (void)sig;
  verify_requested = 1;
}

static uint64_t next(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1Dull;
}

static void report(unsigned long tick, unsigned long mib, unsigned long verified,
                   unsigned long long bad) {
  char buf[128];
  int n = snprintf(buf, sizeof buf, "tick=%lu mib=%lu verified=%lu bad=%llu\n", tick, mib,
                   verified, bad);
  int fd = open("/memhog.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  if (write(fd, buf, (size_t)n) == n) {
    close(fd);
    rename("/memhog.tmp", "/memhog");
  } else {
    close(fd);
  }
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: memhog MIB SEED\n");
    return 2;
  }
  unsigned long mib = strtoul(argv[1], NULL, 10);
  uint64_t seed = strtoull(argv[2], NULL, 10) | 1;
  size_t words = mib * (1024 * 1024 / 8);
  uint64_t *mem = malloc(words * 8);
  if (!mem) {
    perror("malloc");
    return 1;
  }
  uint64_t s = seed;
  for (size_t i = 0; i < words; i++) mem[i] = next(&s);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sigaction(SIGUSR1, &sa, NULL);
  unsigned long tick = 0, verified = 0;
  unsigned long long bad = 0;
  struct timespec pause = {0, 50 * 1000 * 1000};
  for (;;) {
    if (verify_requested) {
      verify_requested = 0;
      unsigned long long b = 0;
      s = seed;
      for (size_t i = 0; i < words; i++)
        if (mem[i] != next(&s)) b++;
      bad = b;
      verified++;
    }
    report(++tick, mib, verified, bad);
    nanosleep(&pause, NULL);
  }
}
