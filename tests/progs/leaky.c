/* Leaks known amounts through every allocator entry point memleak probes, each from its own
 * function, and frees other blocks that must not be reported.
 *
 * The tests read the expected file:line of each leak from the LEAK: markers below.
 * Usage: leaky        leak, then exit
 *        leaky wait   print "ready", leak after a line on stdin, print "leaked",
 *                     exit after another line (or EOF) */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "gate.h"

#define NOINLINE __attribute__((noinline))

static void *volatile sink; /* keeps the compiler from dropping allocations */

NOINLINE void leak_malloc(void) { /* 3 x 1000 = 3000 bytes */
	for (int i = 0; i < 3; i++)
		sink = malloc(1000); /* LEAK:leak_malloc */
}

NOINLINE void leak_calloc(void) { /* 2 x 10 x 100 = 2000 bytes */
	for (int i = 0; i < 2; i++)
		sink = calloc(10, 100); /* LEAK:leak_calloc */
}

NOINLINE void leak_realloc(void) { /* 700 bytes; the 50-byte block is freed by realloc */
	void *p = malloc(50);
	sink = realloc(p, 700); /* LEAK:leak_realloc */
}

NOINLINE void leak_realloc_null(void) { /* 300 bytes: glibc's realloc(NULL) calls malloc inside */
	sink = realloc(NULL, 300); /* LEAK:leak_realloc_null */
}

NOINLINE void leak_reallocarray(void) { /* 4 x 90 = 360 bytes */
	sink = reallocarray(NULL, 4, 90); /* LEAK:leak_reallocarray */
}

NOINLINE void leak_posix_memalign(void) { /* 640 bytes */
	void *p = NULL;
	if (posix_memalign(&p, 64, 640) == 0) /* LEAK:leak_posix_memalign */
		sink = p;
}

NOINLINE void leak_aligned_alloc(void) { /* 1280 bytes */
	sink = aligned_alloc(128, 1280); /* LEAK:leak_aligned_alloc */
}

NOINLINE void leak_memalign(void) { /* 2560 bytes */
	sink = memalign(256, 2560); /* LEAK:leak_memalign */
}

NOINLINE void leak_valloc(void) { /* 5000 bytes */
	sink = valloc(5000); /* LEAK:leak_valloc */
}

NOINLINE void leak_pvalloc(void) { /* 6000 bytes requested */
	sink = pvalloc(6000); /* LEAK:leak_pvalloc */
}

NOINLINE void leak_mmap(void) { /* 3 pages = 12288 bytes */
	sink = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); /* LEAK:leak_mmap */
}

NOINLINE void no_leak(void) { /* all freed: must not appear in any report */
	for (int i = 0; i < 5; i++) {
		void *a = malloc(777);
		void *b = calloc(7, 111);
		void *c = realloc(malloc(33), 4444);
		free(a);
		free(b);
		free(c);
	}
	void *m = mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	munmap(m, 2 * 4096);
}

static void leak_all(void) {
	leak_malloc();
	leak_calloc();
	leak_realloc();
	leak_realloc_null();
	leak_reallocarray();
	leak_posix_memalign();
	leak_aligned_alloc();
	leak_memalign();
	leak_valloc();
	leak_pvalloc();
	leak_mmap();
	no_leak();
}

GATED_MAIN(leak_all)
