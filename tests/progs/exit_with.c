/* Ends the way it is told, for tests of the status memtrace passes on: a dynamically linked
 * program, so memleak can trace it where /bin/sh is a static busybox (the VM's image).
 * Usage: exit_with CODE       exit with CODE
 *        exit_with -SIG       die of signal SIG
 *        exit_with CODE read  read standard input to its end first
 *        exit_with int3       run a breakpoint instruction (SIGTRAP from the kernel) */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
	if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "read")))
		return 2;
	if (!strcmp(argv[1], "int3")) {
		__asm__ volatile("int3");
		_exit(1);
	}
	if (argc == 3)
		while (getchar() != EOF)
			;
	int n = atoi(argv[1]);
	if (n < 0) {
		signal(-n, SIG_DFL);
		raise(-n);
		_exit(1);
	}
	return n;
}
