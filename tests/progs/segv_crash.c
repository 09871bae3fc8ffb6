/* Dies the way its argument says, after printing "ready" and reading a line (a tracer attaches
 * in between): each way is one function, which tests/segv.rs expects at the fault.
 *   stack         recursion until the main thread's stack can grow no further
 *   thread-stack  the same in a thread with a 64 KiB stack, into its guard page
 *   null          a write through a NULL pointer
 *   readonly      a write to a PROT_READ mapping
 *   overrun       a 40-byte block overrun by 8 bytes, which corrupts the next chunk's size
 *                 field; glibc aborts at that chunk's free ("free(): invalid size")
 *   double-free   one block freed twice ("free(): double free detected in tcache 2") */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

static int recurse(int depth)
{
	volatile char frame[256];
	frame[0] = (char)depth;
	return recurse(depth + 1) + frame[0];
}

static void *thread_main(void *arg)
{
	(void)arg;
	recurse(0);
	return NULL;
}

static void thread_stack(void)
{
	pthread_attr_t attr;
	pthread_t thread;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	pthread_create(&thread, &attr, thread_main, NULL);
	pthread_join(thread, NULL);
}

static void null_write(void)
{
	volatile int *p = NULL;
	p[4] = 1;
}

static void readonly_write(void)
{
	volatile char *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	p[8] = 1;
}

static void overrun(void)
{
	char *a = malloc(40);
	char *b = malloc(40);
	for (int i = 0; i < 48; i++)
		a[i] = 'x';
	free(a);
	free(b);
}

static void double_free(void)
{
	char *p = malloc(32);
	free(p);
	free(p);
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		void (*act)(void);
	} ways[] = {
		{"thread-stack", thread_stack}, {"null", null_write},         {"readonly", readonly_write},
		{"overrun", overrun},           {"double-free", double_free},
	};
	char line[64];
	/* No core file: the crash is the point, not its dump. */
	struct rlimit none = {0, 0};
	setrlimit(RLIMIT_CORE, &none);
	if (argc != 2)
		return 2;
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	if (strcmp(argv[1], "stack") == 0)
		return recurse(0);
	for (size_t i = 0; i < sizeof ways / sizeof ways[0]; i++)
		if (strcmp(argv[1], ways[i].name) == 0)
			ways[i].act();
	return 3;
}
