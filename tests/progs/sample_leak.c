/* Leaks known bytes through two functions while churning far more (allocated and freed at
 * once, or a little later), for memleak's sampled estimates (tests/memleak_sampling.rs).
 *   leak_small: 40,000 blocks of 4 KiB (156.25 MiB), much smaller than a 64 KiB mean interval
 *   leak_large: 768 blocks of 96 KiB (72 MiB), 1.5 times a 64 KiB mean interval (below glibc's
 *               128 KiB mmap threshold: from the heap, as the small ones)
 *   churn_small, churn_large: about 2 GiB in 16 B to 120 KiB blocks, all freed
 * Usage: sample_leak [wait]  (gate.h) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gate.h"

#define NOINLINE __attribute__((noinline))

#define SMALL_BLOCKS 40000
#define SMALL_SIZE 4096
#define LARGE_BLOCKS 768
#define LARGE_SIZE (96 * 1024)

static void *volatile sink;
static uint64_t seed = 88172645463325252ull;

/* xorshift64: the same sizes every run. */
static uint64_t next(void) {
	seed ^= seed << 13;
	seed ^= seed >> 7;
	seed ^= seed << 17;
	return seed;
}

NOINLINE void leak_small(void) {
	for (int i = 0; i < SMALL_BLOCKS; i++) {
		char *p = malloc(SMALL_SIZE); /* LEAK:leak_small */
		p[0] = 1;
		sink = p;
	}
}

NOINLINE void leak_large(void) {
	for (int i = 0; i < LARGE_BLOCKS; i++) {
		char *p = malloc(LARGE_SIZE); /* LEAK:leak_large */
		p[0] = 1;
		sink = p;
	}
}

/* 200,000 blocks of 16 to 1024 bytes, each freed 64 allocations later. */
NOINLINE void churn_small(void) {
	void *held[64] = {0};
	for (int i = 0; i < 200000; i++) {
		free(held[i % 64]);
		held[i % 64] = malloc(16 + next() % 1009);
	}
	for (int i = 0; i < 64; i++)
		free(held[i]);
}

/* 30,000 blocks of 4 KiB to 120 KiB (about 1.8 GiB), each freed at once. */
NOINLINE void churn_large(void) {
	for (int i = 0; i < 30000; i++) {
		char *p = malloc(4096 + next() % (116 * 1024));
		p[0] = 1;
		sink = p;
		free(p);
	}
}

/* Churn before, between and after the leaks, so each leak's samples are drawn from a
 * countdown the churn has been consuming. */
static void act(void) {
	churn_small();
	leak_small();
	churn_large();
	leak_large();
	churn_small();
	churn_large();
}

GATED_MAIN(act)
