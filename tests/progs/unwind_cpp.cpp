/* Leaks known amounts through C++ and libc paths in which no code keeps frame pointers: the
 * tests build this -O2 -fomit-frame-pointer, and Debian builds libstdc++ and libc that way
 * too. Only the DWARF call-frame information (.eh_frame) leads from malloc back to main:
 * main -> run_leaks -> leak_* -> (libstdc++ / libc) -> malloc.
 *
 * Every function the tests name is extern "C", so its symbol is the plain name (a C++ name
 * would be demangled with its parameter list). The std:: code in between keeps its C++
 * names: the map's tree templates are instantiated here, the string code is in libstdc++.
 *
 * The tests read the expected file:line of each leak from the LEAK: markers below.
 * Usage: unwind_cpp        leak, then exit
 *        unwind_cpp wait   print "ready", leak after a line on stdin, print "leaked",
 *                          exit after another line (or EOF) */
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "gate.h"

/* noclone: an -O2 clone would be named leak_x.constprop.0 */
#define NOINLINE __attribute__((noinline, noclone))

static void *volatile sink; /* keeps the compiler from dropping allocations */
static volatile unsigned after_call; /* a store after a call: no tail call, the caller stays on the stack */
static FILE *leaked_file; /* opened by leak_fopen, read by leak_getline */
static char file_buf[64];

/* 100 characters: past std::string's 15-byte inline buffer, so it goes to the heap. */
#define LONG_TEXT "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789"

extern "C" {

NOINLINE void leak_new_array(void) { /* 4 x new char[3000] = 12000 bytes */
	for (int i = 0; i < 4; i++)
		sink = new char[3000]; /* LEAK:leak_new_array */
	after_call++;
}

NOINLINE void leak_new_string(void) { /* 3 x (32-byte string object + 101-byte buffer) = 399 bytes */
	for (int i = 0; i < 3; i++)
		sink = new std::string(LONG_TEXT); /* LEAK:leak_new_string */
	after_call++;
}

NOINLINE void leak_map(void) { /* a 48-byte map, then 5 x (72-byte node + 41-byte string buffer) */
	auto *m = new std::map<int, std::string>; /* LEAK:leak_map_new */
	for (int i = 0; i < 5; i++)
		m->emplace(i, std::string(40, 'm')); /* LEAK:leak_map_insert */
	sink = m;
}

NOINLINE void leak_strdup(void) { /* 2 x (100 characters + NUL) = 202 bytes */
	for (int i = 0; i < 2; i++)
		sink = strdup(LONG_TEXT); /* LEAK:leak_strdup */
	after_call++;
}

NOINLINE void leak_fopen(void) { /* one FILE (472 bytes in glibc 2.36), never closed */
	leaked_file = fopen("/proc/self/comm", "r"); /* LEAK:leak_fopen */
	if (!leaked_file)
		abort();
	/* A buffer of ours: the read buffer stdio would allocate has a size that depends on the
	 * file system (st_blksize). */
	setvbuf(leaked_file, file_buf, _IOFBF, sizeof file_buf);
	after_call++;
}

NOINLINE void leak_getline(void) { /* getline's first buffer, 120 bytes (the line "unwind_cpp\n" fits), never freed */
	char *line = NULL;
	size_t cap = 0;
	if (getline(&line, &cap, leaked_file) < 0) /* LEAK:leak_getline */
		abort();
	sink = line;
}

NOINLINE void churn(void) { /* all freed: must not appear in any report */
	for (int i = 0; i < 50; i++) {
		char *a = new char[3000];
		auto *s = new std::string(LONG_TEXT);
		char *d = strdup(LONG_TEXT);
		std::map<int, std::string> m;
		for (int j = 0; j < 5; j++)
			m.emplace(j, std::string(40, 'c'));
		sink = a;
		delete[] a;
		delete s;
		free(d);
	}
	FILE *f = fopen("/proc/self/comm", "r");
	char *line = NULL;
	size_t cap = 0;
	if (!f || getline(&line, &cap, f) < 0)
		abort();
	free(line);
	fclose(f);
}

NOINLINE void run_leaks(void) {
	leak_new_array();
	after_call++;
	leak_new_string();
	after_call++;
	leak_map();
	after_call++;
	leak_strdup();
	after_call++;
	leak_fopen();
	after_call++;
	leak_getline();
	after_call++;
	churn();
	after_call++;
}

} /* extern "C" */

GATED_MAIN(run_leaks)
