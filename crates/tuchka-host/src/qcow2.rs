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

/// Pure: the bytes of an empty qcow2 v3 file of `virtual_size` bytes (64 KiB clusters, no
/// backing file, every cluster unallocated) — what `qemu-img create -f qcow2` writes, laid out
/// as header, refcount table, refcount block, L1 table. For fakes and tests that need a real
/// qcow2 without running qemu-img. Sizes above 2 TiB are clamped to 2 TiB (one refcount block).
pub fn empty_image(virtual_size: u64) -> Vec<u8> {
    const CLUSTER: u64 = 1 << 16;
    let virtual_size = virtual_size.min(2 << 40);
    // One L2 table maps CLUSTER / 8 clusters; one L1 entry per L2 table.
    let l1_entries = virtual_size.div_ceil(CLUSTER * (CLUSTER / 8));
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    let clusters = 3 + l1_clusters;
    // The conversions cannot fail: a 2 TiB L1 table is 4,096 entries (32 KiB, one cluster).
    let mut f = vec![0u8; usize::try_from(clusters * CLUSTER).unwrap_or(0)];
    let mut put = |off: u64, bytes: &[u8]| {
        let off = usize::try_from(off).unwrap_or(0);
        f[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes()); // version
    put(20, &16u32.to_be_bytes()); // cluster_bits
    put(24, &virtual_size.to_be_bytes());
    put(36, &u32::try_from(l1_entries).unwrap_or(0).to_be_bytes()); // l1_size
    put(40, &(3 * CLUSTER).to_be_bytes()); // l1_table_offset
    put(48, &CLUSTER.to_be_bytes()); // refcount_table_offset
    put(56, &1u32.to_be_bytes()); // refcount_table_clusters
    put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    put(100, &104u32.to_be_bytes()); // header_length; the extension area after it is zero (end)
    put(CLUSTER, &(2 * CLUSTER).to_be_bytes()); // refcount table → the refcount block
    for c in 0..clusters {
        put(2 * CLUSTER + 2 * c, &1u16.to_be_bytes()); // every cluster of the file is used once
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_image_has_the_size_and_no_backing() {
        let img = empty_image(64 << 20);
        assert_eq!(img.len(), 4 << 16);
        assert_eq!(
            parse_header(&img),
            Some(Qcow2Header {
                virtual_size: 64 << 20,
                backing_file: None
            })
        );
        // 1 TiB needs 2048 L1 entries: still one L1 cluster.
        assert_eq!(empty_image(1 << 40).len(), 4 << 16);
    }

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
