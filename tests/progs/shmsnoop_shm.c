/* shmsnoop's test program: after a line on stdin it makes a known series of System V shared
 * memory calls, prints what they returned, and exits when stdin closes. */
#include <errno.h>
#include <stdio.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <unistd.h>

#define SIZE (3 * 4096)

int main(void)
{
	char line[16];
	/* Known to the test through the output; the pid keeps parallel runs apart. */
	key_t key = 0x4d540000 | (getpid() & 0xffff);

	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;

	int id = shmget(key, SIZE, IPC_CREAT | 0600);
	int again = shmget(key, SIZE, IPC_CREAT | IPC_EXCL | 0600);
	int again_errno = errno;
	void *addr = shmat(id, NULL, SHM_RDONLY);
	int detached = shmdt(addr);
	int removed = shmctl(id, IPC_RMID, NULL);
	if (id < 0 || again != -1 || again_errno != EEXIST || addr == (void *)-1 || detached != 0 || removed != 0) {
		fprintf(stderr, "unexpected result\n");
		return 1;
	}
	printf("key=%#x id=%d addr=%p\n", (unsigned)key, id, addr);
	fflush(stdout);

	while (fgets(line, sizeof line, stdin))
		;
	return 0;
}
