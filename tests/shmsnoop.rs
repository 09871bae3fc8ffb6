//! shmsnoop against the real kernel: the exact calls of tests/progs/shmsnoop_shm.c (key, size,
//! decoded flags and commands, errno names, the shmid and address shared between calls),
//! --failed in a table, bad input, --duration, and clean detach.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn shmsnoop_reports_each_call_exactly() {
    if !bpf_available("shmsnoop_reports_each_call_exactly") {
        return;
    }
    let SnoopRun { pid, got, events, last, stdout } = snoop_one_act("shmsnoop", "shmsnoop_shm", 5);
    assert_eq!(last, json!({ "final": true, "events": 5, "events_lost": 0 }));

    let key = &got["key"];
    let id: i64 = got["id"].parse().unwrap();
    let addr = unhex(&got["addr"]);
    let calls: Vec<&str> = events.iter().map(|e| e["call"].as_str().unwrap()).collect();
    assert_eq!(calls, ["shmget", "shmget", "shmat", "shmdt", "shmctl"], "{stdout}");
    for e in &events {
        assert_fields(e, &json!({ "pid": pid, "tid": pid, "comm": "shmsnoop_shm" }));
    }
    assert_fields(
        &events[0],
        &json!({
            "key": unhex(key), "key_str": key, "size": 3 * 4096,
            "shmflg": hx(0o1600), "shmflg_str": "IPC_CREAT|0600",
            "ret": id, "shmid": id, "error": null,
        }),
    );
    assert_fields(
        &events[1],
        &json!({
            "key_str": key, "size": 3 * 4096, "shmflg": hx(0o3600), "shmflg_str": "IPC_CREAT|IPC_EXCL|0600",
            "ret": -17, "error": "EEXIST", "shmid": null,
        }),
    );
    assert_fields(
        &events[2],
        &json!({
            "shmid": id, "shmaddr": "0x0", "shmflg": hx(0o10000), "shmflg_str": "SHM_RDONLY",
            "ret": addr, "addr": hx(addr), "error": null,
        }),
    );
    // shmdt takes what shmat returned.
    assert_fields(&events[3], &json!({ "shmaddr": hx(addr), "ret": 0, "error": null }));
    assert_fields(
        &events[4],
        &json!({ "shmid": id, "cmd": 0, "cmd_str": "IPC_RMID", "buf": "0x0", "ret": 0, "error": null }),
    );
    assert_detached("shmsnoop");
}

/// --comm and --failed together: only the EEXIST of the test program, decoded in the table.
#[test]
fn shmsnoop_failed_only_in_a_table() {
    if !bpf_available("shmsnoop_failed_only_in_a_table") {
        return;
    }
    let mut shm = Gated::start("shmsnoop_shm");
    let pid = shm.pid();
    let mut mt = Running::start(&["shmsnoop", "--failed", "--timestamp", "--comm", "shmsnoop_shm"]);
    mt.wait_ready();
    let got = shm.act();
    mt.wait_lines("", 2);
    shm.end();
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one failed call expected:\n{stdout}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["TIME(s)", "TIME", "PID", "COMM", "SYSCALL", "RET", "CGROUP", "ARGS"]);
    let cols: Vec<&str> = lines[1].split_whitespace().take(6).collect();
    assert!(cols[0].parse::<f64>().is_ok_and(|s| s > 0.0) && cols[1].len() == 8, "{}", lines[1]);
    assert_eq!(cols[2..], [&pid.to_string(), "shmsnoop_shm", "shmget", "EEXIST"], "{}", lines[1]);
    let args = format!("key: {}, size: 12288, shmflg: IPC_CREAT|IPC_EXCL|0600", got["key"]);
    assert!(lines[1].ends_with(&format!(" {args}")), "{}", lines[1]);
    assert_detached("shmsnoop");
}

#[test]
fn shmsnoop_rejects_bad_input() {
    for (args, want) in [
        (&["shmsnoop", "-p", "999999999"][..], "no such process: 999999999"),
        (&["shmsnoop", "--comm", "a_name_too_long_for_comm"][..], "--comm takes 1 to 15 bytes"),
        (&["shmsnoop", "--comm", ""][..], "--comm takes 1 to 15 bytes"),
    ] {
        assert_one_line_error(args, want);
    }
}

/// Eight programs live while it runs; --duration ends it with the final object and nothing
/// left attached.
#[test]
fn shmsnoop_detaches_cleanly() {
    if !bpf_available("shmsnoop_detaches_cleanly") {
        return;
    }
    let mut mt = Running::start(&["shmsnoop", "--json", "-d", "2", "--comm", "no_such_comm"]);
    mt.wait_ready();
    let live = loaded_program_names().into_iter().filter(|n| n.starts_with("shmsnoop_")).count();
    assert_eq!(live, 8, "{:?}", loaded_program_names());
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, last) = events_and_final(&stdout);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(last, json!({ "final": true, "events": 0, "events_lost": 0 }));
    assert_detached("shmsnoop");
}

/// -vv logs go to stderr; into a pipe they carry no colour codes.
#[test]
fn shmsnoop_verbose_logs_have_no_colour_in_a_pipe() {
    if !bpf_available("shmsnoop_verbose_logs_have_no_colour_in_a_pipe") {
        return;
    }
    let out = run(&["-vv", "shmsnoop", "-d", "1", "--comm", "no_such_comm"], Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("shmsnoop: using tracepoints"), "-vv logs the attach method: {stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes in a pipe: {stderr:?}");
}

/// `shmsnoop | head -1`: once the reader has its line and is gone, memtrace must notice the
/// closed pipe by itself (no further event will come to fail a write) and exit 0 at once,
/// leaving nothing attached. The traced program stays alive and quiet meanwhile.
#[test]
fn shmsnoop_exits_when_the_reader_of_stdout_is_gone() {
    if !bpf_available("shmsnoop_exits_when_the_reader_of_stdout_is_gone") {
        return;
    }
    let mut shm = Gated::start("shmsnoop_shm");
    let pid = shm.pid().to_string();
    let (mut mt, stdout) = Running::start_unread(&["shmsnoop", "--json", "-p", &pid]);
    mt.wait_ready();
    let mut stdout = std::io::BufReader::new(stdout);
    shm.act();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(first.contains("\"call\":\"shmget\""), "{first}");
    // The other four events are written into the pipe before the reader leaves, so that no
    // write can fail after it: only watching the pipe ends the run.
    std::thread::sleep(Duration::from_millis(500));
    drop(stdout);
    let closed = std::time::Instant::now();
    let status = loop {
        if let Some(status) = mt.child.try_wait().unwrap() {
            break status;
        }
        if closed.elapsed() > Duration::from_secs(2) {
            let _ = mt.child.kill();
            panic!("memtrace still running 2 s after its reader left");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{status}: {:?}", mt.stderr);
    assert_detached("shmsnoop");
    shm.end();
}
