//! The README's two-node kv deployment (`examples/kv-cluster/`) in a [`Cluster`]'s lab: its
//! files with the hosts' addresses and paths replaced by the lab's and the test's scratch
//! directories, so that the kv tests run exactly what the README shows. It only edits the text
//! it read and starts the nodes; it never writes to the repository's files, and an edit whose
//! text is no longer in a file fails the test rather than leave a host's path behind.

use crate::cluster::{Cluster, NAMES};
use crate::{Watchd, binary, q, repo_root};

/// The README's virtual address.
pub const README_VIP: &str = "10.0.0.100";
/// The README's host addresses, by node index.
pub const README_ADDRS: [&str; 2] = ["10.0.0.1", "10.0.0.2"];
/// The README's preferred owners line of the group.
pub const README_OWNERS: &str = r#"preferred_owners = ["a", "b"]"#;
/// The README's cluster secret.
pub const README_SECRET: &str = "/etc/ftkit/secret";
/// The README's quorum disk.
pub const README_DISK: &str = "/dev/disk/by-id/kv-quorum";
/// The README's kv binary.
pub const README_KV: &str = "/usr/local/bin/kv";
/// The README's data directory.
pub const README_DATA_DIR: &str = "/var/lib/ftkit";
/// The node files, by node index.
pub const README_NODE_FILES: [&str; 2] = ["a.toml", "b.toml"];

/// A file of `examples/kv-cluster/`.
pub fn readme_file(name: &str) -> String {
    let path = repo_root().join("examples/kv-cluster").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with `from` replaced by `to`, which must occur in it (so an edit of the README's
/// files cannot silently leave a host's path in a test).
pub fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in:\n{text}");
    text.replace(from, to)
}

/// The README's group file (`kv-group.toml`) for the lab: its virtual address `vip`, and these
/// preferred owners.
pub fn group(vip: &str, owners: &[&str]) -> String {
    let owners = owners
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = replaced(
        &readme_file("kv-group.toml"),
        README_OWNERS,
        &format!("preferred_owners = [{owners}]"),
    );
    replaced(&text, README_VIP, vip)
}

/// Starts the two nodes of `c` (made with two nodes and no quorum disk of its own), each on
/// its README file with the addresses, paths and virtual address `vip` of the lab, the rings in
/// the scratch directory, and then `edit` applied (the test's own change, on the lab's text).
/// `label` names the nodes' scratch directories.
pub fn start_nodes(c: &mut Cluster, label: &str, vip: &str, edit: impl Fn(&str) -> String) {
    let secret = c.shared.write("kv-secret", "kv readme secret 0123456789\n");
    // As the README has it (watchd warns about a secret others can read).
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the secret");
    let disk = c.shared.file("kv-quorum.disk");
    let rings = c.shared.file("rings");
    for (i, file) in README_NODE_FILES.into_iter().enumerate() {
        // The harness makes the data directory (and the control socket's place in it); the
        // README's file then runs as it is, on that data directory.
        let mut w = Watchd::start_node(
            Some(c.lab.netns(i)),
            &format!("{label}-{}", NAMES[i]),
            Some(NAMES[i]),
            "",
            "",
        );
        w.kill9();
        // The virtual address first: the README's first host address is a prefix of it.
        let mut text = replaced(&readme_file(file), README_VIP, vip);
        for (k, addr) in README_ADDRS.iter().enumerate() {
            text = replaced(&text, addr, &c.lab.addr(k).to_string());
        }
        text = replaced(&text, README_SECRET, &secret.display().to_string());
        text = replaced(&text, README_DISK, &disk.display().to_string());
        text = replaced(&text, README_KV, &binary("kv").display().to_string());
        text = replaced(&text, README_DATA_DIR, &w.data_dir().display().to_string());
        text = replaced(
            &text,
            "[watchd]\n",
            &format!("[watchd]\nring_dir = {}\n", q(&rings)),
        );
        w.write_config_raw(&edit(&text));
        w.restart();
        c.nodes[i] = Some(w);
    }
}

/// Waits until node `owner` streams every fileset of `filesets` to node `backup` with nothing
/// outstanding (its resync after a reboot is done): only then does `backup` hold every
/// acknowledged write. (The failover policy does not know how fresh a replica is: a node made
/// the owner before its resync ended would lack writes; see README, "Limits worth knowing".)
pub fn wait_in_sync(
    c: &Cluster,
    owner: usize,
    backup: usize,
    filesets: &[&str],
    timeout: std::time::Duration,
) {
    crate::wait_until(
        &format!("{} streams {filesets:?} to {}", NAMES[owner], NAMES[backup]),
        timeout,
        || {
            let reports = crate::json_lines(&c.node(owner).ftctl_ok(&["repl", "status", "--json"]));
            let streaming = |fileset: &str| {
                reports.iter().any(|f| {
                    f["name"] == fileset
                        && f["pump"]["backups"].as_array().is_some_and(|b| {
                            b.iter().any(|l| {
                                l["name"] == NAMES[backup]
                                    && l["state"] == "streaming"
                                    && l["lag_ops"] == 0
                            })
                        })
                })
            };
            filesets.iter().all(|f| streaming(f)).then_some(())
        },
    );
}
