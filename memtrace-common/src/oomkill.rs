//! oomkill: one event per OOM kill, from `oom:mark_victim` (victim details) and, where the
//! kernel has kprobes, `oom_kill_process` (the trigger's user stack).

use crate::user_pod;

/// Offset meaning "this kernel's record has no such field" (older kernels carry only pid).
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Byte offsets of the `oom:mark_victim` fields, from the running kernel's format file.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct VictimOffsets {
    pub pid: u32,
    /// A `__data_loc char[]`: the u32 there holds the string's offset (low 16 bits).
    pub comm: u32,
    pub total_vm: u32,
    pub anon_rss: u32,
    pub file_rss: u32,
    pub shmem_rss: u32,
    pub uid: u32,
    pub pgtables: u32,
    pub oom_score_adj: u32,
    pub _pad: u32,
}

impl Default for VictimOffsets {
    fn default() -> Self {
        VictimOffsets {
            pid: FIELD_ABSENT,
            comm: FIELD_ABSENT,
            total_vm: FIELD_ABSENT,
            anon_rss: FIELD_ABSENT,
            file_rss: FIELD_ABSENT,
            shmem_rss: FIELD_ABSENT,
            uid: FIELD_ABSENT,
            pgtables: FIELD_ABSENT,
            oom_score_adj: FIELD_ABSENT,
            _pad: 0,
        }
    }
}

/// `oom:mark_victim` fired: a victim was chosen and killed; the current task is the trigger.
pub const EV_VICTIM: u32 = 1;
/// `oom_kill_process` entered (kprobe): the trigger with its user stack, before the victim.
pub const EV_TRIGGER: u32 = 2;

/// Memory figures are in kB, as the tracepoint records them.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    pub kind: u32,
    pub trigger_pid: u32,
    pub trigger_tid: u32,
    pub victim_pid: u32,
    pub trigger_comm: [u8; 16],
    pub victim_comm: [u8; 16],
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    pub uid: u32,
    pub oom_score_adj: i32,
    /// User stack of the trigger (EV_TRIGGER), or `STACK_LOST`.
    pub stack_id: u64,
    pub timestamp_ns: u64,
}

user_pod!(VictimOffsets, Event);
