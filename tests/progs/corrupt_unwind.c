/* Leaks LEAKS x 555 bytes from leak_here, with %rbp zeroed so no frame-pointer walk can go
 * past it. tests/common/progs.rs builds it (Flavour::CorruptUnwind) and then overwrites its
 * .eh_frame with bytes no unwinder can read: a walk must stop at leak_here, and say that a
 * malformed table stopped it. */
#include <stdlib.h>

#define LEAKS 3

static void *volatile sink;

__attribute__((noinline)) void leak_here(void) {
	__asm__ volatile("xor %%ebp, %%ebp" ::: "rbp");
	sink = malloc(555); /* LEAK:leak_here */
}

int main(void) {
	for (int i = 0; i < LEAKS; i++)
		leak_here();
	return 0;
}
