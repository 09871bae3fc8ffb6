/* Leaks from the cold part of a function: GCC (-O2) moves the path that calls a cold function
 * into .text.unlikely as a symbol of its own, `leak_when_failing.cold`, away from the rest of
 * `leak_when_failing`. The tests read the cold part's expected frame from the ELF symbols.
 * Usage: cold_part    leak 321 bytes on the cold path, then exit */
#include <stdio.h>
#include <stdlib.h>

void *volatile sink;

__attribute__((cold, noinline)) void complain(int n) {
	fprintf(stderr, "cold_part: failing %d\n", n);
}

__attribute__((noinline)) void leak_when_failing(int n, int failing) {
	if (failing) {
		complain(n);
		sink = malloc(n + 320); /* LEAK:leak_when_failing */
		return;
	}
	sink = (void *)(long)n;
}

int main(int argc, char **argv) {
	(void)argv;
	leak_when_failing(argc, argc > 0);
	return 0;
}
