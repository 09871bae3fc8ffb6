//! Container ids in memory cgroup paths, as the runtimes name their groups:
//! - docker with cgroupfs: `/docker/<id>`; with systemd: `/system.slice/docker-<id>.scope`;
//! - containerd (CRI): `cri-containerd-<id>.scope`; CRI-O: `crio-<id>.scope`;
//!   podman: `libpod-<id>.scope` (their `-conmon-` groups hold the monitor, no container);
//! - kubelet with cgroupfs: `/kubepods/<qos>/pod<uid>/<id>`; with systemd:
//!   `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/...`.
//!
//! The deepest container in the path wins (docker in docker; a container's own subgroups).
//! A group of systemd's that is no container is named by its unit instead.

use serde::Serialize;

#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The full id (64 hex digits).
    pub id: String,
    /// "docker", "containerd", "cri-o", "podman", or "kubepods" for a bare id under kubepods
    /// (any CRI runtime with cgroupfs), "cgroupfs" for a bare id elsewhere.
    pub runtime: &'static str,
    /// The Kubernetes pod uid (with dashes), under kubepods.
    pub pod: Option<String>,
}

/// The container a memory cgroup path names, if it follows one of the conventions above.
pub fn container_id(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let kubepods = parts.iter().any(|p| *p == "kubepods" || p.starts_with("kubepods-") || *p == "kubepods.slice");
    let (at, id, runtime) = parts.iter().enumerate().rev().find_map(|(i, part)| {
        if let Some(scope) = part.strip_suffix(".scope") {
            const SCOPES: [(&str, &str); 4] =
                [("docker-", "docker"), ("cri-containerd-", "containerd"), ("crio-", "cri-o"), ("libpod-", "podman")];
            return SCOPES.iter().find_map(|(prefix, runtime)| {
                scope.strip_prefix(prefix).filter(|id| is_id(id)).map(|id| (i, id, *runtime))
            });
        }
        if !is_id(part) {
            return None;
        }
        let runtime = match (i.checked_sub(1).map(|p| parts[p]), kubepods) {
            (Some("docker"), _) => "docker",
            (_, true) => "kubepods",
            _ => "cgroupfs",
        };
        Some((i, *part, runtime))
    })?;
    let pod = parts[..at].iter().rev().find_map(|p| pod_uid(p));
    Some(Container { id: id.to_string(), runtime, pod: if kubepods { pod } else { None } })
}

/// The systemd unit (service or scope) that the deepest unit-named group belongs to.
pub fn systemd_unit(path: &str) -> Option<String> {
    path.split('/').rev().find(|p| p.ends_with(".service") || p.ends_with(".scope")).map(str::to_string)
}

/// A 64-hex-digit id, as docker, containerd, CRI-O and podman make them.
fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The pod uid of a kubelet group: `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid>.slice`
/// (systemd, which spells the uid's dashes as underscores).
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1,
        None => part.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    let ok = (32..=36).contains(&uid.len()) && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ID2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const UID: &str = "8f0a0b9c-3c1e-4a8d-9f57-2f3b1c0d9e11";

    fn found(path: &str) -> Option<(String, &'static str, Option<String>)> {
        container_id(path).map(|c| (c.id, c.runtime, c.pod))
    }

    #[test]
    fn docker_on_either_driver() {
        assert_eq!(found(&format!("/docker/{ID}")), Some((ID.into(), "docker", None)));
        assert_eq!(found(&format!("/system.slice/docker-{ID}.scope")), Some((ID.into(), "docker", None)));
        // Docker in docker: the inner container is the one the task runs in.
        assert_eq!(found(&format!("/docker/{ID}/docker/{ID2}")), Some((ID2.into(), "docker", None)));
        // A container's own subgroups still belong to it.
        assert_eq!(found(&format!("/docker/{ID}/system.slice/nginx.service")), Some((ID.into(), "docker", None)));
    }

    #[test]
    fn cri_runtimes_and_podman() {
        assert_eq!(found(&format!("/system.slice/cri-containerd-{ID}.scope")).unwrap().1, "containerd");
        assert_eq!(found(&format!("/machine.slice/libpod-{ID}.scope")).unwrap().1, "podman");
        assert_eq!(found(&format!("/machine.slice/libpod-conmon-{ID}.scope")), None);
        assert_eq!(found(&format!("/crio-{ID}.scope")).unwrap().1, "cri-o");
        assert_eq!(found(&format!("/crio-conmon-{ID}.scope")), None);
    }

    #[test]
    fn kubepods_with_pod_uids() {
        let systemd_uid = UID.replace('-', "_");
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(found(&systemd), Some((ID.into(), "containerd", Some(UID.into()))));
        let guaranteed = format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/crio-{ID}.scope");
        assert_eq!(found(&guaranteed), Some((ID.into(), "cri-o", Some(UID.into()))));
        let cgroupfs = format!("/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(found(&cgroupfs), Some((ID.into(), "kubepods", Some(UID.into()))));
        // The pod's own group holds no container.
        assert_eq!(found(&format!("/kubepods/besteffort/pod{UID}")), None);
    }

    #[test]
    fn other_groups_name_no_container() {
        for path in ["/", "/system.slice/cron.service", "/user.slice/user-0.slice/session-3.scope", "/docker"] {
            assert_eq!(found(path), None, "{path}");
        }
        // Not quite ids: upper case, one digit short, a docker scope of something else.
        assert_eq!(found(&format!("/docker/{}", ID.to_uppercase())), None);
        assert_eq!(found(&format!("/docker/{}", &ID[1..])), None);
        assert_eq!(found("/system.slice/docker-compose.scope"), None);
        assert_eq!(found(&format!("/somewhere/{ID}")).unwrap().1, "cgroupfs");
    }

    #[test]
    fn units_of_systemd() {
        assert_eq!(systemd_unit("/system.slice/cron.service").as_deref(), Some("cron.service"));
        assert_eq!(systemd_unit("/user.slice/user-0.slice/session-3.scope").as_deref(), Some("session-3.scope"));
        assert_eq!(systemd_unit("/a/b"), None);
    }

    proptest::proptest! {
        // Whatever the path, the parser answers without panicking, and an id it finds is one
        // of the path's own 64-hex-digit runs.
        #[test]
        fn never_panics(path in "(/[a-z0-9._-]{0,70}){0,6}") {
            if let Some(c) = container_id(&path) {
                proptest::prop_assert!(is_id(&c.id) && path.contains(&c.id));
            }
        }
    }
}
