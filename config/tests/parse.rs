//! The config file contract: every key of DESIGN.md parses, defaults fill the rest, and every kind
//! of bad input is refused with the file, line and key it is about.

use std::path::Path;
use std::time::Duration;

use weft_config::{Config, ConfigError, Offload};

const FULL: &str = r#"
node:
  name: node-a
  region: eu-west
  private_address: 198.18.1.1
  public_address: 198.19.0.1
  key_file: /var/lib/weft/private.key
  pod_cidr: 100.64.1.0/24
network:
  pod_network_cidr: 100.64.0.0/16
  node_cidr_mask_size: 24
  block_expiry: 24h
  trusted_subnets: [198.18.0.0/16]
  mtu: 1420
  nat_outgoing: true
  no_masquerade: []
mesh:
  port: 6783
  peers: [198.18.1.2, "198.19.0.3:6783"]
  secret_file: /etc/weft/secret
router:
  port: 51820
  interface: weft0
  offload: auto
wireguard_peers:
  - name: laptop
    public_key: aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=
    endpoint: 198.18.1.2:51820
    allowed_ips: [100.64.200.0/24]
    persistent_keepalive: 25
cni:
  conflist: /etc/cni/net.d/10-weft.conflist
kubernetes:
  enabled: false
state_dir: /var/lib/weft
api_socket: /run/weft/weft.sock
metrics_address: 127.0.0.1:6782
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/weft/weft.yaml"), "host-1")
}

/// Parses `text`, expects an error, and checks it names the file, `line` and `key`.
fn refused(text: &str, line: usize, key: &str) -> String {
    let err = parse(text).expect_err("config should be refused");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("/etc/weft/weft.yaml:{line}:")),
        "wrong file or line: {msg}"
    );
    assert_eq!(err.key(), Some(key), "wrong key: {msg}");
    assert!(msg.contains(key), "message does not name the key: {msg}");
    msg
}

#[test]
fn the_design_example_parses_in_full() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.node.name, "node-a");
    assert_eq!(c.node.region.as_deref(), Some("eu-west"));
    assert_eq!(c.node.pod_cidr, vec!["100.64.1.0/24".parse().unwrap()]);
    assert_eq!(c.network.block_expiry, Duration::from_secs(86400));
    assert_eq!(c.network.mtu, Some(1420));
    assert_eq!(
        c.mesh.peers,
        vec![
            "198.18.1.2:6783".parse().unwrap(),
            "198.19.0.3:6783".parse().unwrap()
        ]
    );
    assert_eq!(c.router.offload, Offload::AUTO);
    assert_eq!(c.wireguard_peers.len(), 1);
    assert_eq!(c.wireguard_peers[0].persistent_keepalive, Some(25));
    assert_eq!(
        c.wireguard_peers[0].endpoint,
        Some("198.18.1.2:51820".parse().unwrap())
    );
}

#[test]
fn an_empty_file_is_all_defaults() {
    let c = parse("# nothing here\n").unwrap();
    assert_eq!(c.node.name, "host-1");
    assert_eq!(c.node.key_file, Path::new("/var/lib/weft/private.key"));
    assert_eq!(
        c.network.pod_network_cidr,
        vec!["100.64.0.0/16".parse().unwrap()]
    );
    assert_eq!(
        (
            c.network.node_cidr_mask_size_ipv4,
            c.network.node_cidr_mask_size_ipv6
        ),
        (24, 64)
    );
    assert!(c.network.nat_outgoing);
    assert_eq!((c.mesh.port, c.router.port), (6783, 51820));
    assert_eq!(c.router.interface, "weft0");
    assert_eq!(c.api_socket, Path::new("/run/weft/weft.sock"));
    assert_eq!(c.metrics_address, "127.0.0.1:6782".parse().unwrap());
}

#[test]
fn a_conflist_is_written_only_when_cni_conflist_is_set_or_kubernetes_is_enabled() {
    let standalone = parse("node:\n  pod_cidr: 100.64.1.0/24\n").unwrap();
    assert_eq!(
        standalone.cni.conflist, None,
        "a standalone node writes no conflist"
    );
    let kubernetes = parse("kubernetes:\n  enabled: true\n").unwrap();
    assert_eq!(
        kubernetes.cni.conflist.as_deref(),
        Some(Path::new(weft_config::DEFAULT_CONFLIST))
    );
    assert_eq!(
        weft_config::DEFAULT_CONFLIST,
        "/etc/cni/net.d/10-weft.conflist"
    );
    let told = parse("cni:\n  conflist: /tmp/x/10-weft.conflist\n").unwrap();
    assert_eq!(
        told.cni.conflist.as_deref(),
        Some(Path::new("/tmp/x/10-weft.conflist"))
    );
    let both = parse("kubernetes:\n  enabled: true\ncni:\n  conflist: /tmp/y.conflist\n").unwrap();
    assert_eq!(
        both.cni.conflist.as_deref(),
        Some(Path::new("/tmp/y.conflist"))
    );
}

#[test]
fn dual_stack_pod_network_takes_a_list() {
    let c = parse(
        "network:\n  pod_network_cidr: [100.64.0.0/16, 'fd00:64::/48']\n  node_cidr_mask_size_ipv6: 64\n",
    )
    .unwrap();
    assert_eq!(c.network.pod_network_cidr.len(), 2);
}

#[test]
fn syntax_error_names_line() {
    let msg = refused("node:\n  name: a\n   region: [unclosed\n", 3, "node");
    assert!(
        msg.contains("mapping values are not allowed") || msg.contains("did not find"),
        "{msg}"
    );
}

#[test]
fn unknown_key_is_refused() {
    let msg = refused("node:\n  name: a\n  colour: blue\n", 3, "node.colour");
    assert!(msg.contains("unknown field `colour`"), "{msg}");
}

#[test]
fn bad_cidr_is_refused() {
    let msg = refused(
        "network:\n  pod_network_cidr: 100.64.0.0/33\n",
        2,
        "network.pod_network_cidr",
    );
    assert!(msg.contains("invalid CIDR \"100.64.0.0/33\""), "{msg}");
    let msg = refused(
        "network:\n  trusted_subnets:\n    - 198.18.0.1/16\n",
        3,
        "network.trusted_subnets[0]",
    );
    assert!(msg.contains("did you mean 198.18.0.0/16"), "{msg}");
}

#[test]
fn bad_key_is_refused() {
    let text = "wireguard_peers:\n  - name: x\n    public_key: not-a-key\n    allowed_ips: []\n";
    let msg = refused(text, 3, "wireguard_peers[0].public_key");
    assert!(msg.contains("invalid WireGuard public key"), "{msg}");
}

#[test]
fn port_out_of_range_is_refused() {
    let msg = refused("router:\n  port: 70000\n", 2, "router.port");
    assert!(msg.contains("port 70000 is out of range"), "{msg}");
    refused("mesh:\n  port: 0\n", 2, "mesh.port");
}

#[test]
fn static_block_outside_the_pool_is_refused() {
    let msg = refused("node:\n  pod_cidr: 100.65.1.0/24\n", 2, "node.pod_cidr");
    assert!(
        msg.contains("not inside the pod network 100.64.0.0/16"),
        "{msg}"
    );
}

#[test]
fn a_node_address_no_peer_can_reach_is_refused() {
    // Peers refuse such an address in this node's record; the config names it instead.
    for (key, value, why) in [
        ("private_address", "127.0.0.1", "not a unicast address"),
        ("public_address", "0.0.0.0", "not a unicast address"),
        ("private_address", "169.254.1.1", "not a unicast address"),
        ("public_address", "224.0.0.1", "not a unicast address"),
        ("public_address", "255.255.255.255", "not a unicast address"),
        ("private_address", "::1", "not a unicast address"),
        ("private_address", "fe80::1", "not a unicast address"),
        (
            "public_address",
            "::ffff:127.0.0.1",
            "not a unicast address",
        ),
        (
            "private_address",
            "100.64.3.9",
            "inside the pod network 100.64.0.0/16",
        ),
    ] {
        let text = format!("node:\n  {key}: \"{value}\"\n");
        let msg = refused(&text, 2, &format!("node.{key}"));
        assert!(msg.contains(why), "{value}: {msg}");
    }
    // An IPv4-mapped address is kept as the IPv4 address it is.
    let cfg = parse("node:\n  private_address: \"::ffff:198.18.1.1\"\n").unwrap();
    assert_eq!(
        cfg.node.private_address,
        Some("198.18.1.1".parse().unwrap())
    );
}

#[test]
fn peers_may_not_share_names_keys_or_prefixes() {
    let k1 = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let k2 = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    let text = format!(
        "wireguard_peers:\n  - name: a\n    public_key: {k1}\n    allowed_ips: [100.64.2.0/24]\n  - name: b\n    public_key: {k2}\n    allowed_ips:\n      - 100.64.3.0/24\n      - 100.64.2.0/24\n"
    );
    let msg = refused(&text, 9, "wireguard_peers[1].allowed_ips[1]");
    assert!(msg.contains("already claimed by peer \"a\""), "{msg}");
    let text = format!(
        "wireguard_peers:\n  - name: a\n    public_key: {k1}\n  - name: b\n    public_key: {k1}\n"
    );
    refused(&text, 5, "wireguard_peers[1].public_key");
    let text = format!(
        "wireguard_peers:\n  - name: a\n    public_key: {k1}\n  - name: a\n    public_key: {k2}\n"
    );
    refused(&text, 4, "wireguard_peers[1].name");
}

#[test]
fn peer_prefixes_covering_the_pod_network_or_this_nodes_block_are_refused() {
    let k1 = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    for (prefix, covered) in [
        ("0.0.0.0/0", "the pod network 100.64.0.0/16"),
        ("100.0.0.0/8", "the pod network 100.64.0.0/16"),
        ("100.64.0.0/16", "the pod network 100.64.0.0/16"),
        ("100.64.1.128/25", "this node's block 100.64.1.0/24"),
    ] {
        let text = format!(
            "node:\n  pod_cidr: 100.64.1.0/24\nwireguard_peers:\n  - name: vpn\n    public_key: {k1}\n    allowed_ips:\n      - 10.9.0.0/16\n      - {prefix}\n"
        );
        let msg = refused(&text, 8, "wireguard_peers[0].allowed_ips[1]");
        assert!(
            msg.contains(&format!("{prefix} of peer \"vpn\" overlaps {covered}")),
            "{msg}"
        );
    }
    // IPv6 too, against the pool of its family.
    let text = format!(
        "network:\n  pod_network_cidr: [100.64.0.0/16, \"fd00:64::/48\"]\nwireguard_peers:\n  - name: vpn\n    public_key: {k1}\n    allowed_ips: [\"::/0\"]\n"
    );
    let msg = refused(&text, 6, "wireguard_peers[0].allowed_ips[0]");
    assert!(
        msg.contains("::/0 of peer \"vpn\" overlaps the pod network fd00:64::/48"),
        "{msg}"
    );
    // A block of the pod network no node holds, and anything outside it, are fine.
    let text = format!(
        "node:\n  pod_cidr: 100.64.1.0/24\nwireguard_peers:\n  - name: vpn\n    public_key: {k1}\n    allowed_ips: [100.64.2.0/24, 10.0.0.0/8]\n"
    );
    parse(&text).unwrap();
}

#[test]
fn mask_size_must_fit_the_pool() {
    let msg = refused(
        "network:\n  node_cidr_mask_size: 12\n",
        2,
        "network.node_cidr_mask_size",
    );
    assert!(msg.contains("does not fit the pool 100.64.0.0/16"), "{msg}");
}

#[test]
fn wrong_type_is_refused() {
    refused(
        "network:\n  nat_outgoing: maybe\n",
        2,
        "network.nat_outgoing",
    );
    refused("router:\n  offload: fast\n", 2, "router.offload");
}

#[test]
fn unreadable_file_names_the_path() {
    let err = Config::load(Path::new("/nonexistent/weft.yaml")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/weft.yaml"), "{err}");
}

#[test]
fn gossip_timing_has_defaults_and_is_checked() {
    let c = parse("").unwrap();
    assert_eq!(c.mesh.gossip_interval, Duration::from_secs(1));
    assert_eq!(c.mesh.liveness_timeout, Duration::from_secs(30));
    let c = parse("mesh:\n  gossip_interval: 2s\n  liveness_timeout: 1m\n").unwrap();
    assert_eq!(
        (c.mesh.gossip_interval, c.mesh.liveness_timeout),
        (Duration::from_secs(2), Duration::from_secs(60))
    );
    let e = refused(
        "mesh:\n  gossip_interval: 5s\n  liveness_timeout: 10s\n",
        3,
        "mesh.liveness_timeout",
    );
    assert!(e.contains("shorter than three gossip intervals"), "{e}");
}

#[test]
fn tombstone_horizon_and_max_members_have_defaults_and_are_checked() {
    let c = parse("").unwrap();
    assert_eq!(c.mesh.tombstone_horizon, Duration::from_secs(72 * 3600));
    assert_eq!(c.mesh.max_members, 8192);
    let c = parse("mesh:\n  tombstone_horizon: 48h\n  max_members: 20000\n").unwrap();
    assert_eq!(
        (c.mesh.tombstone_horizon, c.mesh.max_members),
        (Duration::from_secs(48 * 3600), 20000)
    );
    // Never before a dead node's block expires.
    let e = refused(
        "network:\n  block_expiry: 24h\nmesh:\n  tombstone_horizon: 1h\n",
        4,
        "mesh.tombstone_horizon",
    );
    assert!(e.contains("shorter than network.block_expiry"), "{e}");
    for bad in ["0", "100001"] {
        let e = refused(
            &format!("mesh:\n  max_members: {bad}\n"),
            2,
            "mesh.max_members",
        );
        assert!(
            e.contains(&format!("{bad} is out of range 1-100000")),
            "{e}"
        );
    }
    refused("mesh:\n  max_members: -3\n", 2, "mesh.max_members");
}

#[test]
fn record_refresh_has_a_default_and_a_range() {
    assert_eq!(
        parse("").unwrap().mesh.record_refresh,
        Duration::from_secs(600)
    );
    let c = parse("mesh:\n  record_refresh: 2s\n").unwrap();
    assert_eq!(c.mesh.record_refresh, Duration::from_secs(2));
    for bad in ["0s", "25h"] {
        let e = refused(
            &format!("mesh:\n  record_refresh: {bad}\n"),
            2,
            "mesh.record_refresh",
        );
        assert!(e.contains("is out of range 1s-24h"), "{bad}: {e}");
    }
}

#[test]
fn log_level_takes_levels_and_directives_and_names_a_bad_one() {
    for ok in ["debug", "info,weft_mesh=trace", "WARN"] {
        let c = parse(&format!("log_level: {ok:?}\n")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(c.log_level, ok);
    }
    let msg = refused("log_level: loud\n", 1, "log_level");
    assert!(msg.contains("\"loud\" is not a log filter"), "{msg}");
}

#[test]
fn relay_is_auto_never_or_a_list_of_names_and_anything_else_is_named() {
    assert_eq!(parse("").unwrap().mesh.relay, weft_config::Relay::Auto);
    assert_eq!(
        parse("mesh:\n  relay: never\n").unwrap().mesh.relay,
        weft_config::Relay::Never
    );
    assert_eq!(
        parse("mesh:\n  relay: [p1, p2]\n").unwrap().mesh.relay,
        weft_config::Relay::Named(vec!["p1".into(), "p2".into()])
    );
    let msg = refused("mesh:\n  relay: p1\n", 2, "mesh.relay");
    assert!(
        msg.contains("\"p1\" is not auto or never") && msg.contains("[p1]"),
        "{msg}"
    );
    let msg = refused("mesh:\n  relay: []\n", 2, "mesh.relay");
    assert!(msg.contains("write never"), "{msg}");
    let msg = refused("mesh:\n  relay: 7\n", 2, "mesh.relay");
    assert!(msg.contains("expected auto, never, or a list"), "{msg}");
    let msg = refused("mesh:\n  relay: [\"\"]\n", 2, "mesh.relay");
    assert!(msg.contains("empty member name"), "{msg}");
}

#[test]
fn offload_is_auto_off_or_a_list_of_mechanisms() {
    let off = parse("router:\n  offload: off\n").unwrap();
    assert_eq!(off.router.offload, Offload::OFF);
    let some = parse("router:\n  offload: [udp_batch, tun]\n").unwrap();
    assert_eq!(some.router.offload.names(), ["udp_batch", "tun"]);
    assert_eq!(parse("").unwrap().router.offload, Offload::AUTO);
    let msg = refused("router:\n  offload: [udp_gso, warp]\n", 2, "router.offload");
    assert!(msg.contains("\"warp\"") && msg.contains("udp_gro"), "{msg}");
}

#[test]
fn workers_are_auto_or_a_count_from_one_to_the_most_and_anything_else_is_named() {
    use weft_config::Workers;
    assert_eq!(parse("").unwrap().router.workers, Workers::Auto);
    assert_eq!(
        parse("router:\n  workers: auto\n").unwrap().router.workers,
        Workers::Auto
    );
    assert_eq!(
        parse("router:\n  workers: 4\n").unwrap().router.workers,
        Workers::Count(4)
    );
    assert_eq!(
        parse("router:\n  workers: \"1\"\n").unwrap().router.workers,
        Workers::Count(1)
    );
    for bad in ["0", "65", "-1", "many", "70000", "2.5"] {
        let msg = refused(&format!("router:\n  workers: {bad}\n"), 2, "router.workers");
        assert!(
            msg.contains("not auto or a number of workers from 1 to 64")
                || msg.contains("expected auto or a number of workers"),
            "{bad}: {msg}"
        );
    }
    assert_eq!(Workers::Auto.resolve(8), 8);
    assert_eq!(Workers::Auto.resolve(0), 1);
    assert_eq!(Workers::Auto.resolve(512), 8);
    assert_eq!(Workers::Count(64).resolve(512), 64);
    assert_eq!(Workers::Count(3).resolve(1), 3);
}

#[test]
fn an_authority_comes_with_this_nodes_certificate_and_not_with_kubernetes() {
    let key = "hG6ZpbcVSM8p1+4UuvV1XOVF5yYq2w1mfL7YN3p0O3E=";
    let c = parse(&format!(
        "mesh:\n  authority: {key}\n  certificate: /etc/weft/node.cert\n"
    ))
    .unwrap();
    let k = key.parse::<weft_config::PublicKey>().unwrap().0;
    assert_eq!(
        c.mesh.authority.iter().map(|k| k.0).collect::<Vec<_>>(),
        [k]
    );
    assert_eq!(
        c.mesh.certificate.as_deref(),
        Some(Path::new("/etc/weft/node.cert"))
    );
    assert_eq!(parse("").unwrap().mesh.authority, [], "none by default");
    // While a new authority key is rolled out, both are listed.
    let other = "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGw=";
    let c = parse(&format!(
        "mesh:\n  authority: [{key}, {other}]\n  certificate: /etc/weft/node.cert\n"
    ))
    .unwrap();
    assert_eq!(c.mesh.authority.len(), 2);
    let e = refused(
        "mesh:\n  authority: []\n  certificate: /c\n",
        2,
        "mesh.authority",
    );
    assert!(e.contains("is an empty list"), "{e}");

    let e = refused(&format!("mesh:\n  authority: {key}\n"), 2, "mesh.authority");
    assert!(e.contains("needs mesh.certificate"), "{e}");
    let e = refused(
        "mesh:\n  certificate: /etc/weft/node.cert\n",
        2,
        "mesh.certificate",
    );
    assert!(e.contains("needs mesh.authority"), "{e}");
    let e = refused(
        &format!("kubernetes:\n  enabled: true\nmesh:\n  authority: {key}\n  certificate: /c\n"),
        4,
        "mesh.authority",
    );
    assert!(e.contains("cannot be used with kubernetes.enabled"), "{e}");
    for bad in ["!!", "AAAA"] {
        let e = refused(
            &format!("mesh:\n  authority: \"{bad}\"\n  certificate: /c\n"),
            2,
            "mesh.authority",
        );
        assert!(e.contains("authority public key"), "{bad}: {e}");
    }
}

#[test]
fn durations_past_their_most_are_refused_naming_the_key_and_the_most_never_a_panic() {
    // Far past any deployment, and past what `3 * gossip_interval` (here) and
    // `liveness_timeout * BID_WINDOW` (in the mesh) can compute without overflowing.
    let huge = "7000000000000000000s";
    let msg = parse(&format!("mesh: {{gossip_interval: {huge}}}\n"))
        .expect_err("config should be refused")
        .to_string();
    assert!(
        msg.starts_with("/etc/weft/weft.yaml:1:") && msg.contains("mesh.gossip_interval"),
        "{msg}"
    );
    for (section, key, most, over, shown) in [
        ("mesh", "gossip_interval", "1h", "3601s", "3601s"),
        ("mesh", "liveness_timeout", "24h", "25h", "90000s"),
        (
            "mesh",
            "tombstone_horizon",
            "36500d",
            "36501d",
            "3153686400s",
        ),
        ("network", "block_expiry", "36500d", "36501d", "3153686400s"),
    ] {
        for (bad, shown) in [(over, shown), (huge, huge)] {
            let path = format!("{section}.{key}");
            let msg = refused(&format!("{section}:\n  {key}: {bad}\n"), 2, &path);
            assert!(
                msg.contains(&format!(
                    "{shown} is longer than the most it may be, {most}"
                )),
                "{path}: {bad}: {msg}"
            );
        }
    }
    // The most itself is taken.
    let c = parse(
        "network:\n  block_expiry: 36500d\nmesh:\n  gossip_interval: 1h\n  liveness_timeout: 24h\n  tombstone_horizon: 36500d\n",
    )
    .unwrap();
    assert_eq!(c.mesh.liveness_timeout, Duration::from_secs(24 * 3600));
    assert_eq!(
        c.mesh.tombstone_horizon,
        Duration::from_secs(36_500 * 86400)
    );
}

#[test]
fn a_static_block_broader_than_a_node_block_is_refused_as_every_peer_would() {
    // The peers' rule (a claim no broader than a node block of its family): /23 under /24.
    let msg = refused("node:\n  pod_cidr: 100.64.0.0/23\n", 2, "node.pod_cidr");
    assert!(
        msg.contains(
            "100.64.0.0/23 is broader than a node block (/24, network.node_cidr_mask_size)"
        ),
        "{msg}"
    );
    let msg = refused(
        "network:\n  pod_network_cidr: [100.64.0.0/16, \"fd00:64::/48\"]\n  node_cidr_mask_size_ipv4: 26\n  node_cidr_mask_size_ipv6: 80\nnode:\n  pod_cidr: [100.64.1.0/26, \"fd00:64::/64\"]\n",
        6,
        "node.pod_cidr",
    );
    assert!(
        msg.contains(
            "fd00:64::/64 is broader than a node block (/80, network.node_cidr_mask_size_ipv6)"
        ),
        "{msg}"
    );
    let msg = refused(
        "network:\n  node_cidr_mask_size_ipv4: 25\nnode:\n  pod_cidr: 100.64.1.0/24\n",
        4,
        "node.pod_cidr",
    );
    assert!(
        msg.contains("(/25, network.node_cidr_mask_size_ipv4)"),
        "{msg}"
    );
    // A node block, or one narrower (the peers take it), is fine.
    for ok in ["100.64.1.0/24", "100.64.1.128/25", "100.64.1.1/32"] {
        let c =
            parse(&format!("node:\n  pod_cidr: {ok}\n")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(c.node.pod_cidr, [ok.parse::<ipnet::IpNet>().unwrap()]);
    }
}

#[test]
fn router_port_65535_is_refused_as_the_relay_port_is_the_next_one() {
    let msg = refused("router:\n  port: 65535\n", 2, "router.port");
    assert!(
        msg.contains("65535 leaves no relay port") && msg.contains("router.port + 1"),
        "{msg}"
    );
    assert_eq!(
        parse("router:\n  port: 65534\n").unwrap().router.port,
        65534
    );
    // Port 0 was already refused, for both ports.
    let msg = refused("router:\n  port: 0\n", 2, "router.port");
    assert!(msg.contains("port 0 is out of range 1-65535"), "{msg}");
}

#[test]
fn interface_names_the_kernel_refuses_are_refused() {
    // The kernel's dev_valid_name: 1 to 15 bytes, not "." or "..", no '/', ':' or whitespace
    // (its isspace: \t \n \v \f \r, space, and the byte 0xa0, which ends U+00A0 and "à").
    for (yaml, name) in [
        (r#""weft:0""#, "weft:0"),
        (r#"".""#, "."),
        (r#""..""#, ".."),
        (r#""""#, ""),
        (r#""a/b""#, "a/b"),
        (r#""we ft""#, "we ft"),
        (r#""weft\t0""#, "weft\t0"),
        (r#""weft\v0""#, "weft\u{b}0"),
        (r#""weft\u00a00""#, "weft\u{a0}0"),
        (r#""wà0""#, "wà0"),
        (r#""weft\00""#, "weft\u{0}0"),
        (r#""sixteen-chars-xx""#, "sixteen-chars-xx"),
        // 9 characters, 17 bytes.
        (r#""wéééééééé""#, "wéééééééé"),
    ] {
        let text = format!("router:\n  interface: {yaml}\n");
        let msg = refused(&text, 2, "router.interface");
        assert!(
            msg.contains(&format!(
                "interface name {name:?} is not one the kernel takes"
            )),
            "{name:?}: {msg}"
        );
    }
    // What the kernel takes, up to 15 bytes, dots and dashes included.
    for ok in [
        "weft0",
        "wg.1",
        "...",
        "fifteen-chars-x",
        "wéft0",
        "veth_a-b@c",
    ] {
        let text = format!("router:\n  interface: {ok:?}\n");
        let c = parse(&text).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        assert_eq!(c.router.interface, ok);
    }
}
