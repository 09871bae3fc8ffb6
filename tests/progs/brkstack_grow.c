// For tests/brkstack.rs: grows the heap with sbrk(4096) GROWS times from grow_heap, after a
// line on stdin, then waits for stdin to close before exiting.
#include <stdio.h>
#include <unistd.h>

#define GROWS 5

__attribute__((noinline)) static void grow_heap(void) {
    for (int i = 0; i < GROWS; i++) {
        if (sbrk(4096) == (void *)-1) { // LEAK:grow_heap (the call the stack must name)
            perror("sbrk");
        }
    }
}

int main(void) {
    char line[16];
    // The first sbrk of a process reads the break with brk(0): do it here, not in grow_heap.
    sbrk(0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof line, stdin)) {
        return 1;
    }
    grow_heap();
    printf("grown\n");
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}
