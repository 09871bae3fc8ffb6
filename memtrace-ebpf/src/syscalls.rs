//! The two halves of a syscall snoop (`memtrace_common::syscalls`): `enter` keeps a call's
//! arguments per thread, `exit` sends them with the result. `syscall_snoop!` declares the
//! globals and maps they use in the calling object.

/// Declares FILTER, CONFIG, OFFSETS, the per-thread PENDING calls (`$pending` at most),
/// EVENTS and LOST, and `fn enter(ctx, call)` and `fn exit(ctx, call)` for the tracepoints.
#[macro_export]
macro_rules! syscall_snoop {
    ($pending:expr) => {
        $crate::filter!();
        #[unsafe(no_mangle)]
        static CONFIG: aya_ebpf::Global<memtrace_common::syscalls::Config> =
            aya_ebpf::Global::new(memtrace_common::syscalls::Config { failed_only: 0, self_pid: 0 });
        #[unsafe(no_mangle)]
        static OFFSETS: aya_ebpf::Global<memtrace_common::syscalls::Offsets> =
            aya_ebpf::Global::new(memtrace_common::syscalls::Offsets {
                args: [[0; memtrace_common::syscalls::MAX_ARGS]; memtrace_common::syscalls::MAX_CALLS],
                nargs: [0; memtrace_common::syscalls::MAX_CALLS],
                ret: [0; memtrace_common::syscalls::MAX_CALLS],
            });
        // LRU: a thread killed inside the call never reaches the exit tracepoint; its entry ages out.
        #[aya_ebpf::macros::btf_map]
        static PENDING: aya_ebpf::btf_maps::LruHashMap<u32, memtrace_common::syscalls::Event, { $pending }> =
            aya_ebpf::btf_maps::LruHashMap::new();
        $crate::events!(memtrace_common::syscalls::Event);

        /// Remembers the call's arguments until it returns.
        #[inline(always)]
        fn enter(ctx: &aya_ebpf::programs::TracePointContext, call: u32) -> u32 {
            use memtrace_common::syscalls::{Event, MAX_ARGS, MAX_CALLS};
            let id = $crate::current_pid_tgid();
            let (pid, tid) = ((id >> 32) as u32, id as u32);
            if pid == CONFIG.load().self_pid || !$crate::wanted(&FILTER.load()) {
                return 0;
            }
            // Field by field: the whole table would not fit on the stack beside the event.
            let offsets = $crate::global_ptr(&OFFSETS);
            let index = call as usize % MAX_CALLS;
            // SAFETY: a field of the global, read in place; index < MAX_CALLS.
            let nargs = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*offsets).nargs[index])) } as usize;
            let mut event = Event {
                // SAFETY: helper without preconditions.
                ts_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
                pid,
                tid,
                call,
                _pad: 0,
                args: [0; MAX_ARGS],
                ret: 0,
                comm: aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16]),
                memcg_id: $crate::current_memcg_id(),
            };
            let mut i = 0;
            while i < MAX_ARGS && i < nargs {
                // SAFETY: as above; i < MAX_ARGS.
                let at = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*offsets).args[index][i])) };
                event.args[i] = $crate::tp_u64(ctx, at);
                i += 1;
            }
            let _ = PENDING.insert(tid, event, 0);
            0
        }

        /// Completes the thread's pending call with its return value and sends it.
        #[inline(always)]
        fn exit(ctx: &aya_ebpf::programs::TracePointContext, call: u32) -> u32 {
            let tid = $crate::current_pid_tgid() as u32;
            let Some(pending) = PENDING.get_ptr(tid) else {
                return 0;
            };
            // SAFETY: pointer from the map lookup; copied before the entry is removed.
            let mut event = unsafe { *pending };
            let _ = PENDING.remove(tid);
            if event.call != call {
                return 0;
            }
            let index = call as usize % memtrace_common::syscalls::MAX_CALLS;
            // SAFETY: a field of the global, read in place; index < MAX_CALLS.
            let at =
                unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$crate::global_ptr(&OFFSETS)).ret[index])) };
            event.ret = $crate::tp_u64(ctx, at) as i64;
            // Errors are -4095..-1; no address or id a call returns is that high.
            if CONFIG.load().failed_only != 0 && !(-4095..0).contains(&event.ret) {
                return 0;
            }
            $crate::submit(&EVENTS, &event, &LOST);
            0
        }
    };
}
