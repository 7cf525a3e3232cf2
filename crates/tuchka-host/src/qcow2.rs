//! Reading the qcow2 header (pure): virtual size and backing file name, without running
//! `qemu-img` (which would need a lock on images in use by running guests).

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Backing file name as stored, if any.
    pub backing_file: Option<String>,
}

/// Parse the first bytes of a qcow2 file (at least 32, plus the backing file name if it is to be
/// read). `None` when it is not qcow2.
pub fn parse_header(buf: &[u8]) -> Option<Qcow2Header> {
    let be64 = |o: usize| {
        buf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let be32 = |o: usize| {
        buf.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    if buf.get(0..4)? != b"QFI\xfb" {
        return None;
    }
    let backing_off = usize::try_from(be64(8)?).ok()?;
    let backing_len = usize::try_from(be32(16)?).ok()?;
    let virtual_size = be64(24)?;
    let backing_file = if backing_off == 0 || backing_len == 0 {
        None
    } else {
        let raw = buf.get(backing_off..backing_off.checked_add(backing_len)?)?;
        Some(String::from_utf8_lossy(raw).into_owned())
    };
    Some(Qcow2Header {
        virtual_size,
        backing_file,
    })
}

/// Read and parse the header of the file at `path` (the first 64 KiB are enough for the backing
/// name qemu-img writes).
pub fn read_header(path: &std::path::Path) -> std::io::Result<Option<Qcow2Header>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(65536);
    std::fs::File::open(path)?
        .take(65536)
        .read_to_end(&mut buf)?;
    Ok(parse_header(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_size_and_backing() {
        let mut h = vec![0u8; 0x200];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&0x100u64.to_be_bytes());
        h[16..20].copy_from_slice(&9u32.to_be_bytes());
        h[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        h[0x100..0x109].copy_from_slice(b"/base.img");
        let p = parse_header(&h).expect("qcow2");
        assert_eq!(p.virtual_size, 64 << 20);
        assert_eq!(p.backing_file.as_deref(), Some("/base.img"));
        assert_eq!(parse_header(b"not a qcow2 file at all, no no no"), None);
    }
}
