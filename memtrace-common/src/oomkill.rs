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
    /// BTF offsets of `oom_control.chosen` and `task_struct.comm`: the kprobe on
    /// oom_kill_process names the victim where mark_victim records only its pid (before 6.x),
    /// and the victim may be reaped before user space could read its name. FIELD_ABSENT: not
    /// read.
    pub oc_chosen: u32,
    pub task_comm: u32,
    pub _pad: u32,
}

impl VictimOffsets {
    pub const UNSET: VictimOffsets = VictimOffsets {
        pid: FIELD_ABSENT,
        comm: FIELD_ABSENT,
        total_vm: FIELD_ABSENT,
        anon_rss: FIELD_ABSENT,
        file_rss: FIELD_ABSENT,
        shmem_rss: FIELD_ABSENT,
        uid: FIELD_ABSENT,
        pgtables: FIELD_ABSENT,
        oom_score_adj: FIELD_ABSENT,
        oc_chosen: FIELD_ABSENT,
        task_comm: FIELD_ABSENT,
        _pad: 0,
    };
}

impl Default for VictimOffsets {
    fn default() -> Self {
        VictimOffsets::UNSET
    }
}

/// How deep the trigger's memory cgroup chain is read (its group, then each parent).
pub const MEMCG_LEVELS: usize = 8;
/// Kernel return addresses kept from the trigger's stack: enough to pass the OOM killer's own
/// frames and reach the caller of out_of_memory.
pub const KSTACK_DEPTH: usize = 16;

/// Offsets from the kernel's BTF to walk from the current task to its memory cgroup and up:
/// `task->cgroups->subsys[memory_cgrp_id]` is the group's `cgroup_subsys_state`, the first
/// member of `struct mem_cgroup`; `css->cgroup->kn->id` names it (the inode number of its
/// directory); `css->parent` is the next level. Each level's page counters (`usage`, `max`)
/// tell how far it is from its limit. `valid` 0: not read.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct MemcgOffsets {
    pub valid: u32,
    pub task_cgroups: u32,
    /// `css_set.subsys` plus 8 * memory_cgrp_id.
    pub css_set_memory: u32,
    pub css_cgroup: u32,
    pub css_parent: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// `mem_cgroup.memory.usage` and `.max`.
    pub memory_usage: u32,
    pub memory_max: u32,
    /// `mem_cgroup.memsw.usage` and `.max` (cgroup v1's memory+swap limit), or FIELD_ABSENT.
    pub memsw_usage: u32,
    pub memsw_max: u32,
    /// `task_struct.active_memcg`: a task charging on another group's behalf (set_active_memcg)
    /// charges that group, and the walk starts there. FIELD_ABSENT: not read.
    pub task_active_memcg: u32,
}

impl MemcgOffsets {
    /// Nothing resolved yet: the kernel side reads no cgroup until user space fills this in.
    pub const UNSET: MemcgOffsets = MemcgOffsets {
        valid: 0,
        task_cgroups: 0,
        css_set_memory: 0,
        css_cgroup: 0,
        css_parent: 0,
        cgroup_kn: 0,
        kn_id: 0,
        memory_usage: 0,
        memory_max: 0,
        memsw_usage: FIELD_ABSENT,
        memsw_max: FIELD_ABSENT,
        task_active_memcg: FIELD_ABSENT,
    };
}

impl Default for MemcgOffsets {
    fn default() -> Self {
        Self::UNSET
    }
}

/// No margin was read for a level.
pub const MARGIN_UNKNOWN: u64 = u64::MAX;

/// `oom:mark_victim` fired: a victim was chosen and killed; the current task is the trigger.
pub const EV_VICTIM: u32 = 1;
/// `oom_kill_process` entered (kprobe): the trigger with its user stack, before the victim.
pub const EV_TRIGGER: u32 = 2;

/// Memory figures are in kB, as the tracepoint records them.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
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
    /// Return addresses in `kstack` (EV_VICTIM): the trigger's kernel stack at the kill.
    pub kstack_len: u32,
    pub _pad1: u32,
    pub timestamp_ns: u64,
    pub kstack: [u64; KSTACK_DEPTH],
    /// The trigger's memory cgroup chain at the kill, deepest first: kernfs ids (the groups'
    /// inode numbers), and the pages each group could still charge before its limit (the
    /// smaller of memory and memory+swap; MARGIN_UNKNOWN: not read).
    pub memcg_levels: u32,
    pub _pad2: u32,
    pub memcg_ids: [u64; MEMCG_LEVELS],
    pub memcg_margin: [u64; MEMCG_LEVELS],
}

impl Default for Event {
    fn default() -> Self {
        Event {
            kind: 0,
            trigger_pid: 0,
            trigger_tid: 0,
            victim_pid: 0,
            trigger_comm: [0; 16],
            victim_comm: [0; 16],
            total_vm_kb: 0,
            anon_rss_kb: 0,
            file_rss_kb: 0,
            shmem_rss_kb: 0,
            pgtables_kb: 0,
            uid: 0,
            oom_score_adj: 0,
            stack_id: 0,
            kstack_len: 0,
            _pad1: 0,
            timestamp_ns: 0,
            kstack: [0; KSTACK_DEPTH],
            memcg_levels: 0,
            _pad2: 0,
            memcg_ids: [0; MEMCG_LEVELS],
            memcg_margin: [MARGIN_UNKNOWN; MEMCG_LEVELS],
        }
    }
}

user_pod!(VictimOffsets, MemcgOffsets, Event);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(VICTIM, MEMCG);
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn no_implicit_padding() {
        assert_eq!(size_of::<MemcgOffsets>(), 12 * 4);
        let fixed = 4 * 4 + 16 * 2 + 8 * 5 + 4 * 2 + 8 + 4 * 2 + 8;
        assert_eq!(size_of::<Event>(), fixed + 8 * KSTACK_DEPTH + 8 + 8 * MEMCG_LEVELS + 8 * MEMCG_LEVELS);
    }
}
