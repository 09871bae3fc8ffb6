/* Leaks known amounts from C built the way distributions build it: the tests compile this
 * -O2 -fomit-frame-pointer, like Debian's libc. Only the DWARF call-frame information
 * (.eh_frame) leads from malloc back to main: main -> run_leaks -> leak_* -> (libc) -> malloc.
 * One leak is made from a qsort comparator, so the path back crosses libc's sort code.
 *
 * The tests read the expected file:line of each leak from the LEAK: markers below.
 * Usage: unwind_c        leak, then exit
 *        unwind_c wait   print "ready", leak after a line on stdin, print "leaked",
 *                        exit after another line (or EOF) */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gate.h"

/* noclone: an -O2 clone would be named leak_x.constprop.0 */
#define NOINLINE __attribute__((noinline, noclone))

static void *volatile sink; /* keeps the compiler from dropping allocations */
static volatile unsigned after_call; /* a store after a call: no tail call, the caller stays on the stack */

#define TEXT "a string of forty-one characters, no more"

NOINLINE void leak_malloc(void) { /* 5 x 1111 = 5555 bytes */
	for (int i = 0; i < 5; i++)
		sink = malloc(1111); /* LEAK:leak_malloc */
	after_call++;
}

NOINLINE void leak_calloc(void) { /* 3 x 7 x 111 = 2331 bytes */
	for (int i = 0; i < 3; i++)
		sink = calloc(7, 111); /* LEAK:leak_calloc */
	after_call++;
}

NOINLINE void leak_realloc(void) { /* 2 x 2222 = 4444 bytes; each 22-byte block is freed by realloc */
	for (int i = 0; i < 2; i++) {
		void *p = malloc(22);
		sink = realloc(p, 2222); /* LEAK:leak_realloc */
	}
	after_call++;
}

NOINLINE void leak_strdup(void) { /* 4 x (41 characters + NUL) = 168 bytes */
	for (int i = 0; i < 4; i++)
		sink = strdup(TEXT); /* LEAK:leak_strdup */
	after_call++;
}

/* Leaks 333 bytes on its first call only: qsort calls it a number of times that is its own
 * business. */
NOINLINE int compare_and_leak(const void *a, const void *b) {
	static int leaked;
	if (!leaked) {
		leaked = 1;
		sink = malloc(333); /* LEAK:compare_and_leak */
	}
	return *(const int *)a - *(const int *)b;
}

NOINLINE void leak_through_qsort(void) {
	int v[16];
	for (int i = 0; i < 16; i++)
		v[i] = (i * 7) % 16;
	qsort(v, 16, sizeof v[0], compare_and_leak); /* LEAK:leak_through_qsort */
	after_call += v[0];
}

NOINLINE void churn(void) { /* all freed: must not appear in any report */
	for (int i = 0; i < 100; i++) {
		void *a = malloc(1111);
		void *b = calloc(7, 111);
		void *c = realloc(malloc(22), 2222);
		char *d = strdup(TEXT);
		sink = a;
		free(a);
		free(b);
		free(c);
		free(d);
	}
}

NOINLINE void run_leaks(void) {
	leak_malloc();
	after_call++;
	leak_calloc();
	after_call++;
	leak_realloc();
	after_call++;
	leak_strdup();
	after_call++;
	leak_through_qsort();
	after_call++;
	churn();
	after_call++;
}

GATED_MAIN(run_leaks)
