/*
 * demo.c - a tiny "service" with two known leaks, for `cargo xtask demo`.
 *
 * It handles one "request" every 100 ms for about 12 s, then exits 0.
 * Each request allocates a few buffers and frees them, except:
 *   - cache_insert() leaks 256 bytes (malloc) on every request;
 *   - parse_header() leaks 64 bytes (calloc) on every 10th request.
 * So after 120 requests memleak should show 30720 bytes in 120 allocations
 * from cache_insert and 768 bytes in 12 allocations from parse_header.
 *
 * Build with frame pointers so the leaking stacks can be walked:
 *   cc -g -O1 -fno-omit-frame-pointer -o target/progs/demo tests/progs/demo.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REQUESTS 120
#define REQUEST_INTERVAL_NS 100000000L /* 100 ms */

/* Keeps the compiler from deleting allocations whose contents nobody reads. */
static void *volatile sink;

/* Copies the request into a header buffer; every 10th request forgets to free it. */
static __attribute__((noinline)) size_t parse_header(const char *req, int id)
{
	char *hdr = calloc(1, 64);
	size_t len;

	if (!hdr)
		return 0;
	strncpy(hdr, req, 63);
	len = strlen(hdr);
	sink = hdr;
	if (id % 10 == 0)
		return len; /* LEAK: 64 bytes via calloc, every 10th request */
	free(hdr);
	return len;
}

/* "Caches" a response: the entry is allocated and never freed or even remembered. */
static __attribute__((noinline)) void cache_insert(const char *body, size_t len)
{
	char *entry = malloc(256);

	if (!entry)
		return;
	memset(entry, 0, 256);
	memcpy(entry, body, len < 255 ? len : 255);
	sink = entry; /* LEAK: 256 bytes via malloc, every request */
}

/* Builds a response in a scratch buffer that is freed correctly. */
static __attribute__((noinline)) size_t build_response(const char *req, char **out)
{
	char *body = malloc(1024);

	if (!body)
		return 0;
	*out = body;
	return (size_t)snprintf(body, 1024, "HTTP/1.0 200 OK\r\n\r\nyou asked for %s", req);
}

/* One request: a few buffers, all freed except the two leaks above. */
static __attribute__((noinline)) void handle_request(int id)
{
	char *req = malloc(128);
	char *body = NULL;
	size_t len;

	if (!req)
		return;
	snprintf(req, 128, "GET /item/%d HTTP/1.0", id);
	parse_header(req, id);
	len = build_response(req, &body);
	if (body) {
		cache_insert(body, len);
		free(body);
	}
	free(req);
}

int main(void)
{
	const struct timespec interval = { 0, REQUEST_INTERVAL_NS };

	printf("demo: serving %d requests, one every 100 ms\n", REQUESTS);
	fflush(stdout);
	for (int id = 1; id <= REQUESTS; id++) {
		handle_request(id);
		nanosleep(&interval, NULL);
	}
	printf("demo: done; leaked %d bytes in cache_insert, %d bytes in parse_header\n",
	       REQUESTS * 256, REQUESTS / 10 * 64);
	return 0;
}
