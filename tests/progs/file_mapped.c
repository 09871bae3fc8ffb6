/* Maps a file read-only and keeps it mapped (as git does with its packfiles), maps and unmaps
 * another, and leaks one heap block. A file's pages are the file's: only the heap block is an
 * allocation.
 * Usage: file_mapped   (the file is made in /tmp and removed again; the mapping stays) */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
#define FILE_BYTES 100000

static void *volatile sink;

static int scratch_file(void) {
	char path[64];
	snprintf(path, sizeof path, "/tmp/memtrace-file-mapped-%d", (int)getpid());
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, FILE_BYTES) != 0)
		exit(2);
	unlink(path);
	return fd;
}

NOINLINE void map_file(int fd) { /* stays mapped: not a leak */
	sink = mmap(NULL, FILE_BYTES, PROT_READ, MAP_PRIVATE, fd, 0);
	if (sink == MAP_FAILED)
		exit(3);
}

NOINLINE void map_and_unmap(int fd) {
	void *p = mmap(NULL, FILE_BYTES, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		exit(4);
	munmap(p, FILE_BYTES);
}

NOINLINE void leak_heap(void) { /* 4321 bytes */
	sink = malloc(4321);
}

int main(void) {
	int fd = scratch_file();
	map_file(fd);
	map_and_unmap(fd);
	close(fd);
	leak_heap();
	return 0;
}
