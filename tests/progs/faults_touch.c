// For tests/faults.rs: after a line on stdin, maps PAGES fresh anonymous pages and writes one
// byte per page from touch_pages (one not-present write fault each), then read()s a file into
// another fresh mapping (the kernel faults in copy_to_user). Prints each mapping's start and
// length, then waits for stdin to close.
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGES 256

__attribute__((noinline)) static void touch_pages(volatile char *p, long page) {
    for (int i = 0; i < PAGES; i++) {
        p[(long)i * page] = 1; // LEAK:touch_pages (the faulting write)
    }
}

__attribute__((noinline)) static void read_into_fresh(const char *path, long page) {
    size_t len = 16 * page;
    char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int fd = open(path, O_RDONLY);
    if (buf == MAP_FAILED || fd < 0) {
        perror("read_into_fresh");
        return;
    }
    ssize_t n = read(fd, buf, len);
    printf("read %p %zu %zd\n", (void *)buf, len, n);
    close(fd);
}

int main(int argc, char **argv) {
    char line[16];
    long page = sysconf(_SC_PAGESIZE);
    size_t len = PAGES * page;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof line, stdin)) {
        return 1;
    }
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    // One fault per page, whatever the transparent-hugepage setting.
    madvise(p, len, MADV_NOHUGEPAGE);
    printf("mapping %p %zu\n", (void *)p, len);
    touch_pages(p, page);
    read_into_fresh(argc > 1 ? argv[1] : "/proc/self/exe", page);
    printf("done\n");
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}
