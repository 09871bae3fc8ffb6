/* Faults in a known number of 2 MiB huge pages, for hfaults.
 * Usage: hfaults_touch [-w] PAGES [FILE]
 *   maps PAGES huge pages (MAP_HUGETLB, or FILE on a hugetlbfs mount) and writes one byte
 *   in each, so each page faults exactly once;
 *   -w: print "ready" and wait for a line on stdin before touching, then print "touched"
 *   and wait for another line (or EOF) before exiting. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE (2UL << 20)

static void wait_line(void) {
	char line[64];
	if (!fgets(line, sizeof line, stdin))
		return;
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IONBF, 0);
	int wait = argc > 1 && !strcmp(argv[1], "-w");
	if (argc < 2 + wait) {
		fprintf(stderr, "usage: hfaults_touch [-w] PAGES [FILE]\n");
		return 2;
	}
	unsigned long pages = strtoul(argv[1 + wait], NULL, 10);
	const char *file = argc > 2 + wait ? argv[2 + wait] : NULL;
	int fd = -1, flags = MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB;
	if (file) {
		fd = open(file, O_CREAT | O_RDWR, 0600);
		if (fd < 0) {
			perror(file);
			return 1;
		}
		flags = MAP_SHARED;
	}
	volatile char *p = mmap(NULL, pages * HUGE, PROT_READ | PROT_WRITE, flags, fd, 0);
	if (p == MAP_FAILED) {
		perror("mmap (are there enough huge pages in /proc/sys/vm/nr_hugepages?)");
		return 1;
	}
	if (wait) {
		puts("ready");
		wait_line();
	}
	for (unsigned long i = 0; i < pages; i++)
		p[i * HUGE] = 1;
	puts("touched");
	if (wait)
		wait_line();
	if (file)
		unlink(file);
	return 0;
}
