//! What a tracer is, beyond its options, as `memtrace probe`, the run loop and the registry
//! test see it.

use crate::kernel::{AttachPoint, Object, Probe};

/// How a tracer (or one mode of it) attaches, as `memtrace probe` checks it.
pub enum Plan {
    /// Uprobes found per target at run time (memleak's allocator): only the feature is checked.
    Uprobes(&'static str),
    /// Attach points in order of preference: the first that resolves is used.
    Points(&'static [AttachPoint]),
    /// Uprobes running `prog` on the USDT probes `provider:prefix*` of the system's libc: a
    /// row says when that libc was built without them.
    Usdt {
        label: &'static str,
        #[cfg_attr(not(test), expect(dead_code, reason = "the registry test holds it against the object"))]
        prog: &'static str,
        provider: &'static str,
        prefix: &'static str,
    },
    /// Each tracepoint optional (a missing one leaves its column at 0), at least one needed:
    /// (label, category, [(program, names newest first)]).
    AnyOf(&'static str, &'static str, &'static [(&'static str, &'static [&'static str])]),
}

/// What a tracer is, beyond its options: the eBPF object it loads and how it attaches.
pub struct ToolSpec {
    /// The subcommand; also the eBPF object's name and the memtrace-common module's.
    pub name: &'static str,
    pub object: Object,
    /// (row name in `memtrace probe`, plan): one per mode that attaches differently.
    pub modes: &'static [(&'static str, Plan)],
    /// Probes used when present or asked for (optional columns, `--memcg`, `--kernel`).
    pub optional: &'static [Probe],
    /// The maps and globals of the object user space finds by name (its common module's
    /// `names::ALL`), beside those of `memtrace_common::names` that shared code finds.
    #[cfg_attr(not(test), expect(dead_code, reason = "held against the object by the registry test"))]
    pub names: &'static [&'static str],
}

impl ToolSpec {
    /// Every program the spec names, for checking against the object.
    #[cfg(test)]
    pub fn programs(&self) -> Vec<&'static str> {
        let prog = |p: &Probe| match *p {
            Probe::Kprobe { prog, .. } | Probe::Tracepoint { prog, .. } => prog,
        };
        let mut all: Vec<&str> = self.optional.iter().map(prog).collect();
        for (_, plan) in self.modes {
            match plan {
                Plan::Uprobes(_) => {}
                Plan::Usdt { prog, .. } => all.push(prog),
                Plan::Points(points) => all.extend(points.iter().flat_map(|p| p.probes).map(prog)),
                Plan::AnyOf(_, _, list) => all.extend(list.iter().map(|(prog, _)| *prog)),
            }
        }
        all
    }
}
