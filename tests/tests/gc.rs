//! `redirect gc`: the instances of deleted pods are removed (their pins, and
//! the inbound link on a network namespace that outlives the pod), those of
//! live pods are left alone.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use redirect_sandbox::{
    APP, Group, Net, POD_IP, Sandbox,
    cli::{Outcome, redirect},
    require_root,
};

/// Uninstalls an instance when dropped, also when the test fails.
struct Instance(String);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = redirect(&["uninstall", "--instance", &self.0]);
    }
}

/// A cgroup of the test's own, removed when dropped (if still there).
struct OwnCgroup(std::path::PathBuf);

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn pinned(instance: &str) -> bool {
    Path::new(redirect_sandbox::PIN_ROOT)
        .join(instance)
        .exists()
}

#[test]
fn gc_removes_the_instances_of_deleted_pods_only() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .serve(
            Net::Pod,
            Group::App,
            APP,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9080),
            "app",
        )
        .expect("app");
    let app = SocketAddrV4::new(POD_IP, 9080);

    // A pod that will be deleted: its own cgroup (beside the live pod's:
    // captures never nest), inbound capture on the (surviving) network
    // namespace, and no proxy listening.
    let doomed = OwnCgroup(
        sandbox
            .pod_cgroup()
            .with_file_name(format!("{}-gone", sandbox.name())),
    );
    fs::create_dir(&doomed.0).expect("pod cgroup");
    let instance = Instance(format!("{}-gone", sandbox.name()));
    let netns = sandbox.netns_path(Net::Pod);
    let out = redirect(&[
        "install",
        "--cgroup",
        &doomed.0.to_string_lossy(),
        "--instance",
        &instance.0,
        "--netns",
        &netns,
        "-b",
        "*",
    ])
    .expect("install");
    assert!(out.ok(), "{out:?}");
    // A live pod's instance, which gc must keep.
    sandbox.install(&[]).expect("install the live instance");
    assert_eq!(
        sandbox.lands_from_peer(app).expect("connect"),
        "error: connection refused",
        "inbound capture without a listener refuses"
    );

    fs::remove_dir(&doomed.0).expect("delete the pod's cgroup");
    // The kernel releases a deleted cgroup's programs asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed: Outcome = loop {
        let out = redirect(&["gc", "--dry-run"]).expect("gc --dry-run");
        if out.stdout.contains(&instance.0) || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        listed.stdout.contains(&format!(
            "would remove instance {}: its cgroup was removed",
            instance.0
        )),
        "{listed:?}"
    );
    assert!(
        !listed
            .stdout
            .contains(&format!("instance {}:", sandbox.name())),
        "the live pod's instance is not listed: {listed:?}"
    );
    assert!(pinned(&instance.0), "--dry-run removes nothing");

    let out = redirect(&["gc"]).expect("gc");
    assert!(out.ok(), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("removed instance {}", instance.0)),
        "{out:?}"
    );
    assert!(!pinned(&instance.0), "the deleted pod's pins are gone");
    assert!(sandbox.is_pinned(), "the live pod's instance stays");
    assert!(
        !out.stdout
            .contains(&format!("instance {}:", sandbox.name())),
        "{out:?}"
    );
    assert_eq!(
        sandbox.lands_from_peer(app).expect("connect"),
        "app",
        "the inbound link on the surviving namespace was detached"
    );
    sandbox.uninstall().expect("uninstall");
}
