//! Who a command memtrace runs (`-c`) runs as. memtrace needs root for its probes, but the
//! program under test is the user's: under `sudo` it runs as the user who typed the command
//! (`SUDO_UID`, `SUDO_GID`), as heaptrack and Valgrind run a program as whoever started them,
//! so its files, its `$HOME` and its permissions are that user's. `--user` names anyone else;
//! `--user root` keeps root.

use std::ffi::{CStr, CString};

use anyhow::{Result, bail};

/// A user other than root, resolved (in memtrace's process: the user database may take NSS,
/// which a forked child must not call) before the command is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The login name; None for a uid sudo named that the user database does not know.
    pub name: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// Every group the process gets: the primary one and the user's supplementary ones
    /// (`getgrouplist`, as `initgroups` sets them at login).
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

/// A user database entry.
struct Entry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

impl RunAs {
    /// Whom the command runs as: `--user` (a name or uid) if given, else the user sudo was
    /// called by when memtrace runs as root through sudo, else memtrace's own user. None: the
    /// command keeps memtrace's credentials (root with `--user root` or `--user 0`).
    pub fn choose(user: Option<&str>) -> Result<Option<RunAs>> {
        match user {
            Some(user) => Self::named(user),
            // SAFETY: geteuid has no preconditions.
            None if unsafe { libc::geteuid() } == 0 => Self::sudo_caller(),
            None => Ok(None),
        }
    }

    fn named(user: &str) -> Result<Option<RunAs>> {
        let entry = match lookup_name(user)? {
            Some(e) => e,
            None => match user.parse::<u32>() {
                Ok(uid) => match lookup_uid(uid)? {
                    Some(e) => e,
                    None => bail!("--user {user}: no user has uid {uid} (getent passwd {uid}): name an existing user"),
                },
                Err(_) => bail!("--user {user}: no such user (getent passwd {user}): name an existing user or uid"),
            },
        };
        if entry.uid == 0 {
            return Ok(None);
        }
        let gid = entry.gid;
        Ok(Some(RunAs::of(entry, gid)?))
    }

    /// The caller sudo recorded: its uid and (real) gid as sudo saw them, and the groups the
    /// user database gives that user.
    fn sudo_caller() -> Result<Option<RunAs>> {
        let Some(uid) = std::env::var_os("SUDO_UID") else { return Ok(None) };
        let number = |var: &str, value: &std::ffi::OsStr| -> Result<u32> {
            match value.to_str().and_then(|v| v.parse::<u32>().ok()) {
                Some(n) => Ok(n),
                None => bail!(
                    "{var}={} is not a uid or gid: unset it, or say whom to run the command as with --user NAME (--user root keeps root)",
                    value.to_string_lossy()
                ),
            }
        };
        let uid = number("SUDO_UID", &uid)?;
        let gid = std::env::var_os("SUDO_GID").map(|g| number("SUDO_GID", &g)).transpose()?;
        if uid == 0 {
            return Ok(None);
        }
        match (lookup_uid(uid)?, gid) {
            (Some(entry), gid) => {
                let gid = gid.unwrap_or(entry.gid);
                Ok(Some(RunAs::of(entry, gid)?))
            }
            (None, Some(gid)) => Ok(Some(RunAs { name: None, uid, gid, groups: vec![gid], home: None })),
            (None, None) => bail!(
                "SUDO_UID={uid} names no user and SUDO_GID is not set: say whom to run the command as with --user NAME (--user root keeps root)"
            ),
        }
    }

    fn of(entry: Entry, gid: u32) -> Result<RunAs> {
        let groups = group_list(&entry.name, gid)?;
        Ok(RunAs { groups, uid: entry.uid, gid, home: Some(entry.home), name: Some(entry.name) })
    }

    /// The variables a program reads to learn who runs it, set as `sudo -u USER` and a login
    /// set them. The rest of the environment is passed on as it is.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(name) = &self.name {
            env.push(("USER".into(), name.clone()));
            env.push(("LOGNAME".into(), name.clone()));
        }
        if let Some(home) = &self.home {
            env.push(("HOME".into(), home.clone()));
        }
        env
    }

    /// "alice (uid 1000, gid 1000)", for the line that says the command started.
    pub fn describe(&self) -> String {
        let name = self.name.clone().unwrap_or_else(|| format!("uid {}", self.uid));
        match &self.name {
            Some(_) => format!("{name} (uid {}, gid {})", self.uid, self.gid),
            None => format!("{name} (gid {})", self.gid),
        }
    }
}

/// getpwnam_r/getpwuid_r: the entry, None when there is none, an error when the database
/// cannot be read.
fn lookup(
    by: impl Fn(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> libc::c_int,
) -> Result<Option<Entry>> {
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: passwd is plain data the call fills in.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = by(&mut pwd, &mut buf, &mut found);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if found.is_null() {
            // 0, ENOENT, ESRCH, EBADF, EPERM: "not found" as POSIX lets each libc say it.
            if matches!(rc, 0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM) {
                return Ok(None);
            }
            bail!("cannot read the user database: {}", std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: on success the strings point into `buf`, NUL-terminated, alive here.
        let text = |p: *const libc::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        return Ok(Some(Entry { name: text(pwd.pw_name), uid: pwd.pw_uid, gid: pwd.pw_gid, home: text(pwd.pw_dir) }));
    }
}

fn lookup_name(name: &str) -> Result<Option<Entry>> {
    let Ok(cname) = CString::new(name) else { return Ok(None) };
    lookup(|pwd, buf, found| {
        // SAFETY: every pointer is live for the call; buf's length is passed with it.
        unsafe { libc::getpwnam_r(cname.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), found) }
    })
}

fn lookup_uid(uid: u32) -> Result<Option<Entry>> {
    lookup(|pwd, buf, found| {
        // SAFETY: as in lookup_name.
        unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), found) }
    })
}

/// The groups `initgroups(name, gid)` would set: `gid` and every group listing `name`.
fn group_list(name: &str, gid: u32) -> Result<Vec<u32>> {
    let cname = CString::new(name)?;
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `n` entries; the call writes at most that many and sets `n`.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return Ok(groups);
        }
        // Too small: `n` says how many there are.
        if n as usize <= groups.len() || groups.len() >= 1 << 16 {
            bail!("cannot list the groups of {name}");
        }
        groups.resize(n as usize, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_by_name_or_number_keeps_root() {
        assert_eq!(RunAs::named("root").unwrap(), None);
        assert_eq!(RunAs::named("0").unwrap(), None);
    }

    #[test]
    fn a_user_by_name_or_number_is_the_same() {
        let nobody = RunAs::named("nobody").unwrap().expect("nobody is not root");
        assert_eq!(nobody.uid, 65534);
        assert!(nobody.groups.contains(&nobody.gid), "{nobody:?}");
        assert_eq!(RunAs::named("65534").unwrap(), Some(nobody.clone()));
        let env = nobody.env();
        assert!(env.contains(&("USER".into(), "nobody".into())), "{env:?}");
        assert!(env.contains(&("LOGNAME".into(), "nobody".into())), "{env:?}");
        assert!(env.iter().any(|(k, _)| k == "HOME"), "{env:?}");
    }

    #[test]
    fn an_unknown_user_is_one_line_saying_what_to_do() {
        let e = RunAs::named("no-such-user-here").unwrap_err().to_string();
        assert_eq!(
            e,
            "--user no-such-user-here: no such user (getent passwd no-such-user-here): name an existing user or uid"
        );
        let e = RunAs::named("4000000000").unwrap_err().to_string();
        assert!(e.starts_with("--user 4000000000: no user has uid 4000000000"), "{e}");
    }
}
