/* memtrace's in-process recorder, preloaded into the commands `memtrace memleak -c` starts.
 *
 * Why: a uprobe costs a trap into the kernel on every call (three per malloc/free pair), more
 * than a whole in-process recorder such as heaptrack spends. Here the allocator's functions
 * are interposed, each stack is walked in the process with the unwind rows memtrace compiles
 * (the same rows its eBPF walker reads), and the live blocks are kept in a table in the
 * process's own memory. memtrace reads that table with process_vm_readv (at reports, and at
 * the process's exit stop, where its memory is still whole) and writes the rows and the
 * module table into the process with process_vm_writev while the process is stopped.
 *
 * Nothing here allocates through the allocator it watches: memory comes from raw mmap
 * system calls, and the only C library calls are dlsym (at start), clock_gettime and
 * getenv. The file is built without the C library (-nostdlib) and names those symbols
 * unversioned, so the same object loads under glibc and musl.
 *
 * The layout of `struct mt_state` and what it points to is read by memtrace
 * (memtrace/src/tools/memleak/inproc.rs): change both together, and MT_VERSION. */

#include <stddef.h>
#include <stdint.h>

#define MT_EXPORT __attribute__((visibility("default")))
#define MT_HIDDEN __attribute__((visibility("hidden")))
#define MT_NOINLINE __attribute__((noinline))

#define MT_MAGIC 0x6d656d7472616365ULL /* "memtrace" */
#define MT_VERSION 2

/* Allocator entry points, as memtrace-common's FN_* values. */
enum { FN_MALLOC = 0, FN_CALLOC, FN_REALLOC, FN_REALLOCARRAY, FN_POSIX_MEMALIGN, FN_ALIGNED_ALLOC, FN_MEMALIGN,
       FN_VALLOC, FN_PVALLOC, FN_MMAP, FN_FREE = 10, FN_MMAP_FILE = 17 };

/* Counter indices of each partition: the first 14 are memtrace-common's unwind ones. */
enum { C_WALKS = 0, C_COMPLETE, C_NO_TABLE, C_NOT_LOADED, C_TABLE_FULL, C_DEPTH, C_UNREADABLE, C_UNSUPPORTED,
       C_BAD_FRAME, C_FP_FRAMES, C_UNUSABLE, C_TRAMPOLINE, C_TRAMPOLINE_FRAMES, C_FP_WALKS,
       C_TRACKED = 16, C_FREED, C_REPLACED, C_UNKNOWN_FREE, C_MAP_FULL, C_FAILED, C_STACKS_LOST, C_FREED_EVICTED,
       C_INVALID_FREES, C_COUNT = 32 };

/* memtrace-common's unwind row and mapping kinds. */
enum { KIND_NO_TABLE = 0, KIND_CFA_RSP, KIND_CFA_RBP, KIND_PLT, KIND_OUTERMOST, KIND_UNSUPPORTED };
enum { RBP_UNCHANGED = 0, RBP_AT_CFA };
enum { MAPPING_TABLE = 0, MAPPING_NO_TABLE, MAPPING_TABLE_FULL, MAPPING_UNKNOWN, MAPPING_UNUSABLE };
enum { MODE_FP = 0, MODE_AUTO, MODE_DWARF };

#define MAX_FRAMES 127
#define PARTS 64
#define MODSLOTS 16
#define MODULES_PER_SLOT 2048

struct mt_block { /* one live block; addr 0 marks a free slot */
	uint64_t addr, size, stack, time_ns;
	uint32_t func, pad;
};

struct mt_stack_slot { /* id 0: free; ips[off .. off+len] of the arena */
	uint64_t id;
	uint32_t off, len;
};

struct mt_row {
	uint64_t pc;
	int32_t cfa_offset;
	int16_t rbp_offset;
	uint8_t kind, rbp_kind;
};

struct mt_module { /* an executable mapping: its rows (memtrace's) and load bias */
	uint64_t start, end, bias;
	uint32_t rows_start, rows_len, kind, pad;
};

struct mt_modslot {
	uint64_t count;
	struct mt_module modules[MODULES_PER_SLOT];
};

struct mt_part { /* one partition of the block table, its lock and its counters */
	volatile uint32_t lock;
	/* Odd while the partition changes: memtrace copies it again until it reads the same
	 * even value before and after, so a report never sees a block twice or misses one. */
	volatile uint32_t seq;
	/* Its slots (struct mt_block[cap]), grown as blocks come so that memory and memtrace's
	 * reads follow the live blocks, up to the cap --max-allocs gives. */
	uint64_t slots, cap, count;
	uint64_t counters[C_COUNT];
	uint64_t freed; /* struct mt_freed[freed_per_part] (errors.h); 0 without error checks */
} __attribute__((aligned(64)));

#define FREED_WAYS 4
#define ERRORS_CAP 256

enum { ERR_DOUBLE_FREE = 1, ERR_INVALID_FREE, ERR_REALLOC_FREED };
#define EV_ERROR 6
#define SYS_getpid 39
#define SYS_gettid 186

struct mt_freed { /* addr 0: an empty slot */
	uint64_t addr, size, alloc_stack, free_stack, free_ns;
	uint32_t func, tid;
};

struct mt_error { /* memtrace-common's memleak::MemError */
	uint32_t kind, error, pid, tid, func, image;
	uint64_t addr, size, stack_id, alloc_stack, free_stack;
	uint32_t alloc_func, free_tid;
	uint64_t freed_ns, timestamp_ns, sp;
	volatile uint64_t seq; /* index + 1 once the rest is written */
};

struct mt_state {
	uint64_t magic; /* MT_MAGIC once everything below is set */
	uint32_t version, ready;
	uint64_t max_part_cap;      /* the most slots a partition grows to */
	uint64_t parts;             /* struct mt_part[PARTS] */
	uint64_t stack_index, stack_index_cap, stack_arena, stack_arena_cap;
	volatile uint64_t stack_arena_used, stacks_stored, stack_store_full;
	uint64_t rows, rows_cap;    /* struct mt_row[rows_cap], written by memtrace */
	uint64_t modslots;          /* struct mt_modslot[MODSLOTS], written by memtrace */
	volatile uint64_t mod_gen;  /* modslots[mod_gen % MODSLOTS] is current; 0: none yet */
	uint64_t min_size, max_size;
	uint64_t part_count;        /* PARTS */
	uint64_t unwind;            /* memtrace-common's MODE_FP, MODE_AUTO or MODE_DWARF */
	uint64_t stacks_max;        /* --max-stacks */
	uint64_t errors;            /* struct mt_error[ERRORS_CAP] (errors.h); 0: errors not checked */
	volatile uint64_t errors_written;
	uint64_t freed_per_part;    /* slots of each partition's record of freed blocks */
	/* Allocations that went by unrecorded (nested in a call of ours, or on another thread
	 * while this object started, or left out by a size limit or a full table): a free of an
	 * address never seen allocated is then not judged an error. */
	volatile uint64_t unseen;
};

MT_EXPORT struct mt_state memtrace_preload_state;

/* ---- system calls, without the C library ---- */

static long sys6(long n, long a, long b, long c, long d, long e, long f) {
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
	                 : "rcx", "r11", "memory");
	return ret;
}

#define SYS_read 0
#define SYS_open 2
#define SYS_close 3
#define SYS_mmap 9
#define SYS_munmap 11
#define SYS_sched_yield 24
#define PROT_READ 1
#define PROT_WRITE 2
#define PROT_EXEC 4
#define MAP_PRIVATE 2
#define MAP_ANONYMOUS 0x20
#define MAP_NORESERVE 0x4000

static void *raw_mmap(uint64_t len, int prot) {
	long p = sys6(SYS_mmap, 0, (long)len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	return p < 0 && p > -4096 ? 0 : (void *)p;
}

/* ---- what the C library gives ---- */

extern void *dlsym(void *handle, const char *symbol);
extern char *getenv(const char *name);
struct mt_timespec { long sec, nsec; };
extern int clock_gettime(int clock, struct mt_timespec *ts);
#define RTLD_NEXT ((void *)-1l)
#define RTLD_DEFAULT ((void *)0)

static void *(*real_malloc)(size_t);
static void (*real_free)(void *);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void *(*real_reallocarray)(void *, size_t, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_memalign)(size_t, size_t);
static void *(*real_valloc)(size_t);
static void *(*real_pvalloc)(size_t);
static void *(*real_mmap)(void *, size_t, int, int, int, long);
static void *(*real_mmap64)(void *, size_t, int, int, int, long);
static int (*real_munmap)(void *, size_t);

/* glibc's pthread_atfork lives in libc_nonshared.a, which -nostdlib leaves out: its libc
 * exports __register_atfork, which needs the object's handle. */
MT_HIDDEN void *__dso_handle = &__dso_handle;

/* ---- per thread ---- */

#define TLS __attribute__((tls_model("initial-exec"))) __thread
static TLS int in_shim;            /* a call of ours is under way on this thread */
static TLS uint64_t stack_lo, stack_hi; /* this thread's stack, for checked reads */
static TLS uint32_t my_tid;             /* 0 until asked; cleared in a forked child */

/* ---- start ---- */

static volatile int init_state; /* 0 not started, 1 starting, 2 ready, 3 failed */
static int call_sites;          /* an allocation keeps its call site only (--errors-only) */
static uint64_t sample_bytes;   /* --sample-bytes: the mean interval; 0 records every block */
static char boot_arena[16384];  /* what dlsym allocates while we look the allocator up */
static uint64_t boot_used;
/* Blocks the allocator returned to the starting thread while this object started (its own
 * calls, such as pthread_atfork's): never recorded, so their frees are not errors. */
static uint64_t early[16];
static uint32_t early_n;

static int from_boot(void *p) {
	return (char *)p >= boot_arena && (char *)p < boot_arena + sizeof boot_arena;
}

static void *boot_alloc(size_t n) {
	uint64_t at = __atomic_fetch_add(&boot_used, (n + 15) & ~15ul, __ATOMIC_RELAXED);
	return at + n <= sizeof boot_arena ? boot_arena + at : 0;
}

static uint64_t parse_u64(const char *s, const char *key, uint64_t dflt) {
	/* "key=value" among space-separated pairs */
	if (!s)
		return dflt;
	size_t klen = 0;
	while (key[klen])
		klen++;
	for (const char *p = s; *p;) {
		while (*p == ' ')
			p++;
		size_t i = 0;
		while (i < klen && p[i] == key[i])
			i++;
		if (i == klen && p[i] == '=') {
			uint64_t v = 0;
			for (p += i + 1; *p >= '0' && *p <= '9'; p++)
				v = v * 10 + (uint64_t)(*p - '0');
			return v;
		}
		while (*p && *p != ' ')
			p++;
	}
	return dflt;
}

static uint64_t pow2_at_least(uint64_t n) {
	uint64_t p = 1;
	while (p < n)
		p <<= 1;
	return p;
}

static void lock_all(void);
static void unlock_all(void);
static void unlock_in_child(void);

static void init(void) {
	int expect = 0;
	if (!__atomic_compare_exchange_n(&init_state, &expect, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
		while (__atomic_load_n(&init_state, __ATOMIC_ACQUIRE) == 1)
			sys6(SYS_sched_yield, 0, 0, 0, 0, 0, 0);
		return;
	}
	in_shim++;
	real_malloc = dlsym(RTLD_NEXT, "malloc");
	real_free = dlsym(RTLD_NEXT, "free");
	real_calloc = dlsym(RTLD_NEXT, "calloc");
	real_realloc = dlsym(RTLD_NEXT, "realloc");
	real_reallocarray = dlsym(RTLD_NEXT, "reallocarray");
	real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
	real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
	real_memalign = dlsym(RTLD_NEXT, "memalign");
	real_valloc = dlsym(RTLD_NEXT, "valloc");
	real_pvalloc = dlsym(RTLD_NEXT, "pvalloc");
	real_mmap = dlsym(RTLD_NEXT, "mmap");
	real_mmap64 = dlsym(RTLD_NEXT, "mmap64");
	real_munmap = dlsym(RTLD_NEXT, "munmap");
	if (!real_malloc || !real_free || !real_calloc || !real_realloc || !real_mmap || !real_munmap) {
		in_shim--;
		__atomic_store_n(&init_state, 3, __ATOMIC_RELEASE);
		return;
	}
	const char *config = getenv("MEMTRACE_PRELOAD");
	struct mt_state *s = &memtrace_preload_state;
	uint64_t allocs = parse_u64(config, "allocs", 2097152);
	s->stacks_max = parse_u64(config, "stacks", 65536);
	uint64_t stacks = pow2_at_least(s->stacks_max * 2);
	s->max_part_cap = pow2_at_least((allocs * 4 / 3 + PARTS - 1) / PARTS);
	s->rows_cap = parse_u64(config, "rows", 1 << 20);
	s->min_size = parse_u64(config, "min", 0);
	s->max_size = parse_u64(config, "max", ~0ull);
	s->unwind = parse_u64(config, "unwind", MODE_AUTO);
	uint64_t freed = parse_u64(config, "freed", 0);
	call_sites = parse_u64(config, "call_sites", 0) != 0;
	sample_bytes = parse_u64(config, "sample", 0);
	s->stack_index_cap = stacks;
	s->stack_arena_cap = stacks / 2 * 48; /* frames: 48 per stack on average before it is full */
	s->parts = (uint64_t)raw_mmap(PARTS * sizeof(struct mt_part), PROT_READ | PROT_WRITE);
	uint64_t first_cap = s->max_part_cap < 256 ? s->max_part_cap : 256;
	if (freed) {
		s->freed_per_part = pow2_at_least((freed + PARTS - 1) / PARTS);
		if (s->freed_per_part < 4)
			s->freed_per_part = 4;
		s->errors = (uint64_t)raw_mmap(ERRORS_CAP * sizeof(struct mt_error), PROT_READ | PROT_WRITE);
	}
	for (unsigned i = 0; s->parts && i < PARTS; i++) {
		struct mt_part *pt = (struct mt_part *)s->parts + i;
		pt->slots = (uint64_t)raw_mmap(first_cap * sizeof(struct mt_block), PROT_READ | PROT_WRITE);
		pt->cap = first_cap;
		if (freed && s->errors)
			pt->freed = (uint64_t)raw_mmap(s->freed_per_part * sizeof(struct mt_freed), PROT_READ | PROT_WRITE);
		if (!pt->slots || (freed && !pt->freed))
			s->parts = 0;
	}
	s->stack_index = (uint64_t)raw_mmap(stacks * sizeof(struct mt_stack_slot), PROT_READ | PROT_WRITE);
	s->stack_arena = (uint64_t)raw_mmap(s->stack_arena_cap * 8, PROT_READ | PROT_WRITE);
	s->rows = (uint64_t)raw_mmap(s->rows_cap * sizeof(struct mt_row), PROT_READ | PROT_WRITE);
	s->modslots = (uint64_t)raw_mmap(MODSLOTS * sizeof(struct mt_modslot), PROT_READ | PROT_WRITE);
	s->part_count = PARTS;
	if (!s->parts || !s->stack_index || !s->stack_arena || !s->rows || !s->modslots) {
		in_shim--;
		__atomic_store_n(&init_state, 3, __ATOMIC_RELEASE);
		return;
	}
	/* A fork must not copy a table some other thread is halfway through changing. */
	int (*atfork)(void (*)(void), void (*)(void), void (*)(void)) = dlsym(RTLD_DEFAULT, "pthread_atfork");
	if (atfork) {
		atfork(lock_all, unlock_all, unlock_in_child);
	} else {
		int (*reg)(void (*)(void), void (*)(void), void (*)(void), void *) =
		    dlsym(RTLD_DEFAULT, "__register_atfork");
		if (reg)
			reg(lock_all, unlock_all, unlock_in_child, __dso_handle);
	}
	s->version = MT_VERSION;
	__atomic_store_n(&s->magic, MT_MAGIC, __ATOMIC_RELEASE);
	/* Tell memtrace: mapping code stops the process at its seccomp filter, and memtrace then
	 * writes the rows and modules in before anything here walks a stack. */
	long page = sys6(SYS_mmap, 0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page > 0)
		sys6(SYS_munmap, page, 4096, 0, 0, 0, 0);
	s->ready = 1;
	in_shim--;
	__atomic_store_n(&init_state, 2, __ATOMIC_RELEASE);
}

static inline int ready(void) {
	if (__builtin_expect(__atomic_load_n(&init_state, __ATOMIC_ACQUIRE) == 2, 1))
		return 1;
	if (init_state == 0)
		init();
	return __atomic_load_n(&init_state, __ATOMIC_ACQUIRE) == 2;
}

/* ---- locks ---- */

static struct mt_part *part(unsigned i) {
	return (struct mt_part *)memtrace_preload_state.parts + i;
}

static void lock(volatile uint32_t *l) {
	for (int spins = 0; __atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE); spins++) {
		if (spins > 64)
			sys6(SYS_sched_yield, 0, 0, 0, 0, 0, 0);
		else
			__builtin_ia32_pause();
	}
}

static void unlock(volatile uint32_t *l) {
	__atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

static volatile uint32_t stack_lock;

static void lock_part(struct mt_part *pt) {
	lock(&pt->lock);
	__atomic_store_n(&pt->seq, pt->seq + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
}

static void unlock_part(struct mt_part *pt) {
	__atomic_store_n(&pt->seq, pt->seq + 1, __ATOMIC_RELEASE);
	unlock(&pt->lock);
}

static void lock_all(void) {
	if (init_state != 2)
		return;
	for (unsigned i = 0; i < PARTS; i++)
		lock_part(part(i));
	lock(&stack_lock);
}

static void unlock_all(void) {
	if (init_state != 2)
		return;
	unlock(&stack_lock);
	for (unsigned i = 0; i < PARTS; i++)
		unlock_part(part(i));
}

static void unlock_in_child(void) {
	my_tid = 0;
	unlock_all();
}

/* ---- stack walking with memtrace's rows ---- */

/* This thread's stack, from /proc/self/maps: the mapping holding `sp`. */
static void find_stack(uint64_t sp) {
	stack_lo = stack_hi = 0;
	long fd = sys6(SYS_open, (long)"/proc/self/maps", 0, 0, 0, 0, 0);
	if (fd < 0)
		return;
	char buf[4096];
	uint64_t lo = 0, hi = 0;
	int field = 0, done = 0; /* 0: start, 1: end, 2: rest of the line */
	for (long n; !done && (n = sys6(SYS_read, fd, (long)buf, sizeof buf, 0, 0, 0)) > 0;) {
		for (long i = 0; i < n; i++) {
			char c = buf[i];
			if (c == '\n') {
				if (lo <= sp && sp < hi) {
					stack_lo = lo;
					stack_hi = hi;
					done = 1;
					break;
				}
				lo = hi = 0;
				field = 0;
			} else if (field < 2) {
				int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
				if (d >= 0) {
					if (field == 0)
						lo = lo << 4 | (uint64_t)d;
					else
						hi = hi << 4 | (uint64_t)d;
				} else {
					field++;
				}
			}
		}
	}
	sys6(SYS_close, fd, 0, 0, 0, 0, 0);
}

static inline int readable(uint64_t addr) {
	return addr >= stack_lo && addr + 8 <= stack_hi && !(addr & 7);
}

static inline uint64_t load(uint64_t addr) {
	return *(volatile uint64_t *)addr;
}

static const struct mt_module *find_module(uint64_t pc) {
	struct mt_state *s = &memtrace_preload_state;
	uint64_t gen = __atomic_load_n(&s->mod_gen, __ATOMIC_ACQUIRE);
	if (!gen)
		return 0;
	const struct mt_modslot *slot = (const struct mt_modslot *)s->modslots + gen % MODSLOTS;
	uint64_t n = slot->count;
	if (n > MODULES_PER_SLOT)
		return 0;
	uint64_t lo = 0, hi = n;
	while (lo < hi) {
		uint64_t mid = (lo + hi) / 2;
		if (slot->modules[mid].start <= pc)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (!lo)
		return 0;
	const struct mt_module *m = &slot->modules[lo - 1];
	return pc < m->end ? m : 0;
}

/* A program calls the allocator from few places, so walks look the same return addresses up
 * again and again, and the binary search over a library's rows was half of the recorder's
 * time. This direct-mapped cache keeps the row found for an address (its index in the
 * module's rows, low 32 bits) under a tag of the address (high 32 bits). A hit is checked
 * against the rows themselves, so a colliding or stale entry costs a search, never a row. */
#define ROW_CACHE_BITS 14
static uint64_t row_cache[1 << ROW_CACHE_BITS];

static const struct mt_row *find_row(const struct mt_module *m, uint64_t vaddr) {
	struct mt_state *s = &memtrace_preload_state;
	if (!m->rows_len || (uint64_t)m->rows_start + m->rows_len > s->rows_cap)
		return 0;
	const struct mt_row *rows = (const struct mt_row *)s->rows + m->rows_start;
	uint64_t h = (vaddr ^ (uint64_t)m->rows_start << 40) * 0x9e3779b97f4a7c15ull;
	uint64_t *cached = &row_cache[h >> (64 - ROW_CACHE_BITS)], tag = (h >> 18) & 0xffffffffull;
	uint64_t e = __atomic_load_n(cached, __ATOMIC_RELAXED);
	if (e >> 32 == tag) {
		uint64_t r = (uint32_t)e;
		if (r < m->rows_len && rows[r].pc <= vaddr && (r + 1 == m->rows_len || rows[r + 1].pc > vaddr))
			return &rows[r];
	}
	uint64_t lo = 0, hi = m->rows_len;
	while (lo < hi) {
		uint64_t mid = (lo + hi) / 2;
		if (rows[mid].pc <= vaddr)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (!lo)
		return 0;
	__atomic_store_n(cached, tag << 32 | (lo - 1), __ATOMIC_RELAXED);
	return &rows[lo - 1];
}

struct walk {
	uint64_t pc, sp, bp;
	uint32_t len, end; /* end: the counter the walk ended with */
	uint64_t ips[MAX_FRAMES];
	uint64_t fp_frames;
};

/* To the caller's frame: CFA, the caller's bp, then the return address at CFA-8. */
static int advance(struct walk *w, uint64_t cfa, uint64_t bp) {
	if (cfa <= w->sp) {
		w->end = C_BAD_FRAME;
		return 0;
	}
	if (!readable(cfa - 8)) {
		w->end = C_UNREADABLE;
		return 0;
	}
	uint64_t ra = load(cfa - 8);
	if (!ra) {
		w->end = C_COMPLETE;
		return 0;
	}
	if (w->len >= MAX_FRAMES) {
		w->end = C_DEPTH;
		return 0;
	}
	w->ips[w->len++] = ra;
	w->pc = ra;
	w->sp = cfa;
	w->bp = bp;
	return 1;
}

static int fp_step(struct walk *w, uint32_t cause) {
	uint64_t fp = w->bp;
	if (memtrace_preload_state.unwind == MODE_DWARF) {
		w->end = cause;
		return 0;
	}
	if (fp < w->sp || !readable(fp) || !readable(fp + 8) || !load(fp + 8)) {
		w->end = cause;
		return 0;
	}
	w->fp_frames++;
	return advance(w, fp + 16, load(fp));
}

static int step(struct walk *w) {
	if (memtrace_preload_state.unwind == MODE_FP)
		return fp_step(w, C_FP_WALKS);
	/* Every PC here is a return address: the call is the byte before. */
	uint64_t pc = w->pc - 1;
	const struct mt_module *m = find_module(pc);
	if (!m) {
		/* Code memtrace has not described (anonymous, or mapped since): frame pointers. */
		return fp_step(w, C_NOT_LOADED);
	}
	switch (m->kind) {
	case MAPPING_TABLE:
		break;
	case MAPPING_TABLE_FULL:
		return fp_step(w, C_TABLE_FULL);
	case MAPPING_UNUSABLE:
		return fp_step(w, C_UNUSABLE);
	default:
		return fp_step(w, C_NO_TABLE);
	}
	const struct mt_row *row = find_row(m, pc - m->bias);
	if (!row)
		return fp_step(w, C_NO_TABLE);
	uint64_t cfa;
	switch (row->kind) {
	case KIND_CFA_RSP:
		cfa = w->sp + (int64_t)row->cfa_offset;
		break;
	case KIND_CFA_RBP:
		cfa = w->bp + (int64_t)row->cfa_offset;
		break;
	case KIND_PLT:
		cfa = w->sp + (int64_t)row->cfa_offset + ((w->pc & 15) >= (uint64_t)row->rbp_offset ? 8 : 0);
		break;
	case KIND_OUTERMOST:
		w->end = C_COMPLETE;
		return 0;
	case KIND_NO_TABLE:
		return fp_step(w, C_NO_TABLE);
	default:
		w->end = C_UNSUPPORTED;
		return 0;
	}
	uint64_t bp = w->bp;
	if (row->rbp_kind == RBP_AT_CFA) {
		uint64_t at = cfa + (int64_t)row->rbp_offset;
		if (!readable(at)) {
			w->end = C_UNREADABLE;
			return 0;
		}
		bp = load(at);
	}
	return advance(w, cfa, bp);
}

/* The stack from a return address into the allocator's caller: `sp` and `bp` as the caller
 * has them once the call returns. */
static void walk(struct walk *w, uint64_t ra, uint64_t sp, uint64_t bp) {
	w->len = 0;
	w->end = 0;
	w->fp_frames = 0;
	if (!(sp >= stack_lo && sp < stack_hi))
		find_stack(sp);
	w->ips[w->len++] = ra;
	w->pc = ra;
	w->sp = sp;
	w->bp = bp;
	while (step(w)) {
	}
}

/* memtrace-common's stack::hash: the same ids as the eBPF side's. */
static uint64_t stack_hash(const uint64_t *ips, uint32_t len) {
	uint64_t h = 0xcbf29ce484222325ull;
	for (uint32_t i = 0; i < len; i++) {
		h ^= ips[i];
		h *= 0x9e3779b97f4a7c15ull;
		h = h << 31 | h >> 33;
	}
	h ^= len;
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	return h ? h : 1;
}

/* The stack's id, stored once; 0 when the store is full. */
static uint64_t store_stack(const uint64_t *ips, uint32_t len) {
	struct mt_state *s = &memtrace_preload_state;
	uint64_t id = stack_hash(ips, len);
	struct mt_stack_slot *index = (struct mt_stack_slot *)s->stack_index;
	uint64_t mask = s->stack_index_cap - 1;
	for (int pass = 0; pass < 2; pass++) {
		for (uint64_t i = id & mask, n = 0; n <= mask; i = (i + 1) & mask, n++) {
			uint64_t at = __atomic_load_n(&index[i].id, __ATOMIC_ACQUIRE);
			if (at == id)
				return id;
			if (!at)
				break;
		}
		if (pass)
			break;
		lock(&stack_lock);
		/* Looked up again under the lock: another thread may have stored it. */
		for (uint64_t i = id & mask, n = 0; n <= mask; i = (i + 1) & mask, n++) {
			uint64_t at = index[i].id;
			if (at == id)
				break;
			if (at)
				continue;
			uint64_t used = s->stack_arena_used;
			if (s->stacks_stored >= s->stacks_max || used + len > s->stack_arena_cap) {
				s->stack_store_full++;
				unlock(&stack_lock);
				return 0;
			}
			uint64_t *arena = (uint64_t *)s->stack_arena;
			for (uint32_t f = 0; f < len; f++)
				arena[used + f] = ips[f];
			s->stack_arena_used = used + len;
			index[i].off = (uint32_t)used;
			index[i].len = len;
			__atomic_store_n(&index[i].id, id, __ATOMIC_RELEASE);
			s->stacks_stored++;
			break;
		}
		unlock(&stack_lock);
	}
	return id;
}

/* ---- the block table ---- */

static inline unsigned part_of(uint64_t addr, uint64_t *home) {
	uint64_t h = (addr >> 4) * 0x9e3779b97f4a7c15ull;
	*home = h >> 6; /* the low bits pick the partition */
	return (unsigned)(h & (PARTS - 1));
}

/* Doubles a partition's slots (its lock held); 0 when it cannot. */
static int grow(struct mt_part *pt) {
	uint64_t cap = pt->cap * 2;
	if (cap > memtrace_preload_state.max_part_cap)
		return 0;
	struct mt_block *fresh = raw_mmap(cap * sizeof(struct mt_block), PROT_READ | PROT_WRITE);
	if (!fresh)
		return 0;
	struct mt_block *old = (struct mt_block *)pt->slots;
	for (uint64_t i = 0; i < pt->cap; i++) {
		if (!old[i].addr)
			continue;
		uint64_t h;
		part_of(old[i].addr, &h);
		uint64_t j = h & (cap - 1);
		while (fresh[j].addr)
			j = (j + 1) & (cap - 1);
		fresh[j] = old[i];
	}
	uint64_t old_cap = pt->cap;
	pt->slots = (uint64_t)fresh;
	pt->cap = cap;
	sys6(SYS_munmap, (long)old, (long)(old_cap * sizeof(struct mt_block)), 0, 0, 0, 0);
	return 1;
}

static uint64_t now_ns(void) {
	struct mt_timespec ts;
	clock_gettime(1 /* CLOCK_MONOTONIC */, &ts);
	return (uint64_t)ts.sec * 1000000000ull + (uint64_t)ts.nsec;
}

static void freed_drop(struct mt_part *pt, uint64_t home, uint64_t addr); /* errors.h */

/* ---- sampling by bytes (--sample-bytes) ---- */

/* Per thread, as tcmalloc keeps it: bytes left until the next sampled block (0: none drawn
 * yet), and the generator the intervals are drawn from. */
static TLS uint64_t sample_left;
static TLS uint64_t sample_rng;

/* -ln(u) for u in (0, 1), without libm: u = m 2^e with m in [1, 2), and ln m = 2 atanh(z)
 * with z = (m - 1) / (m + 1) <= 1/3, whose odd series has converged to double precision by
 * its 20th term. */
static double neg_ln(double u) {
	union {
		double d;
		uint64_t b;
	} x = {.d = u};
	int e = (int)((x.b >> 52) & 0x7ff) - 1023;
	x.b = (x.b & ~(0x7ffull << 52)) | (1023ull << 52);
	double z = (x.d - 1) / (x.d + 1), z2 = z * z, term = z, sum = 0;
	for (int k = 1; k < 40; k += 2) {
		sum += term / k;
		term *= z2;
	}
	return -((double)e * 0.6931471805599453 + 2 * sum);
}

/* An exponential interval of mean `mean` bytes, at least 1. */
static uint64_t draw_interval(uint64_t mean) {
	if (!sample_rng)
		/* The clock, and this thread's own address of the countdown. */
		sample_rng = (now_ns() * 0x9E3779B97F4A7C15ull ^ (uint64_t)&sample_left) | 1;
	/* xorshift64* */
	sample_rng ^= sample_rng >> 12;
	sample_rng ^= sample_rng << 25;
	sample_rng ^= sample_rng >> 27;
	uint64_t r = sample_rng * 0x2545F4914F6CDD1Dull;
	double u = ((double)(r >> 11) + 0.5) / 9007199254740992.0; /* in (0, 1) */
	double v = (double)mean * neg_ln(u);
	return v < 1 ? 1 : (uint64_t)v;
}

/* Whether a block of `size` bytes is left out: the countdown goes down by its size, and the
 * block that crosses zero is sampled (a new interval drawn). */
static int sampled_out(uint64_t size) {
	if (!sample_bytes)
		return 0;
	if (!sample_left)
		sample_left = draw_interval(sample_bytes);
	if (sample_left > size) {
		sample_left -= size;
		return 1;
	}
	sample_left = draw_interval(sample_bytes);
	return 0;
}

/* Records a block with the stack walked from the caller's frame (ra, sp, bp): the stack's id. */
static MT_NOINLINE uint64_t record(void *p, uint64_t size, uint32_t func, uint64_t ra, uint64_t sp, uint64_t bp) {
	struct mt_state *s = &memtrace_preload_state;
	uint64_t addr = (uint64_t)p;
	uint64_t home;
	unsigned pi = part_of(addr, &home);
	if (!p || (func == FN_MMAP && addr == ~0ull)) {
		struct mt_part *pt = part(pi);
		lock_part(pt);
		pt->counters[C_FAILED]++;
		unlock_part(pt);
		return 0;
	}
	if (size < s->min_size || size > s->max_size) {
		__atomic_fetch_add(&s->unseen, 1, __ATOMIC_RELAXED);
		return 0;
	}
	/* A sampled run records no errors (memleak turns them off): nothing to note in `unseen`. */
	if (sampled_out(size))
		return 0;
	struct walk w;
	if (call_sites) { /* --errors-only: the caller alone, no walk */
		w.ips[0] = ra;
		w.len = 1;
	} else {
		walk(&w, ra, sp, bp);
	}
	uint64_t id = store_stack(w.ips, w.len);
	uint64_t t = now_ns();
	struct mt_part *pt = part(pi);
	lock_part(pt);
	if ((pt->count + 1) * 4 > pt->cap * 3)
		grow(pt);
	struct mt_block *table = (struct mt_block *)pt->slots;
	uint64_t mask = pt->cap - 1;
	if (!call_sites) {
		pt->counters[C_WALKS]++;
		/* A frame-pointer walk's end tells nothing of whether it was whole: counted as such. */
		pt->counters[s->unwind == MODE_FP ? C_FP_WALKS : w.end ? w.end : C_DEPTH]++;
		if (s->unwind != MODE_FP)
			pt->counters[C_FP_FRAMES] += w.fp_frames;
	}
	if (!id)
		pt->counters[C_STACKS_LOST]++;
	uint64_t i = home & mask, n = 0;
	for (; n <= mask; i = (i + 1) & mask, n++) {
		if (!table[i].addr || table[i].addr == addr)
			break;
	}
	if (n > mask) {
		pt->counters[C_MAP_FULL]++;
		__atomic_fetch_add(&s->unseen, 1, __ATOMIC_RELAXED);
	} else {
		if (table[i].addr == addr)
			pt->counters[C_REPLACED]++;
		else
			pt->count++;
		table[i].size = size;
		table[i].stack = id;
		table[i].time_ns = t;
		table[i].func = func;
		__atomic_store_n(&table[i].addr, addr, __ATOMIC_RELEASE);
		pt->counters[C_TRACKED]++;
	}
	if (pt->freed)
		freed_drop(pt, home, addr);
	unlock_part(pt);
	return id;
}

/* Removes the block at `addr` from its partition `pt` (lock held) into *out; 0 when it was
 * not there. */
static int take(struct mt_part *pt, uint64_t home, uint64_t addr, struct mt_block *out) {
	struct mt_block *table = (struct mt_block *)pt->slots;
	uint64_t mask = pt->cap - 1;
	uint64_t i = home & mask, n = 0;
	for (; n <= mask; i = (i + 1) & mask, n++) {
		if (!table[i].addr || table[i].addr == addr)
			break;
	}
	if (n > mask || table[i].addr != addr)
		return 0;
	if (out)
		*out = table[i];
	pt->counters[C_FREED]++;
	pt->count--;
	/* Backward-shift deletion: no tombstones, so probes stay short. */
	uint64_t hole = i;
	for (uint64_t j = (i + 1) & mask;; j = (j + 1) & mask) {
		uint64_t a = table[j].addr;
		if (!a)
			break;
		uint64_t h;
		part_of(a, &h);
		uint64_t want = h & mask;
		/* j may move to the hole unless its home lies cyclically in (hole, j]. */
		int stays = hole <= j ? (hole < want && want <= j) : (hole < want || want <= j);
		if (stays)
			continue;
		table[hole] = table[j];
		hole = j;
	}
	__atomic_store_n(&table[hole].addr, 0, __ATOMIC_RELEASE);
	return 1;
}

/* Removes the block at `addr` into *out; 0 when it was not there (`count`: a miss is a
 * blind spot, as a free of an address never seen allocated). */
static int forget(uint64_t addr, struct mt_block *out, int count) {
	uint64_t home;
	struct mt_part *pt = part(part_of(addr, &home));
	lock_part(pt);
	int had = take(pt, home, addr, out);
	if (!had && count)
		pt->counters[C_UNKNOWN_FREE]++;
	unlock_part(pt);
	return had;
}

/* Puts a record back (a realloc that failed left its block where it was). */
static void restore(const struct mt_block *b) {
	uint64_t home;
	unsigned pi = part_of(b->addr, &home);
	struct mt_part *pt = part(pi);
	lock_part(pt);
	if ((pt->count + 1) * 4 > pt->cap * 3)
		grow(pt);
	struct mt_block *table = (struct mt_block *)pt->slots;
	uint64_t mask = pt->cap - 1;
	for (uint64_t i = home & mask, n = 0; n <= mask; i = (i + 1) & mask, n++) {
		if (!table[i].addr) {
			table[i] = *b;
			pt->counters[C_FREED]--;
			pt->count++;
			break;
		}
	}
	unlock_part(pt);
}

#include "errors.h"

/* An allocation that goes by unrecorded: `p`, noted so that its free is not judged. */
static void *passed(void *p) {
	if (!p || !memtrace_preload_state.errors)
		return p;
	if (init_state == 1 && in_shim && early_n < sizeof early / sizeof *early)
		early[early_n++] = (uint64_t)p; /* the starting thread's own calls */
	else
		__atomic_fetch_add(&memtrace_preload_state.unseen, 1, __ATOMIC_RELAXED);
	return p;
}

/* ---- the interposed functions ---- */

/* The caller's frame as it will be once we return: our frame pointer is its stack. */
#define CALLER() (uint64_t) __builtin_return_address(0), (uint64_t)__builtin_frame_address(0) + 16, \
                 *(uint64_t *)__builtin_frame_address(0)

#define ENTER() (ready() && !in_shim++)
#define LEAVE() (in_shim--)

MT_EXPORT void *malloc(size_t n) {
	if (__builtin_expect(!real_malloc, 0)) {
		if (in_shim || (ready(), !real_malloc))
			return boot_alloc(n);
	}
	if (!ENTER()) {
		in_shim -= init_state == 2;
		return passed(real_malloc(n));
	}
	void *p = real_malloc(n);
	record(p, n, FN_MALLOC, CALLER());
	LEAVE();
	return p;
}

MT_EXPORT void free(void *p) {
	if (!p || from_boot(p))
		return;
	if (!ENTER()) {
		in_shim -= init_state == 2;
		real_free(p);
		return;
	}
	if (memtrace_preload_state.errors)
		free_checked((uint64_t)p, CALLER());
	else
		forget((uint64_t)p, 0, !sample_bytes); /* sampled: most frees are of blocks left out */
	real_free(p);
	LEAVE();
}

MT_EXPORT void *calloc(size_t n, size_t m) {
	if (__builtin_expect(!real_calloc, 0)) {
		if (in_shim || (ready(), !real_calloc)) {
			void *p = boot_alloc(n * m);
			return p; /* the arena is zeroed and never reused */
		}
	}
	if (!ENTER()) {
		in_shim -= init_state == 2;
		return passed(real_calloc(n, m));
	}
	void *p = real_calloc(n, m);
	record(p, (uint64_t)n * m, FN_CALLOC, CALLER());
	LEAVE();
	return p;
}

static void *realloc_as(void *old, size_t n, uint32_t func, void *(*call)(void *, size_t, size_t), size_t a,
                        size_t b, uint64_t ra, uint64_t sp, uint64_t bp) {
	/* The old block's record goes first: once freed, its address may be another thread's. */
	struct mt_block was;
	int checked = memtrace_preload_state.errors != 0;
	int had = old && (checked ? realloc_checked((uint64_t)old, func, &was, ra, sp, bp) : forget((uint64_t)old, &was, !sample_bytes));
	void *p = call(old, a, b);
	if (!p && old && n) {
		if (had)
			restore(&was); /* failed: the old block is still there */
		record(0, n, func, ra, sp, bp);
	} else if (p) {
		uint64_t stack = record(p, n, func, ra, sp, bp);
		if (had && checked && p != old)
			retire(&was, stack); /* moved: the old block is freed */
	} else if (had && checked) {
		retire(&was, walk_and_store(ra, sp, bp)); /* realloc(p, 0) freed it */
	}
	return p;
}

static void *call_realloc(void *p, size_t n, size_t unused) {
	(void)unused;
	return real_realloc(p, n);
}

static void *call_reallocarray(void *p, size_t n, size_t m) {
	return real_reallocarray(p, n, m);
}

MT_EXPORT void *realloc(void *old, size_t n) {
	if (from_boot(old)) {
		void *p = malloc(n);
		for (size_t i = 0; p && i < n && (char *)old + i < boot_arena + sizeof boot_arena; i++)
			((char *)p)[i] = ((char *)old)[i];
		return p;
	}
	if (!ENTER()) {
		in_shim -= init_state == 2;
		return passed(real_realloc(old, n));
	}
	void *p = realloc_as(old, n, FN_REALLOC, call_realloc, n, 0, CALLER());
	LEAVE();
	return p;
}

MT_EXPORT void *reallocarray(void *old, size_t n, size_t m) {
	if (!ENTER()) {
		in_shim -= init_state == 2;
		return passed(real_reallocarray(old, n, m));
	}
	void *p = real_reallocarray ? realloc_as(old, n * m, FN_REALLOCARRAY, call_reallocarray, n, m, CALLER()) : 0;
	LEAVE();
	return p;
}

MT_EXPORT int posix_memalign(void **out, size_t align, size_t n) {
	if (!ENTER()) {
		in_shim -= init_state == 2;
		int ret = real_posix_memalign(out, align, n);
		if (!ret)
			passed(*out);
		return ret;
	}
	int ret = real_posix_memalign(out, align, n);
	record(ret ? 0 : *out, n, FN_POSIX_MEMALIGN, CALLER());
	LEAVE();
	return ret;
}

#define ALIGNED(name, fn, call, ...)                                        \
	MT_EXPORT void *name {                                              \
		if (!ENTER()) {                                             \
			in_shim -= init_state == 2;                         \
			return passed(call);                                \
		}                                                           \
		void *p = call;                                             \
		record(p, __VA_ARGS__, fn, CALLER());                       \
		LEAVE();                                                    \
		return p;                                                   \
	}

ALIGNED(aligned_alloc(size_t align, size_t n), FN_ALIGNED_ALLOC, real_aligned_alloc(align, n), n)
ALIGNED(memalign(size_t align, size_t n), FN_MEMALIGN, real_memalign(align, n), n)
ALIGNED(valloc(size_t n), FN_VALLOC, real_valloc(n), n)
ALIGNED(pvalloc(size_t n), FN_PVALLOC, real_pvalloc(n), n)

static void *mmap_as(void *(*call)(void *, size_t, int, int, int, long), void *addr, size_t len, int prot,
                     int flags, int fd, long off, uint64_t ra, uint64_t sp, uint64_t bp) {
	void *p = call(addr, len, prot, flags, fd, off);
	/* A file's mapping is the file's memory, kept apart from allocations (as memleak's
	 * probes do); MAP_FAILED is a failed allocation. */
	uint32_t func = flags & MAP_ANONYMOUS ? FN_MMAP : FN_MMAP_FILE;
	record(p == (void *)-1 ? 0 : p, len, func, ra, sp, bp);
	return p;
}

/* mmap and mmap64 (the same function in glibc, two names), through the next one's
 * (`is64`: mmap64's, where it has one). Looked up only once started: the first call a
 * program makes may be this one. */
static void *mmap_through(int is64, void *addr, size_t len, int prot, int flags, int fd, long off, uint64_t ra,
                          uint64_t sp, uint64_t bp) {
	int entered = ENTER();
	void *(*call)(void *, size_t, int, int, int, long) = is64 && real_mmap64 ? real_mmap64 : real_mmap;
	if (!entered) {
		in_shim -= init_state == 2;
		if (!call)
			return (void *)sys6(SYS_mmap, (long)addr, (long)len, prot, flags, fd, off);
		return call(addr, len, prot, flags, fd, off);
	}
	void *p = mmap_as(call, addr, len, prot, flags, fd, off, ra, sp, bp);
	LEAVE();
	return p;
}

MT_EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, long off) {
	return mmap_through(0, addr, len, prot, flags, fd, off, CALLER());
}

MT_EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, long off) {
	return mmap_through(1, addr, len, prot, flags, fd, off, CALLER());
}

MT_EXPORT int munmap(void *addr, size_t len) {
	if (!ENTER()) {
		in_shim -= init_state == 2;
		if (!real_munmap)
			return (int)sys6(SYS_munmap, (long)addr, (long)len, 0, 0, 0, 0);
		return real_munmap(addr, len);
	}
	/* The allocator unmaps its own chunks from inside free(): a miss is not a blind spot. */
	forget((uint64_t)addr, 0, 0);
	int ret = real_munmap(addr, len);
	LEAVE();
	return ret;
}
