/* An executable that defines malloc and free itself (passing them on to glibc's own
 * __libc_malloc and __libc_free): the loader binds every library's calls to these, so no
 * preloaded library can take their place, and memleak must probe the executable.
 * Leaks 4 x 250 bytes from leak_own. */
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);

void *malloc(size_t n) { return __libc_malloc(n); }
void free(void *p) { __libc_free(p); }

static void *volatile sink;

__attribute__((noinline)) void leak_own(void) {
	for (int i = 0; i < 4; i++)
		sink = malloc(250); /* LEAK:leak_own */
}

int main(void) {
	void *p = malloc(999);
	free(p);
	leak_own();
	return 0;
}
