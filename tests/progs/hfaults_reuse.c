/* Hugetlb ranges that ordinary memory takes over, for hfaults: every hugetlb fault it makes
 * is counted below, and each ordinary mapping it faults lies where a hugetlb one was.
 * Usage: hfaults_reuse        prints "ready", waits for a line, then:
 *   1. maps 2 huge pages (MAP_HUGETLB), touches both (2 hugetlb faults), unmaps them, maps
 *      ordinary memory at the same address and touches each 4 KiB page;
 *   2. maps 2 huge pages, touches the first (1), mremaps them elsewhere, maps ordinary
 *      memory at the old address and touches it all, then touches the second huge page at
 *      its new address (1); a kernel that cannot move hugetlb (before 5.16) unmaps instead;
 *   3. maps 1 huge page, touches it (1), and execs itself as "after-exec ADDR", which maps
 *      ordinary memory at that address, touches it all, prints "touched" and waits for EOF.
 * 5 hugetlb faults in all; a tool that counts any of the 4 KiB touches is wrong. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE (2UL << 20)
#define SMALL 4096UL

static void touch(volatile char *p, size_t len, size_t step) {
	for (size_t i = 0; i < len; i += step)
		p[i] = 1;
}

static char *map(void *at, size_t len, int flags) {
	char *p = mmap(at, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
	if (p == MAP_FAILED || (at && p != at)) {
		perror("mmap (are there enough huge pages in /proc/sys/vm/nr_hugepages?)");
		exit(1);
	}
	return p;
}

/* Ordinary memory exactly where a hugetlb mapping was. */
static void reuse(char *at, size_t len) {
	touch(map(at, len, MAP_FIXED_NOREPLACE), len, SMALL);
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IONBF, 0);
	char line[64];
	if (argc == 3 && !strcmp(argv[1], "after-exec")) {
		reuse((char *)strtoul(argv[2], NULL, 16), HUGE);
		puts("touched");
		while (fgets(line, sizeof line, stdin))
			;
		return 0;
	}
	puts("ready");
	if (!fgets(line, sizeof line, stdin))
		return 1;

	char *p = map(NULL, 2 * HUGE, MAP_HUGETLB);
	touch(p, 2 * HUGE, HUGE);
	munmap(p, 2 * HUGE);
	reuse(p, 2 * HUGE);

	char *q = map(NULL, 2 * HUGE, MAP_HUGETLB);
	touch(q, HUGE, HUGE);
	/* A free, huge-page-aligned destination: mremap of hugetlb needs one. */
	char *room = mmap(NULL, 4 * HUGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *to = (char *)(((unsigned long)room + HUGE - 1) & ~(HUGE - 1));
	char *moved = mremap(q, 2 * HUGE, 2 * HUGE, MREMAP_MAYMOVE | MREMAP_FIXED, to);
	if (moved == MAP_FAILED && errno == EINVAL) {
		/* Kernels before 5.16 cannot move hugetlb mappings: the second page is touched
		 * where it is, and ordinary memory takes over after munmap; still 1 fault. */
		fputs("hfaults_reuse: this kernel cannot mremap hugetlb; unmapping instead\n", stderr);
		q[HUGE] = 1;
		munmap(q, 2 * HUGE);
		reuse(q, 2 * HUGE);
	} else if (moved != to) {
		perror("mremap");
		return 1;
	} else {
		reuse(q, 2 * HUGE);
		moved[HUGE] = 1;
	}

	char *r = map(NULL, HUGE, MAP_HUGETLB);
	touch(r, HUGE, HUGE);
	char addr[32];
	snprintf(addr, sizeof addr, "%lx", (unsigned long)r);
	execl("/proc/self/exe", argv[0], "after-exec", addr, (char *)NULL);
	perror("execl");
	return 1;
}
