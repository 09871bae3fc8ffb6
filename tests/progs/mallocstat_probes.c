/* Fires glibc's malloc probes (provider libc, probe names and argument layouts as glibc's
 * malloc declares them) a known number of times, from this program's own <sys/sdt.h> notes:
 * Debian builds glibc without them. No allocation happens through them: only the probes fire.
 * Prints "ready", fires after a line on stdin (or at its end), prints "fired=N", exits at end
 * of input. */
#include <stddef.h>
#include <stdio.h>
#include <sys/sdt.h>

#define NOINLINE __attribute__((noinline))

static char heap_area[1 << 16];
static int fired;

/* Heap growth, which mallocstat shows with its stack: 3 sbrk_more of 4096 bytes each, then 2
 * new heaps (135168 and 65536 bytes) and 1 heap growth to 200704 bytes, and 1 new arena. */
static NOINLINE void grow(void) {
	for (int i = 0; i < 3; i++) {
		size_t size = 4096;
		DTRACE_PROBE2(libc, memory_sbrk_more, heap_area + i * size, size); /* GROW:sbrk */
		fired++;
	}
	DTRACE_PROBE2(libc, memory_heap_new, heap_area, (size_t)135168);
	DTRACE_PROBE2(libc, memory_heap_new, heap_area + 4096, (size_t)65536);
	DTRACE_PROBE2(libc, memory_heap_more, heap_area, (size_t)200704);
	DTRACE_PROBE2(libc, memory_arena_new, heap_area, (size_t)2264);
	fired += 4;
}

/* Tunables, retries and a double free, each an event of its own. */
static NOINLINE void tune(void) {
	int param = -3, value = 262144; /* M_MMAP_THRESHOLD */
	DTRACE_PROBE2(libc, memory_mallopt, param, value);
	DTRACE_PROBE3(libc, memory_mallopt_mmap_threshold, value, 131072, 0);
	for (size_t bytes = 1000; bytes <= 2000; bytes += 1000)
		DTRACE_PROBE1(libc, memory_malloc_retry, bytes);
	DTRACE_PROBE2(libc, memory_tcache_double_free, heap_area, 3);
	fired += 5;
}

int main(void) {
	char line[64];
	printf("ready\n");
	fflush(stdout);
	/* A line, or no input at all (run by a tracer's -c): either way, fire. */
	if (!fgets(line, sizeof line, stdin))
		line[0] = 0;
	grow();
	tune();
	printf("fired=%d\n", fired);
	fflush(stdout);
	while (fgets(line, sizeof line, stdin))
		;
	return 0;
}
