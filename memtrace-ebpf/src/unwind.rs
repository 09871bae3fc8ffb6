//! The user-stack unwinder, kernel side: walks a task's user stack with the rows user space
//! compiled from each module's `.eh_frame` (see memtrace-common's `unwind`), using frame
//! pointers only for code that has no table. One frame per `bpf_loop` iteration, so the
//! verifier checks a frame's step once whatever the depth (bpf_loop: 5.17+).
//!
//! Everything read here comes from the traced process (its stack) or from tables built from
//! its files: every read is a checked helper, every loop is bounded, and a frame must move
//! up the stack or the walk stops.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, pt_regs},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    macros::btf_map,
};
use memtrace_common::{
    stack::{HASH_SEED, MAX_FRAMES, Stack, hash_finish, hash_step},
    unwind::{
        BINARY_STEPS, CUT_BAD_FRAME, CUT_DEPTH, CUT_NO_TABLE, CUT_NOT_LOADED, CUT_TABLE_FULL, CUT_TRAMPOLINE,
        CUT_UNREADABLE, CUT_UNSUPPORTED, CUT_UNUSABLE, ENDED_COMPLETE, FP_FRAMES, FP_WALKS, KEY_BITS, KIND_CFA_RBP,
        KIND_CFA_RSP, KIND_OUTERMOST, KIND_PLT, MAPPING_NO_TABLE, MAPPING_TABLE, MAPPING_TABLE_FULL, MAPPING_UNUSABLE,
        MODE_DWARF, MODE_FP, Mapping, MappingKey, PackedRow, RBP_AT_CFA, STAT_COUNT, TRAMPOLINE_FRAMES,
        TrampolineOffsets, WALKS, mapping_key,
    },
};

use crate::{BPF_NOEXIST, bump};

/// How tools record user stacks: `MODE_FP` or `MODE_DWARF`, set by user space before load.
#[unsafe(no_mangle)]
static UNWIND_MODE: Global<u32> = Global::new(MODE_FP);

/// Where the kernel keeps uretprobes' real return addresses (BTF offsets, set before load).
#[unsafe(no_mangle)]
static UNWIND_TRAMPOLINE: Global<TrampolineOffsets> = Global::new(TrampolineOffsets {
    task_utask: 0,
    utask_return_instances: 0,
    ri_stack: 0,
    ri_orig_ret_vaddr: 0,
    ri_next: 0,
    task_mm: 0,
    mm_xol_area: 0,
    xol_vaddr: 0,
    enabled: 0,
});

/// Every module's rows, back to back; user space sizes it before load (`--unwind-rows`) and
/// writes it through a shared mapping (BPF_F_MMAPABLE, 5.5+).
#[btf_map]
static UNWIND_ROWS: Array<PackedRow, 1, { BPF_F_MMAPABLE as usize }> = Array::new();
/// (pid, address block) to the mapping's rows and bias; a bare pid marks a loaded process.
#[btf_map]
static UNWIND_MAPPINGS: LpmTrie<MappingKey, Mapping, 262_144, { BPF_F_NO_PREALLOC as usize }> = LpmTrie::new();
/// Processes whose tables user space should (re)load: unknown ones, or a PC in none of their
/// loaded mappings. User space drains it.
#[btf_map]
static UNWIND_WANTED: HashMap<u32, u32, 4096> = HashMap::new();
#[btf_map]
static UNWIND_STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
/// The stack being built, per CPU (the store wants map memory to hash and copy from).
#[btf_map]
static UNWIND_STACK: PerCpuArray<Stack, 1> = PerCpuArray::new();

/// The registers a walk needs, as the task had them in user mode.
#[derive(Clone, Copy)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

impl UserRegs {
    /// From a uprobe's context, which is the user registers at the probe.
    #[inline(always)]
    pub fn from_probe(regs: *const pt_regs) -> Option<UserRegs> {
        Self::read(regs)
    }

    /// The current task's user registers, saved at its entry to the kernel (syscall, fault).
    #[inline(always)]
    pub fn current() -> Option<UserRegs> {
        // SAFETY: helper without preconditions.
        let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() };
        Self::read(task_pt_regs(task.cast()))
    }

    #[inline(always)]
    fn read(regs: *const pt_regs) -> Option<UserRegs> {
        // SAFETY: reads kernel memory through the checked helper.
        unsafe {
            Some(UserRegs {
                ip: bpf_probe_read_kernel(&raw const (*regs).rip).ok()?,
                sp: bpf_probe_read_kernel(&raw const (*regs).rsp).ok()?,
                bp: bpf_probe_read_kernel(&raw const (*regs).rbp).ok()?,
            })
        }
    }
}

/// `bpf_task_pt_regs` (helper 175, kernel 5.15+): a task's saved user registers.
#[inline(always)]
pub fn task_pt_regs(task: *mut c_void) -> *const pt_regs {
    // SAFETY: helper 175 takes a BTF task pointer and returns its saved user registers.
    unsafe {
        let helper: unsafe extern "C" fn(*mut c_void) -> *const pt_regs = core::mem::transmute(175usize);
        helper(task)
    }
}

/// Whether tools should walk with the tables rather than `bpf_get_stack`. Never in objects
/// built without `bpf-loop`: a kernel before 5.13 rejects any program that names a callback
/// (the verifier counts no subprogram for it), even one on a path it would never run.
#[inline(always)]
pub fn tables_enabled() -> bool {
    cfg!(feature = "bpf-loop") && UNWIND_MODE.load() != MODE_FP
}

/// The walk's state, per CPU. In map memory, not on the stack: the verifier does not follow
/// values through a map, so every iteration of the callback looks the same to it and it
/// checks the callback once, where a frame count it tracked would make it check the
/// callback once per possible count (a third of a second at load on 6.18).
#[repr(C)]
struct Walk {
    pc: u64,
    sp: u64,
    bp: u64,
    pid: u32,
    /// Frames in `UNWIND_STACK` so far.
    len: u32,
    /// The `UNWIND_STATS` index the walk ended with; 0 while it goes on.
    end: u32,
    _pad: u32,
    /// The task's next pending uretprobe return instance (kernel address), 0 when none: the
    /// frame whose return-address slot it names returns through the trampoline.
    ri: u64,
    /// The uretprobe trampoline's address in this process, 0 when no return is pending.
    trampoline: u64,
    /// The stack's hash so far (memtrace-common's `stack::hash_step` over `ips`): the store
    /// then needs no pass of its own over the frames.
    hash: u64,
    /// The mapping the last frame was in: the next frame in the same one needs no lookup.
    current: Mapping,
}

#[btf_map]
static UNWIND_WALK: PerCpuArray<Walk, 1> = PerCpuArray::new();

/// Counts a walk made by `bpf_get_stack` (frame pointers only), whose end is not known here.
#[inline(always)]
pub fn count_fp_walk() {
    bump(&UNWIND_STATS, WALKS);
    bump(&UNWIND_STATS, FP_WALKS);
}

/// The current task's newest pending uretprobe return and the trampoline's address; (0, 0)
/// when none is pending (nearly always) or the kernel's layout is unknown.
#[inline(always)]
fn pending_returns() -> (u64, u64) {
    let o = UNWIND_TRAMPOLINE.load();
    if o.enabled == 0 {
        return (0, 0);
    }
    // SAFETY: helper without preconditions.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let Ok(utask) = kread(task + o.task_utask as u64) else { return (0, 0) };
    if utask == 0 {
        return (0, 0);
    }
    let ri = kread(utask + o.utask_return_instances as u64).unwrap_or(0);
    if ri == 0 {
        return (0, 0);
    }
    let trampoline = kread(task + o.task_mm as u64)
        .and_then(|mm| kread(mm + o.mm_xol_area as u64))
        .and_then(|area| if area == 0 { Err(()) } else { kread(area + o.xol_vaddr as u64) })
        .unwrap_or(0);
    (ri, trampoline)
}

#[inline(always)]
fn kread(addr: u64) -> Result<u64, ()> {
    // SAFETY: a checked read of kernel memory.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.map_err(|_| ())
}

/// The return address of the frame whose return-address slot is `cfa - 8`: `ra` itself, or,
/// where a uretprobe replaced it with its trampoline, the original the kernel recorded.
#[inline(always)]
fn through_trampoline(state: &mut Walk, cfa: u64, ra: u64) -> Result<u64, u32> {
    if state.ri == 0 {
        return if state.trampoline != 0 && ra == state.trampoline { Err(CUT_TRAMPOLINE) } else { Ok(ra) };
    }
    let o = UNWIND_TRAMPOLINE.load();
    let slot = cfa.wrapping_sub(8);
    // Newest first, so innermost first; instances of frames below this one (left by a
    // longjmp) are passed over.
    for _ in 0..4 {
        let Ok(stack) = kread(state.ri + o.ri_stack as u64) else { break };
        if stack >= slot {
            break;
        }
        state.ri = kread(state.ri + o.ri_next as u64).unwrap_or(0);
        if state.ri == 0 {
            break;
        }
    }
    if state.ri != 0 && kread(state.ri + o.ri_stack as u64) == Ok(slot) {
        let orig = kread(state.ri + o.ri_orig_ret_vaddr as u64).map_err(|_| CUT_TRAMPOLINE)?;
        state.ri = kread(state.ri + o.ri_next as u64).unwrap_or(0);
        bump(&UNWIND_STATS, TRAMPOLINE_FRAMES);
        return Ok(orig);
    }
    if state.trampoline != 0 && ra == state.trampoline { Err(CUT_TRAMPOLINE) } else { Ok(ra) }
}

/// Walks the user stack of process `pid` from `regs` into this CPU's `UNWIND_STACK`, whose
/// first frame is `regs.ip`; with the stack's id (`stack::hash` of its frames). None only
/// when there is no scratch slot.
#[inline(always)]
pub fn walk(regs: UserRegs, pid: u32) -> Option<(&'static Stack, u64)> {
    let stack = UNWIND_STACK.get_ptr_mut(0)?;
    bump(&UNWIND_STATS, WALKS);
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    unsafe {
        (*stack).ips[0] = regs.ip;
        (*stack).len = 1;
    }
    let state = UNWIND_WALK.get_ptr_mut(0)?;
    let (ri, trampoline) = pending_returns();
    let hash = hash_step(HASH_SEED, regs.ip);
    let current = Mapping::new(0, 0, 0, 0);
    // SAFETY: this CPU's slot, as for the stack.
    unsafe {
        state.write(Walk {
            pc: regs.ip,
            sp: regs.sp,
            bp: regs.bp,
            pid,
            len: 1,
            end: 0,
            _pad: 0,
            ri,
            trampoline,
            hash,
            current,
        })
    };
    // SAFETY: `step` has the callback signature bpf_loop wants; it takes no context.
    #[cfg(feature = "bpf-loop")]
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop((MAX_FRAMES - 1) as u32, step as *mut c_void, core::ptr::null_mut(), 0);
    }
    // SAFETY: as above.
    let (len, end, hash) = unsafe { ((*state).len, (*state).end, (*state).hash) };
    bump(&UNWIND_STATS, if end == 0 { CUT_DEPTH } else { end });
    // SAFETY: as above.
    unsafe {
        (*stack).len = len;
        Some((&*stack, hash_finish(hash, len)))
    }
}

/// One frame: from `state.pc/sp/bp` to the caller's, pushing the caller's PC. Returns 1 to
/// stop the loop.
#[cfg_attr(not(feature = "bpf-loop"), allow(dead_code, reason = "only bpf_loop calls it"))]
extern "C" fn step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(state) = UNWIND_WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: this CPU's slot, set up by `walk`.
    let state = unsafe { &mut *state };
    match unwind_one(state, index == 0) {
        Ok(()) => 0,
        Err(end) => {
            state.end = end;
            1
        }
    }
}

#[inline(always)]
fn unwind_one(state: &mut Walk, first: bool) -> Result<(), u32> {
    // The first PC is where the task is; the others are return addresses, so the call is
    // the byte before (a call may be a function's last instruction).
    let pc = if first { state.pc } else { state.pc - 1 };
    if !(state.current.start() <= pc && pc < state.current.end()) {
        let key = Key::new(KEY_BITS, mapping_key(state.pid, pc));
        // Code not loaded yet may well have a table: rather than guess through frame pointers,
        // end the stack and have the tables loaded for the next one.
        let Some(found) = UNWIND_MAPPINGS.get(&key) else {
            want(state.pid);
            return Err(CUT_NOT_LOADED);
        };
        state.current = *found;
    }
    let mapping = &state.current;
    let (cfa, bp) = match mapping.kind {
        MAPPING_TABLE => {
            let Some(row) = find_row(mapping, pc.wrapping_sub(mapping.bias())) else {
                return frame_pointer_step(state, CUT_NO_TABLE);
            };
            let cfa = match row.kind {
                KIND_CFA_RSP => state.sp.wrapping_add(row.cfa_offset as i64 as u64),
                KIND_CFA_RBP => state.bp.wrapping_add(row.cfa_offset as i64 as u64),
                KIND_PLT => {
                    let pushed = if (state.pc & 15) >= row.rbp_offset as u64 { 8 } else { 0 };
                    state.sp.wrapping_add(row.cfa_offset as i64 as u64).wrapping_add(pushed)
                }
                KIND_OUTERMOST => return Err(ENDED_COMPLETE),
                0 => return frame_pointer_step(state, CUT_NO_TABLE),
                _ => return Err(CUT_UNSUPPORTED),
            };
            let bp = if row.rbp_kind == RBP_AT_CFA {
                read(cfa.wrapping_add(row.rbp_offset as i64 as u64))?
            } else {
                state.bp
            };
            (cfa, bp)
        }
        MAPPING_NO_TABLE => return frame_pointer_step(state, CUT_NO_TABLE),
        MAPPING_TABLE_FULL => return frame_pointer_step(state, CUT_TABLE_FULL),
        MAPPING_UNUSABLE => return frame_pointer_step(state, CUT_UNUSABLE),
        _ => {
            // A PC in none of a loaded process's mappings: new since the load (dlopen).
            want(state.pid);
            return Err(CUT_NOT_LOADED);
        }
    };
    let ra = read(cfa.wrapping_sub(8))?;
    advance(state, cfa, bp, ra)
}

/// The frame-pointer step for code without a table: [rbp] is the caller's rbp, [rbp+8] the
/// return address. When it fails, the walk ends with `cause`.
#[inline(always)]
fn frame_pointer_step(state: &mut Walk, cause: u32) -> Result<(), u32> {
    if UNWIND_MODE.load() == MODE_DWARF {
        return Err(cause);
    }
    let fp = state.bp;
    if fp < state.sp || fp & 7 != 0 {
        return Err(cause);
    }
    let (Ok(bp), Ok(ra)) = (read(fp), read(fp + 8)) else { return Err(cause) };
    if ra == 0 {
        return Err(cause);
    }
    bump(&UNWIND_STATS, FP_FRAMES);
    advance(state, fp + 16, bp, ra)
}

/// Moves to the caller and pushes its PC; a zero return address ends the stack.
#[inline(always)]
fn advance(state: &mut Walk, cfa: u64, bp: u64, ra: u64) -> Result<(), u32> {
    let ra = through_trampoline(state, cfa, ra)?;
    if ra == 0 {
        return Err(ENDED_COMPLETE);
    }
    // The caller's frame is above this one: anything else is a wrong rule or a corrupt stack,
    // and following it could walk in circles.
    if cfa <= state.sp {
        return Err(CUT_BAD_FRAME);
    }
    let Some(stack) = UNWIND_STACK.get_ptr_mut(0) else { return Err(CUT_UNREADABLE) };
    let n = state.len as usize;
    if n >= MAX_FRAMES {
        return Err(CUT_DEPTH);
    }
    // SAFETY: this CPU's slot; `n` is checked against the array's length above.
    unsafe { (*stack).ips[n] = ra };
    state.hash = hash_step(state.hash, ra);
    state.len += 1;
    state.pc = ra;
    state.sp = cfa;
    state.bp = bp;
    Ok(())
}

#[inline(always)]
fn read(addr: u64) -> Result<u64, u32> {
    // SAFETY: a checked read of user memory.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|_| CUT_UNREADABLE)
}

/// The last row of the mapping's table at or before `vaddr`, by binary search.
#[inline(always)]
fn find_row(mapping: &Mapping, vaddr: u64) -> Option<PackedRow> {
    if mapping.rows_len == 0 {
        return None;
    }
    let mut lo = mapping.rows_start;
    let mut hi = mapping.rows_start.wrapping_add(mapping.rows_len);
    for _ in 0..BINARY_STEPS {
        if hi.wrapping_sub(lo) <= 1 {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        let row = UNWIND_ROWS.get(mid)?;
        if row.pc <= vaddr {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let row = *UNWIND_ROWS.get(lo)?;
    (row.pc <= vaddr).then_some(row)
}

/// Asks user space to (re)load `pid`'s tables; cheap when already asked.
#[inline(always)]
fn want(pid: u32) {
    let _ = UNWIND_WANTED.insert(pid, 1, BPF_NOEXIST);
}
