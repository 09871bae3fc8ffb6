/* Provokes the memory events the VM smoke tests check, one mode per tracer family.
 * Usage: vm_mem hog MB [PASSES]  map MB of anonymous memory, write every page, then read
 *                                every page PASSES more times (swap-ins once it was swapped out)
 *        vm_mem mmap             map and unmap 7 pages (28672 bytes)
 *        vm_mem brk              grow the heap with sbrk 4 times by 64 KiB
 *        vm_mem shm              shmget 1 MiB, shmat, touch, shmdt, IPC_RMID
 *        vm_mem touch PAGES      fault in PAGES fresh anonymous pages
 * Prints "done" on success; exits 1 on a failed call. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

#define PAGE 4096UL

static int fail(const char *what) {
	perror(what);
	return 1;
}

/* The hog is the process the OOM killer should pick, never the tracer. */
static void be_the_victim(void) {
	FILE *f = fopen("/proc/self/oom_score_adj", "w");
	if (f) {
		fputs("1000", f);
		fclose(f);
	}
}

static int hog(unsigned long mb, int passes) {
	be_the_victim();
	unsigned long len = mb << 20;
	volatile unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return fail("mmap");
	for (unsigned long off = 0; off < len; off += PAGE)
		p[off] = (unsigned char)(off / PAGE) | 1;
	unsigned long sum = 0;
	for (int pass = 0; pass < passes; pass++)
		for (unsigned long off = 0; off < len; off += PAGE)
			sum += p[off];
	printf("done %lu\n", sum);
	return 0;
}

static int do_mmap(void) {
	void *p = mmap(NULL, 7 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return fail("mmap");
	if (munmap(p, 7 * PAGE))
		return fail("munmap");
	puts("done");
	return 0;
}

static int do_brk(void) {
	for (int i = 0; i < 4; i++) {
		char *p = sbrk(64 * 1024);
		if (p == (void *)-1)
			return fail("sbrk");
		memset(p, 1, 64 * 1024);
	}
	puts("done");
	return 0;
}

static int do_shm(void) {
	int id = shmget(IPC_PRIVATE, 1 << 20, IPC_CREAT | 0600);
	if (id < 0)
		return fail("shmget");
	char *p = shmat(id, NULL, 0);
	if (p == (void *)-1)
		return fail("shmat");
	memset(p, 1, 1 << 20);
	if (shmdt(p) || shmctl(id, IPC_RMID, NULL))
		return fail("shmdt/shmctl");
	puts("done");
	return 0;
}

static int touch(unsigned long pages) {
	volatile char *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return fail("mmap");
	for (unsigned long i = 0; i < pages; i++)
		p[i * PAGE] = 1;
	puts("done");
	return 0;
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IONBF, 0);
	const char *mode = argc > 1 ? argv[1] : "";
	unsigned long n = argc > 2 ? strtoul(argv[2], NULL, 10) : 0;
	if (!strcmp(mode, "hog") && n)
		return hog(n, argc > 3 ? atoi(argv[3]) : 0);
	if (!strcmp(mode, "mmap"))
		return do_mmap();
	if (!strcmp(mode, "brk"))
		return do_brk();
	if (!strcmp(mode, "shm"))
		return do_shm();
	if (!strcmp(mode, "touch") && n)
		return touch(n);
	fprintf(stderr, "usage: vm_mem hog MB [PASSES] | mmap | brk | shm | touch PAGES\n");
	return 2;
}
