/* memleak's memory errors in the in-process recorder: double and invalid frees, and realloc
 * of a freed block. Included once, by memtrace_preload.c, after the block table.
 *
 * Each partition keeps a bounded record of blocks freed lately, with the stack of the free:
 * FREED_WAYS slots per set, the oldest overwritten when a set is full (counted: the record's
 * horizon). An allocation at an address takes it out of the record, so a block freed and
 * allocated again is never an error. Errors go to a ring memtrace reads while the process
 * runs and at its exit stop, where it holds a process glibc aborts. */

static uint32_t tid(void) {
	if (!my_tid)
		my_tid = (uint32_t)sys6(SYS_gettid, 0, 0, 0, 0, 0, 0);
	return my_tid;
}

static struct mt_freed *freed_set(struct mt_part *pt, uint64_t home) {
	uint64_t sets = memtrace_preload_state.freed_per_part / FREED_WAYS;
	return (struct mt_freed *)pt->freed + (home % sets) * FREED_WAYS;
}

/* The record of `addr` in its partition (lock held); 0 when none. */
static struct mt_freed *freed_find(struct mt_part *pt, uint64_t home, uint64_t addr) {
	if (!pt->freed)
		return 0;
	struct mt_freed *set = freed_set(pt, home);
	for (int i = 0; i < FREED_WAYS; i++)
		if (set[i].addr == addr)
			return &set[i];
	return 0;
}

/* Remembers a freed block (lock held): in its own slot, an empty one, or the oldest's. */
static void freed_put(struct mt_part *pt, uint64_t home, const struct mt_freed *f) {
	if (!pt->freed)
		return;
	struct mt_freed *set = freed_set(pt, home), *slot = 0, *oldest = set;
	for (int i = 0; i < FREED_WAYS && !slot; i++) {
		if (set[i].addr == f->addr || !set[i].addr)
			slot = &set[i];
		else if (set[i].free_ns < oldest->free_ns)
			oldest = &set[i];
	}
	if (!slot) {
		slot = oldest;
		pt->counters[C_FREED_EVICTED]++;
	}
	*slot = *f;
}

/* An allocation at `addr` (lock held): no longer a freed block. */
static void freed_drop(struct mt_part *pt, uint64_t home, uint64_t addr) {
	struct mt_freed *f = freed_find(pt, home, addr);
	if (f)
		f->addr = 0;
}

/* What a free of an address with no live block is (lock held): a double free or a realloc of
 * a freed block when the record has it (copied to *was), else an invalid free, unless some
 * allocation went unrecorded (0: counted as a free of an unknown address). */
static uint32_t judge(struct mt_part *pt, uint64_t home, uint64_t addr, uint32_t func, struct mt_freed *was) {
	struct mt_freed *f = freed_find(pt, home, addr);
	if (f) {
		*was = *f;
		return func == FN_FREE ? ERR_DOUBLE_FREE : ERR_REALLOC_FREED;
	}
	pt->counters[C_UNKNOWN_FREE]++;
	for (uint32_t i = 0; i < early_n; i++)
		if (early[i] == addr)
			return 0;
	if (__atomic_load_n(&memtrace_preload_state.unseen, __ATOMIC_RELAXED))
		return 0;
	pt->counters[C_INVALID_FREES]++;
	return ERR_INVALID_FREE;
}

static void report_error(uint32_t error, uint32_t func, uint64_t addr, uint64_t stack, const struct mt_freed *was,
                         uint64_t sp) {
	struct mt_state *s = &memtrace_preload_state;
	if (!s->errors)
		return;
	uint64_t i = __atomic_fetch_add(&s->errors_written, 1, __ATOMIC_ACQ_REL);
	struct mt_error *e = (struct mt_error *)s->errors + i % ERRORS_CAP;
	__atomic_store_n(&e->seq, 0, __ATOMIC_RELEASE);
	e->kind = EV_ERROR;
	e->error = error;
	e->pid = (uint32_t)sys6(SYS_getpid, 0, 0, 0, 0, 0, 0);
	e->tid = tid();
	e->func = func;
	e->image = 0;
	e->addr = addr;
	e->stack_id = stack;
	e->size = was ? was->size : 0;
	e->alloc_stack = was ? was->alloc_stack : 0;
	e->free_stack = was ? was->free_stack : 0;
	e->alloc_func = was ? was->func : 0;
	e->free_tid = was ? was->tid : 0;
	e->freed_ns = was ? was->free_ns : 0;
	e->timestamp_ns = now_ns();
	e->sp = sp;
	__atomic_store_n(&e->seq, i + 1, __ATOMIC_RELEASE);
}

static uint64_t walk_and_store(uint64_t ra, uint64_t sp, uint64_t bp) {
	struct walk w;
	walk(&w, ra, sp, bp);
	return store_stack(w.ips, w.len);
}

/* free(addr) with errors on: the block moves to the freed record with this call's stack, or
 * the call is an error. Before the allocator's free, which may abort on what it finds. */
static MT_NOINLINE void free_checked(uint64_t addr, uint64_t ra, uint64_t sp, uint64_t bp) {
	uint64_t stack = walk_and_store(ra, sp, bp);
	uint64_t t = now_ns(), home;
	struct mt_part *pt = part(part_of(addr, &home));
	struct mt_block b;
	struct mt_freed was;
	lock_part(pt);
	if (take(pt, home, addr, &b)) {
		struct mt_freed f = {addr, b.size, b.stack, stack, t, b.func, tid()};
		freed_put(pt, home, &f);
		unlock_part(pt);
		return;
	}
	uint32_t error = judge(pt, home, addr, FN_FREE, &was);
	unlock_part(pt);
	if (error)
		report_error(error, FN_FREE, addr, stack, error == ERR_INVALID_FREE ? 0 : &was, sp);
}

/* realloc's old block with errors on: taken out of the table into *out (1), or an error (0). */
static MT_NOINLINE int realloc_checked(uint64_t addr, uint32_t func, struct mt_block *out, uint64_t ra, uint64_t sp,
                                       uint64_t bp) {
	uint64_t home;
	struct mt_part *pt = part(part_of(addr, &home));
	struct mt_freed was;
	lock_part(pt);
	if (take(pt, home, addr, out)) {
		unlock_part(pt);
		return 1;
	}
	uint32_t error = judge(pt, home, addr, func, &was);
	unlock_part(pt);
	if (error)
		report_error(error, func, addr, walk_and_store(ra, sp, bp), error == ERR_INVALID_FREE ? 0 : &was, sp);
	return 0;
}

/* realloc freed the old block `b` (it moved, or the size was 0): `stack` is the realloc's. */
static void retire(const struct mt_block *b, uint64_t stack) {
	uint64_t home;
	struct mt_part *pt = part(part_of(b->addr, &home));
	struct mt_freed f = {b->addr, b->size, b->stack, stack, now_ns(), b->func, tid()};
	lock_part(pt);
	/* Another thread may have the address already: its live block stands. */
	struct mt_block *table = (struct mt_block *)pt->slots;
	uint64_t mask = pt->cap - 1, i = home & mask, n = 0;
	for (; n <= mask && table[i].addr && table[i].addr != b->addr; i = (i + 1) & mask, n++) {
	}
	if (n > mask || table[i].addr != b->addr)
		freed_put(pt, home, &f);
	unlock_part(pt);
}
