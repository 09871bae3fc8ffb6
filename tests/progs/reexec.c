/* Allocates in one image, then execs itself: what the first image held ends with it.
 *   image 1: leak_before_exec() 5 x 200, then exec of itself with "after"
 *   image 2: leak_after_exec() 7 x 300
 * Usage: reexec   print "ready", wait for a line, leak, exec; the new image leaks, prints
 *                 "leaked", and exits after another line (or EOF) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink;

NOINLINE void leak_before_exec(void) {
	for (int i = 0; i < 5; i++)
		sink = malloc(200); /* LEAK:leak_before_exec */
}

NOINLINE void leak_after_exec(void) {
	for (int i = 0; i < 7; i++)
		sink = malloc(300); /* LEAK:leak_after_exec */
}

int main(int argc, char **argv) {
	char line[64];
	if (argc > 1 && strcmp(argv[1], "after") == 0) {
		leak_after_exec();
		printf("leaked\n");
		fflush(stdout);
		fgets(line, sizeof line, stdin);
		return 0;
	}
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	leak_before_exec();
	execl("/proc/self/exe", argv[0], "after", (char *)NULL);
	return 127;
}
