/* Makes an allocation compact for itself: maps PERCENT of MemAvailable, writes every page,
 * gives every other page back (free memory in 4 KiB pieces, none of them a huge page), then
 * asks the kernel for huge pages by writing /proc/sys/vm/nr_hugepages itself, so the direct
 * compaction runs in this process. Frees them again (the old count is written back).
 * Usage: compact_frag PERCENT     Prints "done HUGE_PAGES_GOT" on success. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define NR_HUGEPAGES "/proc/sys/vm/nr_hugepages"

static unsigned long meminfo_kib(const char *key) {
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	unsigned long v = 0;
	size_t n = strlen(key);
	while (f && fgets(line, sizeof line, f))
		if (!strncmp(line, key, n) && line[n] == ':')
			v = strtoul(line + n + 1, NULL, 10);
	if (f)
		fclose(f);
	return v;
}

static long read_long(const char *path) {
	FILE *f = fopen(path, "r");
	long v = -1;
	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

static int write_long(const char *path, long v) {
	FILE *f = fopen(path, "w");
	if (!f)
		return -1;
	fprintf(f, "%ld\n", v);
	return fclose(f);
}

int main(int argc, char **argv) {
	if (argc != 2) {
		fprintf(stderr, "usage: compact_frag PERCENT\n");
		return 2;
	}
	unsigned long pct = strtoul(argv[1], NULL, 10);
	unsigned long avail = meminfo_kib("MemAvailable") << 10;
	unsigned long len = (avail / 100 * pct) & ~(PAGE - 1);
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	madvise(p, len, MADV_NOHUGEPAGE);
	for (unsigned long off = 0; off < len; off += PAGE)
		p[off] = 1;
	for (unsigned long off = 0; off < len; off += 2 * PAGE)
		madvise(p + off, PAGE, MADV_DONTNEED);
	long old = read_long(NR_HUGEPAGES);
	long hpage = (long)meminfo_kib("Hugepagesize") << 10;
	if (old < 0 || hpage <= 0) {
		fprintf(stderr, "no huge pages here\n");
		return 1;
	}
	/* More than the free memory outside the pieces holds: the kernel must compact for some. */
	long want = old + (long)(meminfo_kib("MemFree") << 10) / hpage;
	if (write_long(NR_HUGEPAGES, want)) {
		perror(NR_HUGEPAGES);
		return 1;
	}
	long got = read_long(NR_HUGEPAGES) - old;
	write_long(NR_HUGEPAGES, old);
	printf("done %ld\n", got);
	return 0;
}
