/* The "wait" protocol the test programs share. With the argument "wait": print "ready", act
 * after a line on stdin, print "leaked", then exit after another line (or end of input), so a
 * tracer attaches before the leaks and reports after them. Without it: act, then exit.
 * A macro that defines main itself, so stacks go straight from `act` to main. */
#include <stdio.h>
#include <string.h>

#define GATED_MAIN(act)                                                     \
	int main(int argc, char **argv) {                                   \
		char line[64];                                              \
		int wait = argc > 1 && strcmp(argv[1], "wait") == 0;        \
		if (wait) {                                                 \
			printf("ready\n");                                  \
			fflush(stdout);                                     \
			if (!fgets(line, sizeof line, stdin))               \
				return 1;                                   \
		}                                                           \
		act();                                                      \
		if (wait) {                                                 \
			printf("leaked\n");                                 \
			fflush(stdout);                                     \
			if (!fgets(line, sizeof line, stdin))               \
				return 0;                                   \
		}                                                           \
		return 0;                                                   \
	}
