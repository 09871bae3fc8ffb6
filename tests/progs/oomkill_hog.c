/* Allocates past its memory cgroup's limit: prints its pid, waits for a line on stdin
 * (so that the tracer is attached first), then touches every page of a large malloc'd
 * region until the OOM killer ends it. Exits 2 if it survives the whole region. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 512;
	size_t size = mib << 20;
	long page = sysconf(_SC_PAGESIZE);
	char line[16];

	printf("%d\n", getpid());
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	char *region = malloc(size);
	if (!region)
		return 1;
	for (size_t off = 0; off < size; off += page)
		region[off] = 1;
	fprintf(stderr, "oomkill_hog: touched %zu MiB and was not killed\n", mib);
	return 2;
}
