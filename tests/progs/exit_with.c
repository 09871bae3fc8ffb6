/* Ends the way it is told, for tests of the status memtrace passes on: a dynamically linked
 * program, so memleak can trace it where /bin/sh is a static busybox (the VM's image).
 * Usage: exit_with CODE       exit with CODE
 *        exit_with -SIG       die of signal SIG */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
	if (argc != 2)
		return 2;
	int n = atoi(argv[1]);
	if (n < 0) {
		signal(-n, SIG_DFL);
		raise(-n);
		_exit(1);
	}
	return n;
}
