/* Opens N libraries one after another at run time and calls the leaking function of each, as
 * plugin hosts do: libleakK.so in DIR defines leak_K, which leaks 1000 + K bytes in one malloc
 * (the tests generate and build the libraries, see tests/common/progs.rs).
 * Usage: dlopen_many DIR N */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
	if (argc != 3)
		return 2;
	int n = atoi(argv[2]);
	for (int k = 0; k < n; k++) {
		char path[4096], name[32];
		snprintf(path, sizeof path, "%s/libleak%d.so", argv[1], k);
		snprintf(name, sizeof name, "leak_%d", k);
		void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
		void (*leak)(void) = lib ? (void (*)(void))dlsym(lib, name) : NULL;
		if (!leak) {
			fprintf(stderr, "dlopen_many: %s\n", dlerror());
			return 1;
		}
		leak();
	}
	return 0;
}
