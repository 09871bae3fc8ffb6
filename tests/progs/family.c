/* A process tree with known leaks in each process: the parent leaks, forks a child that
 * inherits the parent's blocks (and frees one of them), and the child forks a grandchild.
 *
 *   parent:     inherited() 1 x 500 (the child frees its copy), leak_parent() 10 x 100
 *   child:      its copies of leak_parent's 10 x 100, leak_child() 20 x 100
 *   grandchild: its copies of leak_parent's and leak_child's, leak_grandchild() 30 x 100
 *
 * Usage: family         run the tree, exit when all are done
 *        family wait    print "ready" and wait for a line on stdin first; each child prints
 *                       "child PID" and waits for a line too before it acts (a tracer that
 *                       attaches after the fork, however slow the machine, needs that)
 *        family exec P  the grandchild execs P instead of leaking */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink;

NOINLINE void *inherited(void) { return malloc(500); /* LEAK:inherited */ }

NOINLINE void leak_parent(void) {
	for (int i = 0; i < 10; i++)
		sink = malloc(100); /* LEAK:leak_parent */
}

NOINLINE void leak_child(void) {
	for (int i = 0; i < 20; i++)
		sink = malloc(100); /* LEAK:leak_child */
}

NOINLINE void leak_grandchild(void) {
	for (int i = 0; i < 30; i++)
		sink = malloc(100); /* LEAK:leak_grandchild */
}

/* A child says who it is and waits for its go. */
static int go_on(char *line, int size) {
	printf("child %d\n", (int)getpid());
	fflush(stdout);
	return fgets(line, size, stdin) != NULL;
}

int main(int argc, char **argv) {
	char line[64];
	int wait = argc > 1 && strcmp(argv[1], "wait") == 0;
	const char *exec_path = argc > 2 && strcmp(argv[1], "exec") == 0 ? argv[2] : NULL;
	if (wait) {
		printf("ready\n");
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin))
			return 1;
	}
	void *shared = inherited();
	leak_parent();
	pid_t child = fork();
	if (child == 0) {
		/* Under -p --children memtrace attaches after the fork: the test says when. */
		if (wait && !go_on(line, sizeof line))
			_exit(1);
		free(shared);
		leak_child();
		pid_t grandchild = fork();
		if (grandchild == 0) {
			if (wait && !go_on(line, sizeof line))
				_exit(1);
			if (exec_path) {
				execl(exec_path, exec_path, (char *)NULL);
				_exit(127);
			}
			leak_grandchild();
			_exit(0);
		}
		int status;
		waitpid(grandchild, &status, 0);
		_exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
	}
	int status;
	waitpid(child, &status, 0);
	sink = shared;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
