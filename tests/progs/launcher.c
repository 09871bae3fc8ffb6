/* Runs a program as its child and exits with its status, as shells and init systems do.
 * Built static and stripped (Flavour::Static), it stands for busybox in a container image:
 * an image whose allocator memleak cannot probe, whose children must still be followed.
 * Usage: launcher PROG [ARGS...] */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
	if (argc < 2) {
		fputs("usage: launcher PROG [ARGS...]\n", stderr);
		return 2;
	}
	pid_t child = fork();
	if (child == 0) {
		execv(argv[1], argv + 1);
		perror("execv");
		_exit(127);
	}
	int status;
	if (child < 0 || waitpid(child, &status, 0) != child)
		return 1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
