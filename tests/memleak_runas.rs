//! memleak -c runs its command as the user who ran sudo (SUDO_UID, SUDO_GID), or as `--user`,
//! with that user's groups, HOME, USER and LOGNAME, and still records in the process: the
//! report is tests/progs/leaky's exact leaks. `--user root` keeps root; bad input is one line.

#[path = "common/mod.rs"]
mod common;

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

/// The unprivileged user the tests run commands as: made once on this machine if missing,
/// with a supplementary group so that the command's groups show initgroups at work.
const USER: &str = "memtrace-runas";
const EXTRA_GROUP: &str = "memtrace-runas-x";
const HOME: &str = "/home/memtrace-runas";

/// A user as the tests read it from /etc/passwd and /etc/group, apart from memtrace's lookup.
struct User {
    uid: u32,
    gid: u32,
    /// The primary group and each group that lists the user.
    groups: BTreeSet<u32>,
}

/// The fields of the line of `file` whose first field is `name`.
fn entry(file: &str, name: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().map(|l| l.split(':').map(String::from).collect::<Vec<_>>()).find(|f| f[0] == name)
}

fn read_user() -> Option<User> {
    let pw = entry("/etc/passwd", USER)?;
    let (uid, gid) = (pw[2].parse().unwrap(), pw[3].parse().unwrap());
    let text = std::fs::read_to_string("/etc/group").unwrap();
    let mut groups: BTreeSet<u32> = text
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() == 4 && f[3].split(',').any(|m| m == USER))
        .map(|f| f[2].parse().unwrap())
        .collect();
    groups.insert(gid);
    Some(User { uid, gid, groups })
}

/// The test user, made with groupadd and useradd when missing (and the tools are there); None
/// when it cannot be had (listed as not run).
fn test_user(test: &str) -> Option<User> {
    if read_user().is_none_or(|u| u.groups.len() < 2) {
        let ran = |program: &str, args: &[&str]| Command::new(program).args(args).status().is_ok_and(|s| s.success());
        if entry("/etc/group", EXTRA_GROUP).is_none() && !ran("groupadd", &["--system", EXTRA_GROUP]) {
            not_run(test, "no groupadd to make the test user's group");
            return None;
        }
        let args = [
            "--system",
            "--no-create-home",
            "--home-dir",
            HOME,
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            "--groups",
            EXTRA_GROUP,
            USER,
        ];
        if read_user().is_none() && !ran("useradd", &args) {
            not_run(test, "no useradd to make the test user");
            return None;
        }
    }
    let user = read_user().expect("the test user exists");
    assert!(user.uid != 0 && user.groups.len() >= 2, "{USER} must be unprivileged with a supplementary group");
    Some(user)
}

/// A folder the test user can read, holding a shell script that prints who runs it (with shell
/// builtins only: no child process) and then execs tests/progs/leaky in its place.
fn script() -> PathBuf {
    let dir = tempdir("memleak_runas");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for folder in dir.ancestors().chain(prog("leaky").ancestors().skip(1)) {
        let mode = std::fs::metadata(folder).unwrap().permissions().mode();
        assert!(mode & 0o001 != 0, "{} is closed to others: the test user cannot run leaky", folder.display());
    }
    let path = dir.join("whoami.sh");
    std::fs::write(
        &path,
        "while IFS= read -r l; do case $l in Uid:*|Gid:*|Groups:*) echo \"$l\";; esac; done </proc/$$/status\n\
         echo \"HOME=$HOME USER=$USER LOGNAME=$LOGNAME\"\n\
         exec \"$1\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// What the command printed about itself, and memtrace's report.
struct Ran {
    /// Uid, Gid and Groups lines of /proc/PID/status, each as its numbers.
    ids: Vec<(String, Vec<u32>)>,
    /// The HOME=... USER=... LOGNAME=... line.
    env: String,
    stderr: String,
    report: serde_json::Value,
}

/// memtrace memleak -c running the script with `args` before `-c` and `env` set.
fn run_script(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let (script, leaky) = (script(), prog("leaky"));
    let cmd = format!("sh {} {}", script.display(), leaky.display());
    let mut memtrace = common::memtrace();
    memtrace.arg("memleak").args(args).args(["--json", "-T", "100", "-c", &cmd]);
    memtrace.envs(env.iter().copied()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = wait_output(memtrace.spawn().unwrap(), Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "{args:?} {env:?}: {}: {stderr}", out.status);
    let ids = stdout
        .lines()
        .filter_map(|l| l.split_once(':').filter(|(k, _)| ["Uid", "Gid", "Groups"].contains(k)))
        .map(|(k, v)| (k.to_string(), v.split_whitespace().map(|n| n.parse().unwrap()).collect()))
        .collect();
    let env = stdout.lines().find(|l| l.starts_with("HOME=")).unwrap_or_else(|| panic!("{stdout}")).to_string();
    let report = final_report(&stdout);
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    assert_detached("memleak");
    Ran { ids, env, stderr, report }
}

impl Ran {
    fn ids(&self, key: &str) -> Vec<u32> {
        self.ids.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key}: {:?}", self.ids)).1.clone()
    }

    /// Real, effective, saved and file-system uid and gid are the user's, with exactly its
    /// groups; the environment names it; leaky was recorded in the process.
    fn assert_ran_as(&self, user: &User, how: &str) {
        assert_eq!(self.ids("Uid"), [user.uid; 4], "{how}");
        assert_eq!(self.ids("Gid"), [user.gid; 4], "{how}");
        assert_eq!(self.ids("Groups").into_iter().collect::<BTreeSet<_>>(), user.groups, "{how}");
        assert_eq!(self.env, format!("HOME={HOME} USER={USER} LOGNAME={USER}"), "{how}");
        let pid = &self.report["pid"];
        let said = format!("(pid {pid}) as {USER} (uid {}, gid {}) and following its processes", user.uid, user.gid);
        assert!(self.stderr.contains(&said), "{how}: {}", self.stderr);
        self.assert_recorded_in_process(how);
    }

    /// The preloaded recorder, not the uprobe fallback, recorded leaky.
    fn assert_recorded_in_process(&self, how: &str) {
        let pid = &self.report["pid"];
        let said = format!("pid {pid} (leaky) recorded in the process");
        assert!(self.stderr.contains(&said), "{how}: {}", self.stderr);
        assert!(!self.stderr.contains("probed through"), "{how}: {}", self.stderr);
    }
}

#[test]
fn memleak_command_runs_as_the_user_who_ran_sudo() {
    if !bpf_available("memleak_command_runs_as_the_user_who_ran_sudo") {
        return;
    }
    let Some(user) = test_user("memleak_command_runs_as_the_user_who_ran_sudo") else { return };
    // A root umask of 077 leaves the recorder's folder unreadable to anyone else: memtrace
    // opens it up again, or the user's process could not load the recorder.
    let run_dir = Path::new("/run/memtrace");
    std::fs::create_dir_all(run_dir).unwrap();
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
    let ran = run_script(&[], &[("SUDO_UID", &uid), ("SUDO_GID", &gid), ("SUDO_USER", USER)]);
    ran.assert_ran_as(&user, "SUDO_UID");
    assert_eq!(std::fs::metadata(run_dir).unwrap().permissions().mode() & 0o777, 0o755);
}

#[test]
fn memleak_command_runs_as_the_user_named() {
    if !bpf_available("memleak_command_runs_as_the_user_named") {
        return;
    }
    let Some(user) = test_user("memleak_command_runs_as_the_user_named") else { return };
    let uid = user.uid.to_string();
    for name in [USER, uid.as_str()] {
        run_script(&["--user", name], &[]).assert_ran_as(&user, name);
    }
    // --user wins over sudo's caller.
    let ran = run_script(&["--user", USER], &[("SUDO_UID", "65534"), ("SUDO_GID", "65534")]);
    ran.assert_ran_as(&user, "--user under sudo");
}

/// `--user root` (or 0) keeps root under sudo; without sudo or --user, root stays root.
#[test]
fn memleak_command_keeps_root_when_asked() {
    if !bpf_available("memleak_command_keeps_root_when_asked") {
        return;
    }
    let Some(user) = test_user("memleak_command_keeps_root_when_asked") else { return };
    let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
    let sudo = [("SUDO_UID", uid.as_str()), ("SUDO_GID", gid.as_str())];
    for (args, env) in [(&["--user", "root"][..], &sudo[..]), (&["--user", "0"], &sudo), (&[], &[])] {
        let ran = run_script(args, env);
        let how = format!("{args:?} {env:?}");
        assert_eq!(ran.ids("Uid"), [0; 4], "{how}");
        assert_eq!(ran.ids("Gid"), [0; 4], "{how}");
        assert!(!ran.stderr.contains(" as "), "{how}: {}", ran.stderr);
        ran.assert_recorded_in_process(&how);
    }
}

#[test]
fn memleak_user_bad_input_is_refused_before_attach() {
    if !bpf_available("memleak_user_bad_input_is_refused_before_attach") {
        return;
    }
    assert_exact_error(
        &["memleak", "--user", "nosuchuser", "-c", "true"],
        "--user nosuchuser: no such user (getent passwd nosuchuser): name an existing user or uid",
    );
    assert_exact_error(
        &["memleak", "--user", "4000000000", "-c", "true"],
        "--user 4000000000: no user has uid 4000000000 (getent passwd 4000000000): name an existing user",
    );
    let me = std::process::id().to_string();
    for args in [&["memleak", "--user", "root"][..], &["memleak", "--user", "root", "-p", &me]] {
        assert_exact_error(
            args,
            "--user names whom a command runs as: it goes with -c (memtrace memleak --user NAME -c CMD)",
        );
    }
    let out = common::memtrace()
        .args(["memleak", "-c", "true"])
        .env("SUDO_UID", "alice")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(out, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "memtrace: error: SUDO_UID=alice is not a uid or gid: unset it, or say whom to run the command as with --user NAME (--user root keeps root)\n"
    );
    assert_detached("memleak");
}
