/* Makes steady progress a test can watch: each tick leaks 100 bytes from leak_tick(), writes
 * the number of ticks so far to FILE (8 digits, in place), then sleeps 20 ms.
 * Usage: ticker TICKS FILE [ignore-term]   exits 0 after TICKS ticks; with "ignore-term" it
 *                                          ignores SIGTERM */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink;

NOINLINE void leak_tick(void) {
	sink = malloc(100); /* LEAK:leak_tick */
}

int main(int argc, char **argv) {
	if (argc < 3)
		return 2;
	if (argc > 3 && strcmp(argv[3], "ignore-term") == 0)
		signal(SIGTERM, SIG_IGN);
	int ticks = atoi(argv[1]);
	int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return 2;
	struct timespec pause = {0, 20 * 1000 * 1000};
	for (int i = 1; i <= ticks; i++) {
		leak_tick();
		char count[16];
		snprintf(count, sizeof count, "%08d\n", i);
		if (pwrite(fd, count, 9, 0) != 9)
			return 2;
		nanosleep(&pause, NULL);
	}
	return 0;
}
