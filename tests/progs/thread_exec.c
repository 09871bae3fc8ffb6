/* Execs from a thread other than the main one: the kernel gives the exec'ing thread the
 * process's pid and ends every other thread, the main one included.
 *   image 1: leak_before_exec() 5 x 200 on the main thread, then a second thread execs
 *            this program again with "after"
 *   image 2: leak_after_thread_exec() 9 x 400
 * Usage: thread_exec [wait]   with "wait": print "ready" and wait for a line before image 1
 *                             leaks; image 2 prints "exec'd" and waits for a line before it
 *                             leaks (a tracer attached by pid re-probes it meanwhile), then
 *                             prints "leaked" and exits after another line (or end of input) */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink;
static char **args;

NOINLINE void leak_before_exec(void) {
	for (int i = 0; i < 5; i++)
		sink = malloc(200); /* LEAK:leak_before_exec */
}

NOINLINE void leak_after_thread_exec(void) {
	for (int i = 0; i < 9; i++)
		sink = malloc(400); /* LEAK:leak_after_thread_exec */
}

static void *exec_self(void *arg) {
	(void)arg;
	execl("/proc/self/exe", args[0], "after", args[1], (char *)NULL);
	return NULL;
}

int main(int argc, char **argv) {
	char line[64];
	int wait = argc > 1 && strcmp(argv[argc - 1], "wait") == 0;
	if (argc > 1 && strcmp(argv[1], "after") == 0) {
		if (wait) {
			printf("exec'd\n");
			fflush(stdout);
			if (!fgets(line, sizeof line, stdin))
				return 1;
		}
		leak_after_thread_exec();
		if (wait) {
			printf("leaked\n");
			fflush(stdout);
			fgets(line, sizeof line, stdin);
		}
		return 0;
	}
	if (wait) {
		printf("ready\n");
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin))
			return 1;
	}
	args = argv;
	leak_before_exec();
	pthread_t t;
	if (pthread_create(&t, NULL, exec_self, NULL) != 0)
		return 2;
	pthread_join(t, NULL);
	return 127;
}
