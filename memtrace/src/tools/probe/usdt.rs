//! `memtrace probe --usdt FILE`: a file's USDT probes with their semaphores and arguments, as
//! `bpftrace -l 'usdt:FILE:*'` lists them; with `--trace PROBE -p PID`, each hit of those probes
//! in that process with its arguments decoded, which shows that a probe fires and reads right.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Result, bail};
use aya::maps::HashMap;
use memtrace_common::{
    Filter, names,
    names::USDT_SPECS as SPECS,
    usdt::{Hit, STRING_ARGS, Spec},
};

use crate::{
    kernel::{
        self,
        usdt::{self, UsdtProbe},
    },
    output, target,
    tools::{
        Ctx, Stream, read_event,
        registry::{Plan, ToolSpec},
        tracer::{Run, Tracer},
    },
};

/// The tracer of `--trace`: not a subcommand of its own, so not in the registry.
pub static SPEC: ToolSpec = ToolSpec {
    name: "usdtprobe",
    object: crate::ebpf_object!("usdtprobe"),
    modes: &[(
        "probe --usdt --trace",
        Plan::Usdt { label: "uprobes on a file's USDT probes", prog: PROG, provider: "", prefix: "" },
    )],
    optional: &[],
    names: &[],
};

/// The program attached to every traced probe.
const PROG: &str = "usdtprobe_hit";

/// The probes of `file`, or the one line saying it has none.
pub fn list(file: &Path, json: bool) -> Result<()> {
    let probes = usdt::probes(file)?;
    if json {
        let rows: Vec<serde_json::Value> = probes.iter().map(|p| row_json(file, p)).collect();
        return output::json_line(&serde_json::json!({ "file": file, "probes": rows }));
    }
    if probes.is_empty() {
        return output::line(&no_probes(file));
    }
    output::line(&format!("{:<40} {:>10} {:>10}  ARGUMENTS", "PROBE", "ADDRESS", "SEMAPHORE"))?;
    for p in &probes {
        let semaphore = if p.semaphore == 0 { "-".to_string() } else { format!("{:#x}", p.semaphore) };
        let args = match &p.args {
            Ok(args) => {
                let each: Vec<String> =
                    args.iter().enumerate().map(|(i, a)| format!("arg{i} {} {}", a.type_name(), a.text)).collect();
                if each.is_empty() { "none".to_string() } else { each.join(", ") }
            }
            Err(why) => format!("{} (unreadable: {why})", p.args_text),
        };
        output::line(&format!("{:<40} {:>10} {semaphore:>10}  {args}", p.full_name(), format!("{:#x}", p.address)))?;
    }
    Ok(())
}

/// What a file without `.note.stapsdt` is, in one line.
pub fn no_probes(file: &Path) -> String {
    format!("{} has no USDT probes (no .note.stapsdt section: it was built without <sys/sdt.h> probes)", file.display())
}

fn row_json(file: &Path, p: &UsdtProbe) -> serde_json::Value {
    let args = match &p.args {
        Ok(args) => serde_json::json!(
            args.iter().map(|a| serde_json::json!({"spec": a.text, "type": a.type_name()})).collect::<Vec<_>>()
        ),
        Err(_) => serde_json::Value::Null,
    };
    serde_json::json!({
        "probe": format!("usdt:{}:{}", file.display(), p.full_name()),
        "provider": p.provider,
        "name": p.name,
        "address": format!("{:#x}", p.address),
        "file_offset": format!("{:#x}", p.file_offset),
        "semaphore": (p.semaphore != 0).then(|| format!("{:#x}", p.semaphore)),
        "semaphore_offset": (p.semaphore != 0).then(|| format!("{:#x}", p.semaphore_offset)),
        "args_spec": p.args_text,
        "args": args,
        "args_error": p.args.as_ref().err(),
    })
}

/// Traces the probes named `wanted` (`provider:name` or `name`) of `file` in process `pid`.
pub async fn trace(file: &Path, wanted: &[String], pid: u32, duration: Option<u64>, json: bool) -> Result<()> {
    target::check_pid(pid)?;
    let all = usdt::probes(file)?;
    if all.is_empty() {
        bail!("{}", no_probes(file));
    }
    let mut chosen: Vec<UsdtProbe> = Vec::new();
    for w in wanted {
        let found: Vec<&UsdtProbe> = all.iter().filter(|p| p.full_name() == *w || p.name == *w).collect();
        if found.is_empty() {
            bail!(
                "{} has no USDT probe {w}: `memtrace probe --usdt {}` lists its probes",
                file.display(),
                file.display()
            );
        }
        chosen.extend(found.into_iter().cloned());
    }
    // Specs first: a probe whose arguments cannot be read is refused before anything attaches.
    let mut specs: Vec<(u64, Spec)> = Vec::new();
    for (id, p) in chosen.iter().enumerate() {
        specs.push((usdt::address_in(pid, file, p)?, p.spec(id as u32)?));
    }
    kernel::require_root()?;
    let filter = Filter { pid, ..Filter::ALL };
    let mut tracer = Tracer::load(&SPEC, |l| {
        l.override_global(names::FILTER, &filter, true);
    })?;
    {
        let mut map: HashMap<_, u64, Spec> = HashMap::try_from(
            tracer.bpf.map_mut(SPECS).ok_or_else(|| anyhow::anyhow!("internal: no map {SPECS} in usdtprobe"))?,
        )?;
        for (address, spec) in &specs {
            map.insert(address, spec, 0)?;
        }
    }
    for p in &chosen {
        usdt::attach(&mut tracer.bpf, PROG, file, p, Some(pid))?;
    }
    let mut hits = Hits { probes: chosen, counts: BTreeMap::new(), json };
    let ready = format!("tracing {} USDT probe(s) of {} in process {pid}", hits.probes.len(), file.display());
    let run = Run { duration, watch: Some(pid), ready_pid: Some(pid), tick: None, max_ticks: None, ready: &ready };
    tracer.run(run, &mut hits).await?;
    Ok(())
}

struct Hits {
    probes: Vec<UsdtProbe>,
    counts: BTreeMap<String, u64>,
    json: bool,
}

impl Stream for Hits {
    type Side = ();

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(hit) = read_event::<Hit>(data) else { return Ok(()) };
        let Some(probe) = self.probes.get(hit.id as usize) else { return Ok(()) };
        *self.counts.entry(probe.full_name()).or_default() += 1;
        let count = (hit.count as usize).min(hit.args.len());
        let strings: Vec<Option<String>> = (0..count).map(|i| string_arg(&hit, i)).collect();
        if self.json {
            return output::json_line(&serde_json::json!({
                "pid": hit.pid, "tid": hit.tid, "probe": probe.full_name(),
                "args": &hit.args[..count], "strings": strings,
            }));
        }
        let shown: Vec<String> = (0..count)
            .map(|i| match &strings[i] {
                Some(s) => format!("{s:?}"),
                None => hit.args[i].to_string(),
            })
            .collect();
        output::line(&format!("{:<8} {:<8} {:<32} {}", hit.pid, hit.tid, probe.full_name(), shown.join(" ")))
    }

    fn drain(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        while let Some(item) = ctx.ring.as_mut().and_then(|r| r.next()) {
            self.event(&item)?;
        }
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        let mut counts: BTreeMap<String, u64> = self.probes.iter().map(|p| (p.full_name(), 0)).collect();
        counts.extend(self.counts.iter().map(|(k, v)| (k.clone(), *v)));
        if self.json {
            return output::final_line(lost, serde_json::json!({ "hits": counts }));
        }
        for (name, n) in counts {
            output::line(&format!("{name}: {n} hit{}", if n == 1 { "" } else { "s" }))?;
        }
        Ok(())
    }
}

/// Argument `i` read as a string, when it is one: its bytes printable UTF-8.
fn string_arg(hit: &Hit, i: usize) -> Option<String> {
    if i >= STRING_ARGS || hit.string_len[i] < 2 {
        return None;
    }
    let len = (hit.string_len[i] as usize - 1).min(hit.strings[i].len());
    let text = std::str::from_utf8(&hit.strings[i][..len]).ok()?;
    text.chars().all(|c| !c.is_control()).then(|| text.to_string())
}

/// A tool's row on the USDT probes `provider:prefix*` of the system's libc: usable when that
/// libc has them, else the line saying it has none.
pub fn plan(tool: &'static str, label: &str, provider: &str, prefix: &str) -> super::ToolPlan {
    let mut plan = super::ToolPlan { tool, method: None, targets: Vec::new(), unusable: Vec::new(), degraded: None };
    let Some(libc) = target::system_libc() else {
        plan.unusable.push("no libc.so.6 found in the usual places".into());
        return plan;
    };
    match usdt::probes_named(&libc, provider, prefix) {
        Ok(found) if !found.is_empty() => {
            plan.method = Some(label.to_string());
            plan.targets = vec![format!("usdt:{}:{provider}:{prefix}* ({} probes)", libc.display(), found.len())];
        }
        Ok(_) => plan.unusable.push(usdt::missing(&libc, provider, prefix)),
        Err(e) => plan.unusable.push(format!("{e:#}")),
    }
    plan
}
