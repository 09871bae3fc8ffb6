/* Three allocations that fail (malloc returns NULL for a size no heap can hold), and one
 * 100-byte leak so that the trace is known to have seen the process. No stdio: its buffer
 * would be one more outstanding block. Exits 1 unless all three failed. */
#include <stdint.h>
#include <stdlib.h>

static void *volatile sink;
/* Read at run time, so the compiler neither warns about nor folds the impossible size. */
static volatile size_t huge = SIZE_MAX;

int main(void) {
	int failed = 0;
	for (int i = 0; i < 3; i++)
		failed += (sink = malloc(huge)) == NULL;
	sink = malloc(100);
	return failed == 3 ? 0 : 1;
}
