/* Writes glibc never notices, for memleak --watch to catch. Each round (about 20 ms, for
 * argv[2] ms in all, default 3000) makes 8 blocks in make_block, then a thread started for the
 * round (so most start between two moves of the watchpoints) writes to them:
 *   watch_writes past-end    4 bytes just past the end of each 36-byte block (its slack in
 *                            glibc's 48-byte chunk), in write_past_end, while the blocks live
 *   watch_writes after-free  bytes 16..119 of each 120-byte block 10 ms after release freed it
 *                            (past the links glibc keeps in a freed block), in scribble
 *   watch_writes clean       the same blocks and threads, every write in bounds, before the free
 * Prints "done" and exits 0. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
#define BLOCKS 8

enum mode { PAST_END, AFTER_FREE, CLEAN };

static enum mode mode;
static size_t size;
static char *volatile blocks[BLOCKS];

NOINLINE char *make_block(size_t n) {
	return malloc(n); /* ALLOC:make_block */
}

NOINLINE void release(char *p) {
	free(p); /* FREE:release */
}

NOINLINE void write_past_end(char *p) {
	*(volatile uint32_t *)(p + size) = 0x21646162; /* ERROR:write_past_end */
}

/* Word by word, so that the writing instruction is this function's (not memset's). */
NOINLINE void scribble(char *p) {
	for (size_t i = 16; i < size; i += 8) *(volatile uint64_t *)(p + i) = 0x7878787878787878; /* ERROR:scribble */
}

NOINLINE void write_in_bounds(char *p) {
	*(volatile uint32_t *)(p + size - 4) = 0x21646f67;
}

static void *writer(void *arg) {
	(void)arg;
	for (int i = 0; i < BLOCKS; i++) {
		switch (mode) {
		case PAST_END: write_past_end(blocks[i]); break;
		case AFTER_FREE: scribble(blocks[i]); break;
		case CLEAN: write_in_bounds(blocks[i]); break;
		}
	}
	return NULL;
}

static void in_thread(void) {
	pthread_t t;
	if (pthread_create(&t, NULL, writer, NULL) != 0 || pthread_join(t, NULL) != 0) {
		perror("pthread");
		exit(1);
	}
}

static double now_ms(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
	const char *m = argc > 1 ? argv[1] : "past-end";
	mode = !strcmp(m, "after-free") ? AFTER_FREE : !strcmp(m, "clean") ? CLEAN : PAST_END;
	size = mode == AFTER_FREE ? 120 : 36;
	double end = now_ms() + (argc > 2 ? atof(argv[2]) : 3000);
	while (now_ms() < end) {
		for (int i = 0; i < BLOCKS; i++)
			blocks[i] = make_block(size);
		usleep(10000);
		if (mode == AFTER_FREE) {
			for (int i = 0; i < BLOCKS; i++)
				release(blocks[i]);
			usleep(10000);
			in_thread();
		} else {
			in_thread();
			usleep(10000);
			for (int i = 0; i < BLOCKS; i++)
				release(blocks[i]);
			/* Freed blocks to watch, which the next round's malloc takes back. */
			usleep(20000);
		}
	}
	puts("done");
	return 0;
}
