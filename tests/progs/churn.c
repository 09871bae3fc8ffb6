/* A live process under churn: 6 threads allocate and free without pause while the main
 * thread leaks exactly 3000 blocks of 64 bytes once, from leak_once().
 * Usage: churn   print "ready" once the threads run, leak after a line on stdin, print
 *                "leaked", exit after another line (or EOF) */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define NOINLINE __attribute__((noinline))
#define THREADS 6
#define SLOTS 256

static void *volatile sink;

NOINLINE static void *churn(void *arg) {
	unsigned seed = (unsigned)(unsigned long)arg;
	void *slots[SLOTS] = {0};
	for (;;) {
		unsigned i = rand_r(&seed) % SLOTS;
		free(slots[i]);
		slots[i] = malloc(16 + rand_r(&seed) % 2048);
	}
	return NULL;
}

NOINLINE void leak_once(void) {
	for (int i = 0; i < 3000; i++)
		sink = malloc(64); /* LEAK:leak_once */
}

int main(void) {
	char line[64];
	pthread_t t[THREADS];
	for (long i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, churn, (void *)(i + 1));
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	leak_once();
	printf("leaked\n");
	fflush(stdout);
	fgets(line, sizeof line, stdin);
	return 0;
}
