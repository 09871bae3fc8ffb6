/* The allocator workload of `cargo xtask bench`: mixed sizes through malloc, calloc, realloc
 * and free over a sliding window of live blocks, plus a known leak spread evenly through the
 * run (64 bytes from bench_leak every LEAK_EVERY iterations) that every traced run must report:
 * exactly when every call is probed, within 20% under --duty-cycle.
 *
 * Usage: bench_malloc [ITERATIONS]. Prints "ready", waits for a line on stdin (so a tracer
 * can attach), runs, prints "calls N ns T", exits. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define WINDOW 512
#define LEAK_EVERY 200

static void *volatile sink;
static unsigned long calls;

__attribute__((noinline)) void bench_leak(void) {
	sink = malloc(64);
	calls++;
}

static unsigned next(unsigned *state) { /* xorshift: the same sizes every run */
	*state ^= *state << 13;
	*state ^= *state >> 17;
	*state ^= *state << 5;
	return *state;
}

int main(int argc, char **argv) {
	long iterations = argc > 1 ? atol(argv[1]) : 200000;
	void *window[WINDOW] = {0};
	unsigned state = 2463534242u;
	char line[16];
	struct timespec t0, t1;

	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < iterations; i++) {
		unsigned r = next(&state);
		if (i % LEAK_EVERY == 0)
			bench_leak();
		int slot = r % WINDOW;
		size_t size = 16 + (r >> 8) % 2048;
		switch (r % 4) {
		case 0:
			free(window[slot]);
			window[slot] = malloc(size);
			calls += 2;
			break;
		case 1:
			free(window[slot]);
			window[slot] = calloc(1, size);
			calls += 2;
			break;
		case 2:
			window[slot] = realloc(window[slot], size);
			calls += 1;
			break;
		default:
			free(window[slot]);
			window[slot] = NULL;
			calls += 1;
		}
	}
	for (int i = 0; i < WINDOW; i++) {
		free(window[i]);
		calls++;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	long ns = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
	printf("calls %lu ns %ld\n", calls, ns);
	fflush(stdout);
	return 0;
}
