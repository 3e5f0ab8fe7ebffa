//! `weft`: the daemon (`weft run`) and its command-line tools.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft::host::keys;
use weft::{api, app};

/// weft: a userspace overlay router. Nodes gossip their pod CIDRs, regions, addresses and
/// WireGuard keys, and forward pod traffic through a TUN device, WireGuard-encrypted (or plain
/// UDP between trusted subnets).
#[derive(Debug, Parser)]
#[command(name = "weft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum AuthorityCmd {
    /// Prints a new authority private key (base64). Keep it off the nodes: whoever holds it can
    /// certify any block to any key.
    Genkey,
    /// Reads an authority private key on standard input and prints its public key, the value
    /// of `mesh.authority` on every node.
    Pubkey,
    /// Prints a certificate (base64, one line) that lets the node with WireGuard public key
    /// `--node-key` claim the `--pod-cidr` blocks; save it as the node's `mesh.certificate`.
    Sign {
        /// The authority's private key file (mode 0600).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The node's WireGuard public key, as `weft pubkey` prints it from its private key.
        #[arg(long, value_name = "BASE64")]
        node_key: String,
        /// A pod CIDR block of the node (one IPv4 and/or one IPv6), inside the cluster's
        /// network.pod_network_cidr at its node block size.
        #[arg(long = "pod-cidr", value_name = "CIDR", required = true)]
        pod_cidrs: Vec<ipnet::IpNet>,
        /// Days the certificate holds from now.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the daemon in the foreground (systemd Type=notify). Creates the TUN device, its
    /// address and routes; removes them on SIGTERM/SIGINT.
    Run {
        /// The config file (YAML).
        #[arg(long, short, default_value = weft_config::DEFAULT_CONFIG_PATH, env = "WEFT_CONFIG")]
        config: PathBuf,
        /// Forgets the pod blocks saved in state_dir (ipam.json) and claims afresh, and the claim
        /// history (claims.json); for a state file that cannot be read, a node moved to another
        /// cluster, or a member refused by mistake.
        #[arg(long)]
        reset_state: bool,
    },
    /// Shows this node and its peers, from the running daemon.
    Status {
        /// The daemon's API socket.
        #[arg(long, default_value = "/run/weft/weft.sock", env = "WEFT_SOCKET")]
        socket: PathBuf,
        /// Prints JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prints a new WireGuard private key (base64), as `wg genkey` does.
    Genkey,
    /// Reads a private key on standard input and prints its public key, as `wg pubkey` does.
    Pubkey,
    /// Prints a new cluster secret (32 random bytes, base64).
    Gensecret,
    /// The cluster's authority, for standalone meshes: a key, kept off the nodes, that signs
    /// which pod CIDRs each node may claim. Nodes given its public key (`mesh.authority`) and
    /// their own certificate (`mesh.certificate`) believe a member's claims only when its
    /// certificate names them, so no member can claim another node's block.
    Authority {
        #[command(subcommand)]
        action: AuthorityCmd,
    },
    /// Builds a lab of four nodes in two regions in network namespaces on this machine, runs
    /// the real daemon on each, shows status and pod-to-pod traffic (ping and TCP), and cleans
    /// up. Needs root, iproute2 and ping; touches nothing outside its namespaces.
    Demo {
        /// Leaves the lab running afterwards and prints how to look around; `weft demo down`
        /// removes it.
        #[arg(long)]
        keep: bool,
        #[command(subcommand)]
        action: Option<DemoCmd>,
    },
}

#[derive(Debug, Subcommand)]
enum DemoCmd {
    /// Removes a lab that `weft demo --keep` (or `weft demo nat --keep`) left running.
    Down,
    /// Nodes behind NAT: a public node, two nodes behind NAT routers that map
    /// endpoint-independently (they punch through to each other) and one behind a symmetric
    /// NAT (reached through the public node as a relay). Needs root, iproute2 and nftables.
    Nat {
        /// Leaves the lab running afterwards; `weft demo down` removes it.
        #[arg(long)]
        keep: bool,
    },
}

/// Held back unless the filter names netlink-packet-route itself: it warns, for every link it
/// reads, about attributes a newer kernel made longer than it knows (`IFLA_INET6_CONF` on
/// Linux 6.18, three lines at each start), which weft does not read and an operator can do
/// nothing about. Its errors still show.
const QUIETED: &str = "netlink_packet_route::link::buffer_tool=error";

/// `spec` (`WEFT_LOG`'s, or the config's `log_level`) with [`QUIETED`] held back, unless
/// `spec` names `netlink_packet_route`.
fn with_quieted(spec: &str) -> String {
    if spec.contains("netlink_packet_route") {
        spec.to_owned()
    } else {
        format!("{QUIETED},{spec}")
    }
}

/// The log filter `spec` asks for ([`with_quieted`]); an error names `spec`.
fn log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, anyhow::Error> {
    tracing_subscriber::EnvFilter::try_new(with_quieted(spec))
        .with_context(|| format!("log filter {spec:?}"))
}

/// The filter at start, and whether `WEFT_LOG` fixed it: `env`'s (`WEFT_LOG`) when it parses,
/// else `level`'s; a `level` that does not parse whole (the config's check is looser than the
/// parser) keeps the directives that do, [`QUIETED`] among them.
fn initial_filter(env: Option<&str>, level: &str) -> (tracing_subscriber::EnvFilter, bool) {
    match env.and_then(|spec| log_filter(spec).ok()) {
        Some(filter) => (filter, true),
        None => {
            let filter = log_filter(level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(with_quieted(level)));
            (filter, false)
        }
    }
}

/// Logs to stderr, one line per event with its fields (journald takes stderr as is): the
/// filter from `WEFT_LOG` (one that does not parse is ignored), else the config's
/// `log_level`, which a reload can change; either through [`log_filter`]. Colour only on a
/// terminal.
fn init_logging(config_level: &str) -> Option<app::reload::SetLog> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, fixed) = initial_filter(std::env::var("WEFT_LOG").ok().as_deref(), config_level);
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    (!fixed).then(|| -> app::reload::SetLog {
        Box::new(move |level: &str| {
            let f = log_filter(level)?;
            handle.reload(f).context("changing the log filter")
        })
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs the demo (`nat`: the NAT scene); SIGINT/SIGTERM stop it between steps and the lab is
/// still cleaned up.
fn demo(keep: bool, nat: bool) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let rt = runtime()?;
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        flag.store(true, Ordering::Relaxed);
        Ok::<_, std::io::Error>(())
    });
    let bin = weft::demo::current_binary()?;
    if nat {
        weft::demo::nat::run_nat_demo(&bin, stop, keep)
    } else {
        weft::demo::run_demo(&bin, stop, keep)
    }
}

fn authority(action: AuthorityCmd) -> anyhow::Result<()> {
    use weft::app::certify;
    match action {
        AuthorityCmd::Genkey => println!("{}", keys::encode(&keys::generate_secret())),
        AuthorityCmd::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            let seed = keys::decode(&text, "standard input")?;
            println!("{}", certify::authority_public(&seed));
        }
        AuthorityCmd::Sign {
            key,
            node_key,
            pod_cidrs,
            days,
        } => {
            let text = keys::read_private(&key)?;
            let seed = keys::decode(&text, &format!("authority key {}", key.display()))?;
            let now = weft::control::now_millis();
            let cert = certify::issue(&seed, &node_key, pod_cidrs, now, days)?;
            print!("{}", certify::to_text(&cert));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run {
            config,
            reset_state,
        } => {
            // The log level is in the config; a config that does not load is reported by
            // `run` below, with the default level.
            let level = weft_config::Config::load(&config)
                .map_or_else(|_| "info".to_owned(), |c| c.log_level);
            let set_log = init_logging(&level);
            runtime().and_then(|rt| rt.block_on(app::run(&config, reset_state, set_log)))
        }
        Cmd::Status { socket, json } => runtime().and_then(|rt| {
            let st = rt.block_on(api::status(&socket))?;
            if json {
                println!("{}", st.json()?);
            } else {
                print!("{}", st.table());
            }
            Ok(())
        }),
        Cmd::Demo {
            action: Some(DemoCmd::Down),
            ..
        } => weft::demo::down(),
        Cmd::Demo {
            action: Some(DemoCmd::Nat { keep }),
            ..
        } => demo(keep, true),
        Cmd::Demo { keep, action: None } => demo(keep, false),
        Cmd::Genkey => {
            println!("{}", keys::encode(&keys::generate().to_bytes()));
            Ok(())
        }
        Cmd::Authority { action } => authority(action),
        Cmd::Gensecret => {
            println!("{}", keys::encode(&keys::generate_secret()));
            Ok(())
        }
        Cmd::Pubkey => (|| {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            let key = keys::decode(&text, "standard input")?;
            println!(
                "{}",
                keys::public_of(&boringtun::x25519::StaticSecret::from(key))
            );
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_warnings_are_held_back_unless_the_filter_names_the_crate_and_a_bad_filter_is_named()
    {
        let held = log_filter("info").expect("filter").to_string();
        assert!(held.contains(QUIETED), "{held}");
        let asked = log_filter("info,netlink_packet_route=warn")
            .expect("filter")
            .to_string();
        assert!(!asked.contains("buffer_tool"), "{asked}");
        let e = log_filter("weft=loudest").unwrap_err();
        assert!(format!("{e:#}").contains("\"weft=loudest\""), "{e:#}");
    }

    /// A `log_level` the config's check takes and the parser does not (`weft[=debug`: a bad
    /// span) keeps its good directives and the hold-back; on the old code the fallback dropped
    /// the hold-back. `WEFT_LOG` fixes the filter when it parses, and is ignored when not.
    #[test]
    fn the_start_filter_holds_back_the_netlink_warnings_on_every_path() {
        let (f, fixed) = initial_filter(None, "info,weft[=debug");
        let shown = f.to_string();
        assert!(!fixed);
        assert!(shown.contains(QUIETED) && shown.contains("info"), "{shown}");
        let (f, fixed) = initial_filter(Some("debug"), "info");
        assert!(fixed);
        assert!(f.to_string().contains(QUIETED), "{f}");
        let (f, fixed) = initial_filter(Some("weft=loudest"), "warn");
        assert!(!fixed, "a WEFT_LOG that does not parse is ignored");
        assert!(f.to_string().contains("warn"), "{f}");
    }
}
