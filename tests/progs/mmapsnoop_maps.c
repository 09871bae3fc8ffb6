/* mmapsnoop's test program: after a line on stdin it makes a known series of mapping calls,
 * prints what they returned, and exits when stdin closes. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define BAD_FD 1000

int main(void)
{
	char line[16];
	char path[] = "/tmp/mmapsnoop_XXXXXX";
	int fd = mkstemp(path);
	if (fd < 0 || ftruncate(fd, 5 * PAGE) != 0) {
		perror("temp file");
		return 1;
	}
	close(BAD_FD);
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;

	void *anon = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *file = mmap(NULL, 5 * PAGE, PROT_READ, MAP_SHARED, fd, 0);
	void *bad = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE, BAD_FD, 0);
	int unmapped = munmap(anon, 3 * PAGE);
	void *small = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *grown = mremap(small, 2 * PAGE, 8 * PAGE, MREMAP_MAYMOVE);
	/* Closed at once: the tracer may find the fd gone and must fall back to the mapping. */
	int fd2 = open(path, O_RDONLY);
	void *closed = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE, fd2, PAGE);
	close(fd2);
	if (anon == MAP_FAILED || file == MAP_FAILED || bad != MAP_FAILED || unmapped != 0 || small == MAP_FAILED ||
	    grown == MAP_FAILED || closed == MAP_FAILED) {
		fprintf(stderr, "unexpected result\n");
		return 1;
	}
	printf("anon=%p file=%p small=%p grown=%p closed=%p fd=%d fd2=%d path=%s\n", anon, file, small, grown, closed, fd,
	       fd2, path);
	fflush(stdout);

	while (fgets(line, sizeof line, stdin))
		;
	unlink(path);
	return 0;
}
