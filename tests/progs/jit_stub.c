/* Calls through code it writes at run time into an anonymous executable mapping, as a JIT
 * does: the stub keeps a frame pointer (push %rbp; mov %rsp,%rbp) and has no unwind table,
 * so a walk through it must go on by frame pointer. Through it, leak_from_jit leaks
 * JIT_CALLS x 777 bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define NOINLINE __attribute__((noinline))
#define JIT_CALLS 5

static void *volatile sink;

NOINLINE void leak_from_jit(void) {
	sink = malloc(777); /* LEAK:leak_from_jit */
}

NOINLINE void run_jit(void (*stub)(void)) {
	for (int i = 0; i < JIT_CALLS; i++)
		stub();
	__asm__ volatile("" ::: "memory");
}

int main(void) {
	/* push %rbp; mov %rsp,%rbp; movabs $leak_from_jit,%rax; call *%rax; pop %rbp; ret */
	unsigned char code[] = {0x55, 0x48, 0x89, 0xe5, 0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xd0, 0x5d, 0xc3};
	uint64_t target = (uint64_t)(uintptr_t)leak_from_jit;
	memcpy(code + 6, &target, sizeof target);
	unsigned char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page == MAP_FAILED)
		return 2;
	memcpy(page, code, sizeof code);
	if (mprotect(page, 4096, PROT_READ | PROT_EXEC) != 0)
		return 3;
	run_jit((void (*)(void))page);
	return 0;
}
