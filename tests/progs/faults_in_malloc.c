/* After a line on stdin, makes BLOCKS allocations of 256 KiB from grow(), each big enough
 * for glibc to give it a fresh mapping whose header it writes inside malloc: one page fault
 * in the allocator per block, while a uretprobe on malloc (memleak's) has replaced
 * malloc's return address with its trampoline. Prints "done", then waits for stdin to close. */
#include <stdio.h>
#include <stdlib.h>

#define BLOCKS 64

static void *volatile sink;

__attribute__((noinline)) void grow(void) {
	for (int i = 0; i < BLOCKS; i++)
		sink = malloc(256 * 1024); /* LEAK:grow */
}

int main(void) {
	char line[16];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	if (!fgets(line, sizeof line, stdin))
		return 1;
	grow();
	printf("done\n");
	while (fgets(line, sizeof line, stdin)) {
	}
	return 0;
}
