/* Asks to trace, as a debugger does: prints what ptrace answered and exits 0.
 * Usage: ptracer traceme   PTRACE_TRACEME on itself (strace's and gdb's child do this)
 *        ptracer seize     forks a child, PTRACE_SEIZE on it, then ends it */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
	long r;
	if (argc > 1 && strcmp(argv[1], "seize") == 0) {
		pid_t child = fork();
		if (child == 0) {
			pause();
			_exit(0);
		}
		r = ptrace(PTRACE_SEIZE, child, 0, 0);
		int err = errno;
		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
		printf("seize=%s\n", r == 0 ? "ok" : strerror(err));
	} else {
		r = ptrace(PTRACE_TRACEME, 0, 0, 0);
		printf("traceme=%s\n", r == 0 ? "ok" : strerror(errno));
	}
	return 0;
}
