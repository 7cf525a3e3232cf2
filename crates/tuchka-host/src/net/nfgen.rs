//! The nftables ruleset generation of the caller's network namespace: a counter the kernel
//! bumps on every committed nftables transaction, whoever makes it (`NFT_MSG_GETGEN` over a
//! netfilter netlink socket; one request, one answer, no process).
//!
//! [`super::nft::ensure`] uses it to skip listing the table on a pass where nothing at all was
//! committed since the kernel last held exactly our ruleset. Building the request and reading
//! the answer are pure ([`request`], [`parse_generation`]); [`generation`] only moves the bytes.

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN`.
const MSG_GETGEN: u16 = (10 << 8) | 16;
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN`.
const MSG_NEWGEN: u16 = (10 << 8) | 15;
/// `NLMSG_ERROR`.
const MSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST`.
const F_REQUEST: u16 = 1;
/// `NFTA_GEN_ID`.
const ATTR_GEN_ID: u16 = 1;
/// Length of `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// Length of `struct nlmsghdr` + `struct nfgenmsg`.
const HDRS: usize = NLMSG_HDR + 4;

/// Why the generation could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// The socket could not be opened or used.
    #[error("netfilter netlink socket")]
    Socket(#[source] std::io::Error),
    /// The kernel answered with an error.
    #[error("the kernel refused NFT_MSG_GETGEN (errno {0})")]
    Kernel(i32),
    /// The answer was not what the protocol says.
    #[error("malformed NFT_MSG_GETGEN answer: {0}")]
    Malformed(&'static str),
}

/// Pure: the `NFT_MSG_GETGEN` request with sequence number `seq`.
pub fn request(seq: u32) -> [u8; HDRS] {
    let mut m = [0u8; HDRS];
    m[0..4].copy_from_slice(&(HDRS as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&MSG_GETGEN.to_ne_bytes());
    m[6..8].copy_from_slice(&F_REQUEST.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 0 (the kernel); nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id 0.
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Pure: the generation id in the kernel's answer to [`request`].
pub fn parse_generation(answer: &[u8]) -> Result<u32, GenError> {
    let kind = u16_at(answer, 4).ok_or(GenError::Malformed("short header"))?;
    let len = answer
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(GenError::Malformed("short header"))? as usize;
    let msg = answer
        .get(..len)
        .ok_or(GenError::Malformed("truncated message"))?;
    if kind == MSG_ERROR {
        let errno = msg
            .get(NLMSG_HDR..NLMSG_HDR + 4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_ne_bytes)
            .ok_or(GenError::Malformed("short error message"))?;
        return Err(GenError::Kernel(-errno));
    }
    if kind != MSG_NEWGEN {
        return Err(GenError::Malformed("not an NFT_MSG_NEWGEN message"));
    }
    let mut at = HDRS;
    while at + 4 <= msg.len() {
        let alen = usize::from(u16_at(msg, at).ok_or(GenError::Malformed("attribute"))?);
        let atype = u16_at(msg, at + 2).ok_or(GenError::Malformed("attribute"))? & 0x3fff;
        if alen < 4 {
            return Err(GenError::Malformed("attribute shorter than its header"));
        }
        if atype == ATTR_GEN_ID {
            let v = msg
                .get(at + 4..at + 8)
                .and_then(|b| b.try_into().ok())
                .ok_or(GenError::Malformed("short NFTA_GEN_ID"))?;
            return Ok(u32::from_be_bytes(v));
        }
        at += alen.div_ceil(4) * 4;
    }
    Err(GenError::Malformed("no NFTA_GEN_ID attribute"))
}

/// The current nftables generation of the caller's network namespace.
pub fn generation() -> Result<u32, GenError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(GenError::Socket)?;
    socket.bind_auto().map_err(GenError::Socket)?;
    socket
        .send_to(&request(1), &SocketAddr::new(0, 0), 0)
        .map_err(GenError::Socket)?;
    // The kernel answers inside sendto(): the reply is queued already, never wait for it.
    socket.set_non_blocking(true).map_err(GenError::Socket)?;
    let (answer, _) = socket.recv_from_full().map_err(GenError::Socket)?;
    parse_generation(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An NFT_MSG_NEWGEN answer as the kernel builds it.
    fn newgen(id: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_ne_bytes()); // length, fixed below
        m.extend_from_slice(&MSG_NEWGEN.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]); // nfgenmsg
                                            // NFTA_GEN_PROC_NAME "nft" first (padded), then NFTA_GEN_ID.
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&3u16.to_ne_bytes());
        m.extend_from_slice(b"nft\0");
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&ATTR_GEN_ID.to_ne_bytes());
        m.extend_from_slice(&id.to_be_bytes());
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn request_is_a_getgen_message() {
        let r = request(7);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().expect("4")), 20);
        assert_eq!(u16_at(&r, 4), Some(0x0a10));
        assert_eq!(u16_at(&r, 6), Some(1));
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().expect("4")), 7);
    }

    #[test]
    fn parses_the_generation_and_errors() {
        assert_eq!(
            parse_generation(&newgen(0x0102_0304)).expect("id"),
            0x0102_0304
        );
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&MSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-1i32).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert!(matches!(parse_generation(&err), Err(GenError::Kernel(1))));
        assert!(parse_generation(&[1, 2, 3]).is_err());
        let mut no_id = newgen(1);
        no_id.truncate(28);
        no_id[0..4].copy_from_slice(&28u32.to_ne_bytes());
        assert!(matches!(
            parse_generation(&no_id),
            Err(GenError::Malformed(_))
        ));
    }

    #[test]
    fn the_kernel_answers_and_counts_commits() {
        // Root only (CAP_NET_ADMIN is needed for nftables); elsewhere the call must fail cleanly.
        match generation() {
            Ok(_) => {}
            Err(GenError::Kernel(errno)) => assert_eq!(errno, libc::EPERM),
            Err(e) => panic!("reading the nftables generation failed: {e}"),
        }
    }
}
