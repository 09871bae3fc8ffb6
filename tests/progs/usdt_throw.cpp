/* Throws and catches THROWS exceptions after a line on stdin, for libstdc++'s USDT probe
 * libstdcxx:throw (whose arguments are the exception object and its type_info).
 * Usage: usdt_throw wait   print "ready", throw, print "thrown=THROWS", exit at end of input */
#include <cstdio>
#include <stdexcept>

#include "gate.h"

#define THROWS 4

static volatile int caught;

static void throw_all(void) {
	for (int i = 0; i < THROWS; i++) {
		try {
			throw std::runtime_error("usdt");
		} catch (const std::runtime_error &) {
			caught = caught + 1;
		}
	}
	printf("thrown=%d ", caught);
}

GATED_MAIN(throw_all)
