//! The kernel's UDP counters of a network namespace, read through a process in it
//! (`/proc/<pid>/net/...`): the e2e tests and the benchmarks account for every datagram a kernel
//! dropped at a full socket buffer with them.

use anyhow::Context as _;

/// A `/proc/<pid>/net` file, or `None` for the IPv6 ones of a kernel without IPv6.
pub fn net_file(pid: u32, name: &str) -> anyhow::Result<Option<String>> {
    let path = format!("/proc/{pid}/net/{name}");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && name.ends_with('6') => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {path}")),
    }
}

/// The field `name` of the `Udp:` lines of a `/proc/net/snmp` (a header line, then values).
pub fn snmp_udp(snmp: &str, name: &str) -> anyhow::Result<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (header, values) = (udp.next(), udp.next());
    let (header, values) = header
        .zip(values)
        .context("no Udp lines in /proc/net/snmp")?;
    let at = header
        .split_whitespace()
        .position(|f| f == name)
        .with_context(|| format!("no {name} in /proc/net/snmp"))?;
    let value = values
        .split_whitespace()
        .nth(at)
        .context("short Udp line")?;
    value
        .parse()
        .with_context(|| format!("{name} = {value:?} in /proc/net/snmp"))
}

/// Datagrams the kernel dropped at full UDP socket buffers in the network namespace of process
/// `pid`, over IPv4 and IPv6 (`RcvbufErrors` and `Udp6RcvbufErrors`). The kernel counts one per
/// buffer it refuses: one coalesced (GRO) buffer of many datagrams counts once.
pub fn udp_rcvbuf_errors(pid: u32) -> anyhow::Result<u64> {
    let snmp = net_file(pid, "snmp")?.context("no /proc/net/snmp")?;
    let mut drops = snmp_udp(&snmp, "RcvbufErrors")?;
    if let Some(snmp6) = net_file(pid, "snmp6")? {
        let line = snmp6.lines().find(|l| l.starts_with("Udp6RcvbufErrors"));
        let value = line.and_then(|l| l.split_whitespace().nth(1));
        drops += value
            .context("no Udp6RcvbufErrors in /proc/net/snmp6")?
            .parse::<u64>()
            .context("Udp6RcvbufErrors")?;
    }
    Ok(drops)
}

/// Each socket of a `/proc/net/udp` or `/proc/net/udp6` table: its local port and the datagrams
/// the kernel dropped at it (its `drops` column; for a socket without GRO, one per datagram).
pub fn udp_socket_drops(table: &str) -> anyhow::Result<Vec<(u16, u64)>> {
    table
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = f.get(1).and_then(|a| a.rsplit(':').next());
            let port = port.and_then(|p| u16::from_str_radix(p, 16).ok());
            let drops = f.last().and_then(|d| d.parse::<u64>().ok());
            port.zip(drops)
                .with_context(|| format!("a UDP table line {line:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_udp_counters_are_read_by_name_and_a_bad_table_is_an_error_that_names_it() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 10 0 7 12 5 0\n";
        assert_eq!(snmp_udp(snmp, "RcvbufErrors").expect("read"), 5);
        assert_eq!(snmp_udp(snmp, "InErrors").expect("read"), 7);
        let e = snmp_udp("Ip: a\nIp: 1\n", "RcvbufErrors").unwrap_err();
        assert!(e.to_string().contains("no Udp lines"), "{e}");
        let e = snmp_udp("Udp: InErrors\nUdp: x\n", "InErrors").unwrap_err();
        assert!(format!("{e:#}").contains("\"x\""), "{e:#}");
        let e = snmp_udp("Udp: InErrors\nUdp: 1\n", "RcvbufErrors").unwrap_err();
        assert!(e.to_string().contains("no RcvbufErrors"), "{e}");
    }

    #[test]
    fn each_udp_socket_is_read_with_its_port_and_drops_and_a_bad_line_is_named() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when \
                     retrnsmt   uid  timeout inode ref pointer drops\n\
                     \x20 1: 01024064:17D4 00000000:0000 07 00000000:00000000 00:00000000 \
                     00000000     0        0 1234 2 0000000000000000 17\n";
        assert_eq!(udp_socket_drops(table).expect("read"), [(6100, 17)]);
        let e = udp_socket_drops("header\n 1: 01024064:ZZZZ x 17\n").unwrap_err();
        assert!(e.to_string().contains("ZZZZ"), "{e}");
    }
}
