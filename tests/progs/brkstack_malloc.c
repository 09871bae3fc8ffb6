// For tests/brkstack.rs, built without frame pointers: after a line on stdin, grow_by_malloc
// mallocs GROWS chunks of 64 KiB that stay allocated, each growing the heap through glibc's
// sbrk; prints "grown" and the break's growth, then waits for stdin to close before exiting.
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define GROWS 5
// With its 8-byte header, a chunk of exactly 16 pages.
#define CHUNK (16 * 4096 - 8)

// Kept, so that no allocation is optimised away or freed back.
void *volatile kept[GROWS];

__attribute__((noinline)) static void grow_by_malloc(void) {
    for (int i = 0; i < GROWS; i++) {
        kept[i] = malloc(CHUNK); // LEAK:grow_by_malloc (the call the stack must name)
    }
}

int main(void) {
    char line[16];
    // No padding on top of each growth, and chunks this size from the heap, not mmap: each
    // malloc finds the top too small and grows the break by its chunk, 64 KiB, no more.
    mallopt(M_TOP_PAD, 0);
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    // The arena's first growth (and its alignment) happens here, before the tracer attaches.
    free(malloc(1));
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof line, stdin)) {
        return 1;
    }
    char *before = sbrk(0);
    grow_by_malloc();
    char *after = sbrk(0);
    printf("grown %td\n", after - before);
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}
