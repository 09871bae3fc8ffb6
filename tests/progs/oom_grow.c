/* Grows until its memory cgroup's OOM killer ends it: grow() mallocs 1 MiB blocks and touches
 * every page, drip() leaks 4 KiB beside every 8th block. With a cgroup.procs file as argument
 * it joins that group and starts at once (under memleak -c, traced from its first
 * instruction); without, it prints its pid and waits for a line on stdin (so that memleak -p
 * is attached first). Exits 2 if it survives 1 GiB. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK (1 << 20)
#define BLOCKS 1024

static void *kept[BLOCKS];
static void *drops[BLOCKS / 8];

__attribute__((noinline)) static void *grow(void)
{
	char *p = malloc(BLOCK);
	if (p)
		memset(p, 1, BLOCK);
	return p;
}

__attribute__((noinline)) static void *drip(void)
{
	char *p = malloc(4096);
	if (p)
		memset(p, 2, 4096);
	return p;
}

int main(int argc, char **argv)
{
	char line[16];

	if (argc > 1) {
		FILE *procs = fopen(argv[1], "w");
		if (!procs || fprintf(procs, "0\n") < 0 || fclose(procs) != 0) {
			perror(argv[1]);
			return 1;
		}
	} else {
		printf("%d\n", getpid());
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin))
			return 1;
	}
	for (int i = 0; i < BLOCKS; i++) {
		kept[i] = grow();
		if (i % 8 == 0)
			drops[i / 8] = drip();
	}
	fprintf(stderr, "oom_grow: %d MiB and not killed\n", BLOCKS);
	return 2;
}
