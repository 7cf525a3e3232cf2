//! The ports something listens on in this host's network namespace (`HostFacts.listening_ports`;
//! the controller refuses forwards of these ports).
//!
//! Read from the kernel's socket tables `/proc/net/{tcp,tcp6,udp,udp6}`: a TCP socket listens in
//! state `0A` (LISTEN); a UDP socket serves in state `07` (bound, not connected). Every local
//! address counts (a service on 127.0.0.1 still owns the port for the host itself).

use std::path::Path;

/// Which socket table a text comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketTable {
    /// `/proc/net/tcp` or `/proc/net/tcp6`.
    Tcp,
    /// `/proc/net/udp` or `/proc/net/udp6`.
    Udp,
}

/// Pure: the listening local ports in the text of one `/proc/net/{tcp,udp}{,6}` table, sorted
/// and deduplicated. Lines that do not parse are skipped.
pub fn parse_proc_net(text: &str, table: SocketTable) -> Vec<u16> {
    let want = match table {
        SocketTable::Tcp => "0A",
        SocketTable::Udp => "07",
    };
    let mut ports: Vec<u16> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if !state.eq_ignore_ascii_case(want) {
                return None;
            }
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The TCP and UDP ports something listens on in the caller's network namespace, sorted and
/// deduplicated. A missing table (no IPv6) counts as empty; other read errors are returned.
pub fn listening_ports() -> Result<Vec<u16>, std::io::Error> {
    listening_ports_in(Path::new("/proc/net"))
}

/// [`listening_ports`] reading the tables from `dir`.
pub fn listening_ports_in(dir: &Path) -> Result<Vec<u16>, std::io::Error> {
    let mut ports = Vec::new();
    for (file, table) in [
        ("tcp", SocketTable::Tcp),
        ("tcp6", SocketTable::Tcp),
        ("udp", SocketTable::Udp),
        ("udp6", SocketTable::Udp),
    ] {
        match std::fs::read_to_string(dir.join(file)) {
            Ok(text) => ports.extend(parse_proc_net(&text, table)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21190 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21191 1 0000000000000000 100 0 0 10 0
   2: 0A00020F:0016 0A000202:D2F0 01 00000000:00000000 02:0009F5A3 00000000     0        0 22342 4 0000000000000000 20 4 29 10 -1
   3: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21192 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1234 2 0000000000000000 0
  101: 0A00020F:A1B2 08080808:0035 01 00000000:00000000 00:00000000 00000000     0        0 1235 2 0000000000000000 0
";

    #[test]
    fn parses_listening_sockets_only() {
        assert_eq!(parse_proc_net(TCP, SocketTable::Tcp), vec![22, 8080]);
        assert_eq!(parse_proc_net(TCP6, SocketTable::Tcp), vec![80]);
        assert_eq!(
            parse_proc_net(UDP, SocketTable::Udp),
            vec![53],
            "a connected UDP socket is a client"
        );
        assert!(parse_proc_net("header only\n", SocketTable::Tcp).is_empty());
        assert!(parse_proc_net("h\n  0: garbage\n", SocketTable::Tcp).is_empty());
    }

    #[test]
    fn reads_a_directory_of_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tcp"), TCP).expect("write");
        std::fs::write(dir.path().join("udp"), UDP).expect("write");
        assert_eq!(
            listening_ports_in(dir.path()).expect("read"),
            vec![22, 53, 8080],
            "missing v6 tables are fine"
        );
    }

    #[test]
    fn the_real_tables_parse() {
        // Whatever listens here, the reader must work on this machine's /proc.
        assert!(listening_ports().is_ok());
    }
}
