/* Allocates one 32-byte block from each of 2^DEPTH distinct call paths (8,192 user stacks), then
 * leaks a known amount from one function: more distinct stacks than a short real run of a
 * program like python has, so that every allocation keeping its stack is a real test of the
 * stack store. Nothing is freed. Usage: many_stacks */
#include <stdlib.h>

#define NOINLINE __attribute__((noinline))
#define DEPTH 13

static void *volatile sink;

NOINLINE void step(int depth, unsigned path);

/* Two call sites per level: the path's bits choose which one each level goes through. */
NOINLINE void left(int depth, unsigned path) { step(depth, path); }
NOINLINE void right(int depth, unsigned path) { step(depth, path); }

NOINLINE void step(int depth, unsigned path) {
	if (depth == 0) {
		sink = malloc(32);
		return;
	}
	if (path & 1)
		left(depth - 1, path >> 1);
	else
		right(depth - 1, path >> 1);
}

NOINLINE void leak_known(void) { /* 7 x 1234 bytes */
	for (int i = 0; i < 7; i++)
		sink = malloc(1234); /* LEAK:leak_known */
}

int main(void) {
	for (unsigned path = 0; path < (1u << DEPTH); path++)
		step(DEPTH, path);
	leak_known();
	return 0;
}
