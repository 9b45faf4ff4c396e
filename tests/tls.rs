//! `raft.tls-enabled yes`: the bus over TLS 1.3 with certificates from Redis's own tls-*
//! settings. Each test makes its own CA and node certificates (rcgen) in its temp dir; the
//! harness keeps talking to the nodes on their plain `port`, and each node also has a
//! `tls-port` (Redis's own TLS, which the module's certificates come from).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// A CA written as `<name>-ca.crt` in `dir`, that signs node certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    name: String,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.crt")), cert.pem()).unwrap();
        Ca {
            cert,
            key,
            name: name.into(),
        }
    }

    /// Redis's TLS arguments for a node whose certificate this CA signs (expired if asked),
    /// trusting this CA, with `raft.tls-enabled yes`.
    fn node_args(&self, dir: &Path, node: &str, expired: bool) -> Vec<String> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let crt = dir.join(format!("{}-{node}.crt", self.name));
        let key_file = dir.join(format!("{}-{node}.key", self.name));
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let ca = dir.join(format!("{}-ca.crt", self.name));
        [
            "--tls-port",
            &free_port().to_string(),
            "--tls-cert-file",
            &crt.display().to_string(),
            "--tls-key-file",
            &key_file.display().to_string(),
            "--tls-ca-cert-file",
            &ca.display().to_string(),
            "--tls-auth-clients",
            "optional",
            "--raft.tls-enabled",
            "yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// `n` nodes defined, the first `tls` of them with certificates from `ca` (not started).
fn tls_cluster(n: usize, tls: usize) -> (Cluster, Ca) {
    let mut c = Cluster::define(n);
    let dir = c.tmp.path().to_path_buf();
    let ca = Ca::new(&dir, "cluster");
    for i in 0..tls {
        let name = c.nodes[i].def.name.clone();
        c.nodes[i].extra = ca.node_args(&dir, &name, false);
    }
    (c, ca)
}

fn set(c: &Cluster, i: usize, k: &str, v: &str) {
    assert_eq!(q(c, i, &["SET", k, v]), Ok(Value::Okay));
}

fn local_get(c: &Cluster, i: usize, k: &str) -> Value {
    c.local(i, &["GET", k])
}

/// Whether the redis-server under test was built with TLS (Debian's is; the servers in
/// ../shared/servers were built with BUILD_TLS=no). Without it, the tests that need a
/// `tls-port` print why they are skipped and pass.
fn server_has_tls(test: &str) -> bool {
    let port = free_port().to_string();
    let out = std::process::Command::new(redis_server())
        .args([
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            "/nonexistent",
        ])
        .args([
            "--tls-key-file",
            "/nonexistent",
            "--tls-ca-cert-file",
            "/nonexistent",
        ])
        .output();
    let has = match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned();
            !text.contains("Failed finding TLS support")
        }
        Err(_) => true,
    };
    if !has {
        println!("{test}: skipped: {} was built without TLS", redis_server());
    }
    has
}

#[test]
fn three_nodes_over_tls_replicate_through_a_leader_kill() {
    if !server_has_tls("three_nodes_over_tls_replicate_through_a_leader_kill") {
        return;
    }
    let (mut c, ca) = tls_cluster(3, 3);
    for i in 0..3 {
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(15));
    set(&c, l, "k1", "v1");
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(local_get(&c, i, "k1"), Value::BulkString(b"v1".to_vec()));
        let log = c.nodes[i].log();
        assert!(log.contains("(TLS)"), "node {i} bus not on TLS:\n{log}");
        assert!(!log.contains("anyone who can reach"), "{log}");
    }

    // New certificate files (same CA) by CONFIG SET: read again, used by new connections.
    let f = (l + 1) % 3;
    let dir = c.tmp.path().to_path_buf();
    let renewed = ca.node_args(&dir, "renewed", false);
    let file = |flag: &str| renewed[renewed.iter().position(|a| a == flag).unwrap() + 1].clone();
    let (crt, key) = (file("--tls-cert-file"), file("--tls-key-file"));
    assert_eq!(
        q(
            &c,
            f,
            &["CONFIG", "SET", "tls-cert-file", &crt, "tls-key-file", &key]
        ),
        Ok(Value::Okay)
    );
    assert_log(&c, f, "TLS certificates reloaded after CONFIG SET");

    c.kill(l);
    let l2 = c.wait_leader(Duration::from_secs(15));
    assert_ne!(l2, l);
    set(&c, l2, "k2", "v2");
    c.start_node(l);
    c.wait_applied_everywhere(Duration::from_secs(15));
    assert_eq!(local_get(&c, l, "k2"), Value::BulkString(b"v2".to_vec()));
    assert_eq!(local_get(&c, l, "k1"), Value::BulkString(b"v1".to_vec()));
}

/// A 4-node configuration whose 4th node is started with `args`; the first three (TLS,
/// certificates from the cluster's CA) take writes, the 4th never gets any. Returns the
/// cluster and its leader.
fn fourth_node_is_kept_out(args: impl FnOnce(&Path, &Ca) -> Vec<String>) -> (Cluster, usize) {
    let (mut c, ca) = tls_cluster(4, 3);
    let dir = c.tmp.path().to_path_buf();
    c.nodes[3].extra = args(&dir, &ca);
    for i in 0..4 {
        c.start_node(i);
    }
    // The harness's wait_leader wants every node to agree; the 4th never hears of one.
    let mut l = 0;
    wait_for(
        "a leader among the first three",
        Duration::from_secs(15),
        || match (0..3).find(|&i| c.info_field(i, "raft_role").as_deref() == Some("leader")) {
            Some(i) => {
                l = i;
                q(&c, i, &["SET", "probe", "1"]).is_ok()
            }
            None => false,
        },
    );
    set(&c, l, "secret", "v");
    // Time for a few reconnects of every pair.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(local_get(&c, 3, "secret"), Value::Nil);
    // It applied its own founding entries only (one per configured voter), nothing the
    // cluster committed after.
    let applied = info_num(&c, 3, "raft_last_applied_index");
    let commit = info_num(&c, l, "raft_commit_index");
    assert!(
        applied <= 4 && commit > 4,
        "applied {applied}, cluster at {commit}"
    );
    (c, l)
}

fn assert_log(c: &Cluster, i: usize, what: &str) {
    let log = c.nodes[i].log();
    assert!(log.contains(what), "node {i}'s log lacks {what:?}:\n{log}");
}

#[test]
fn node_with_a_certificate_from_a_foreign_ca_is_refused_and_told_why() {
    if !server_has_tls("node_with_a_certificate_from_a_foreign_ca_is_refused_and_told_why") {
        return;
    }
    let (c, l) = fourth_node_is_kept_out(|dir, _| {
        let foreign = Ca::new(dir, "foreign");
        foreign.node_args(dir, "n4", false)
    });
    // The cluster refuses its certificate; it refuses theirs (it trusts only its own CA).
    assert_log(&c, l, "its certificate is not signed by our CA");
    assert_log(&c, 3, "its certificate is not signed by our CA");
    // Each side also hears the other's refusal of its own certificate.
    assert_log(&c, 3, "our certificate is not signed by its CA");
    assert_log(&c, l, "our certificate is not signed by its CA");
}

#[test]
fn node_with_an_expired_certificate_is_refused_and_told_why() {
    if !server_has_tls("node_with_an_expired_certificate_is_refused_and_told_why") {
        return;
    }
    let (c, l) = fourth_node_is_kept_out(|dir, ca| ca.node_args(dir, "n4", true));
    assert_log(&c, l, "its certificate has expired");
    assert_log(&c, 3, "our certificate has expired");
}

#[test]
fn plain_tcp_node_and_tls_bus_refuse_each_other_with_the_reason() {
    if !server_has_tls("plain_tcp_node_and_tls_bus_refuse_each_other_with_the_reason") {
        return;
    }
    let (c, l) = fourth_node_is_kept_out(|_, _| Vec::new());
    assert_log(&c, l, "this node's bus requires TLS (raft.tls-enabled yes)");
    assert_log(&c, 3, "refused us: this node's bus requires TLS");
    assert_log(&c, 3, "it speaks TLS, and this node's bus is plain TCP");
    assert_log(&c, l, "does it have raft.tls-enabled yes?");
}

#[test]
fn bus_exposed_beyond_loopback_without_password_or_tls_is_warned_about() {
    let mut c = Cluster::define(1);
    let d = &c.nodes[0].def;
    // Its entry is not a loopback address, so its bus listens on every interface.
    c.cluster_nodes = format!("{}=0.0.0.0:{}@{}", d.name, d.port, d.bus_port);
    c.start_node(0);
    wait_for("the bus warning", Duration::from_secs(10), || {
        c.nodes[0]
            .log()
            .contains("anyone who can reach this port can take part in the cluster")
    });
    assert_log(&c, 0, "set raft.cluster-password or raft.tls-enabled yes");
}

fn tls_port_of(args: &[String]) -> String {
    let at = args.iter().position(|a| a == "--tls-port").unwrap();
    args[at + 1].clone()
}

fn reply_text(r: Result<Value, String>) -> String {
    match r {
        Ok(Value::Okay) => "OK".into(),
        Ok(Value::SimpleString(s)) => s,
        Ok(other) => format!("{other:?}"),
        Err(e) => e,
    }
}

#[test]
fn join_over_tls_to_the_tls_port_and_a_foreign_certificate_is_refused() {
    if !server_has_tls("join_over_tls_to_the_tls_port_and_a_foreign_certificate_is_refused") {
        return;
    }
    let mut c = Cluster::define(0);
    let dir = c.tmp.path().to_path_buf();
    let ca = Ca::new(&dir, "cluster");
    let foreign = Ca::new(&dir, "foreign");
    for k in 0..3 {
        let i = c.add_dynamic_node();
        let name = c.nodes[i].def.name.clone();
        let mut args = if k < 2 {
            ca.node_args(&dir, &name, false)
        } else {
            foreign.node_args(&dir, &name, false)
        };
        args.extend(["--raft.join-timeout".to_string(), "3000".into()]);
        c.nodes[i].extra = args;
        c.start_node(i);
    }
    assert!(reply_text(q(&c, 0, &["RAFT.CLUSTER", "INIT"])).starts_with("OK"));
    let via = format!("127.0.0.1:{}", tls_port_of(&c.nodes[0].extra));
    assert_eq!(reply_text(q(&c, 1, &["RAFT.CLUSTER", "JOIN", &via])), "OK");
    assert_eq!(q(&c, 0, &["SET", "k", "v"]), Ok(Value::Okay));
    wait_for("k on the joined node", Duration::from_secs(10), || {
        c.local(1, &["GET", "k"]) == Value::BulkString(b"v".to_vec())
    });

    // A node whose certificate the cluster's CA did not sign cannot join.
    let e = reply_text(q(&c, 2, &["RAFT.CLUSTER", "JOIN", &via]));
    assert!(
        e.starts_with("ERR failed to connect to cluster for join") && e.contains("TLS"),
        "{e}"
    );
    assert_eq!(
        c.info_field(2, "raft_state").as_deref(),
        Some("uninitialized")
    );
    assert_eq!(info_num(&c, 0, "raft_num_nodes"), 2);
}

#[test]
fn tls_enabled_without_certificate_files_refuses_to_start_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let out = start_expecting_failure(dir.path(), &["--raft.tls-enabled", "yes"]);
    assert!(
        out.contains("raft.tls-enabled needs Redis's tls-cert-file and tls-key-file"),
        "{out}"
    );
}
