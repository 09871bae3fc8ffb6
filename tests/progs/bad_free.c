/* Memory errors memleak must name, one per run:
 *   bad_free [double]  a 40-byte block from make_block, freed in release_once, freed again in
 *                      release_twice (glibc: "free(): double free detected in tcache 2", abort)
 *   bad_free stack     free of a local variable's address in free_local (glibc aborts:
 *                      "free(): invalid pointer")
 *   bad_free interior  free of a pointer 16 bytes into a 64-byte block, in free_inside
 *   bad_free realloc   realloc of a block freed before, in grow_freed
 *   bad_free churn     4 threads, each freeing blocks the next one allocated, with realloc,
 *                      about 230,000 allocations: no error at all
 * Under a preloaded jemalloc, which does not check, `double` runs on and exits 0. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink;

NOINLINE void *make_block(size_t n) {
	return malloc(n); /* ALLOC:make_block */
}

NOINLINE void release_once(void *p) {
	free(p); /* FREE:release_once */
}

NOINLINE void release_twice(void *p) {
	free(p); /* ERROR:release_twice */
}

NOINLINE void free_local(void) {
	long local[4] = {1, 2, 3, 4};
	sink = local;
	free(sink); /* ERROR:free_local */
}

NOINLINE void free_inside(void) {
	char *p = malloc(64);
	sink = p + 16;
	free(sink); /* ERROR:free_inside */
}

NOINLINE void grow_freed(void) {
	void *p = make_block(24);
	release_once(p);
	sink = realloc(p, 4000); /* ERROR:grow_freed */
}

#define THREADS 4
#define RING 1024
static void *volatile ring[THREADS][RING];

/* Thread t allocates into its own ring and frees what thread t-1 left in its ring. */
NOINLINE static void *churn(void *arg) {
	long t = (long)arg;
	unsigned seed = (unsigned)t + 1;
	for (int i = 0; i < 50000; i++) {
		unsigned k = rand_r(&seed) % RING;
		void *mine = malloc(16 + rand_r(&seed) % 512);
		if (i % 7 == 0)
			mine = realloc(mine, 16 + rand_r(&seed) % 4096);
		void *old = __atomic_exchange_n(&ring[t][k], mine, __ATOMIC_ACQ_REL);
		free(old);
		void *theirs = __atomic_exchange_n(&ring[(t + THREADS - 1) % THREADS][k], NULL, __ATOMIC_ACQ_REL);
		free(theirs);
	}
	return NULL;
}

int main(int argc, char **argv) {
	const char *what = argc > 1 ? argv[1] : "double";
	if (!strcmp(what, "double")) {
		void *p = make_block(40);
		release_once(p);
		release_twice(p);
	} else if (!strcmp(what, "stack")) {
		free_local();
	} else if (!strcmp(what, "interior")) {
		free_inside();
	} else if (!strcmp(what, "realloc")) {
		grow_freed();
	} else if (!strcmp(what, "churn")) {
		pthread_t th[THREADS];
		for (long t = 0; t < THREADS; t++)
			pthread_create(&th[t], NULL, churn, (void *)t);
		for (long t = 0; t < THREADS; t++)
			pthread_join(th[t], NULL);
		for (long t = 0; t < THREADS; t++)
			for (int k = 0; k < RING; k++)
				free(ring[t][k]);
	} else {
		fprintf(stderr, "usage: bad_free double|stack|interior|realloc|churn\n");
		return 2;
	}
	printf("done\n");
	return 0;
}
